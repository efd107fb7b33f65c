"""The README's "Serving with vLLM" block runs as written, in the folder layout `make vllm-demo`
leaves (demo-adapters/model, demo-adapters/uppercase, demo-adapters/reverse): here the tiny
model and two of its adapters stand in for SmolLM2 and the demo's trained ones."""
from __future__ import annotations

import os

from kit import readme


def test_the_readmes_vllm_block_runs_as_written(served, tmp_path, monkeypatch, capsys):
    blocks = readme.python_blocks("## Serving with vLLM")
    assert len(blocks) == 1 and "PARALlamaForCausalLM" in blocks[0]
    demo = tmp_path / "demo-adapters"
    demo.mkdir()
    for name, target in (("model", served["model"]), ("uppercase", served["adapters"]["a"]),
                         ("reverse", served["adapters"]["b"])):
        os.symlink(target, demo / name)
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md Serving with vLLM", "exec"), {"__name__": "__main__"})
    printed = capsys.readouterr().out
    assert printed.count("\n") >= 3  # the three requests' outputs
