"""The README's Python blocks run as written, top to bottom, in one namespace.

The only substitutions (the names the README leaves to the reader): ``hf_model`` is a tiny random
Llama (nothing downloaded) and ``ids`` / ``mask`` / ``labels`` / ``lengths`` a 3-row batch for it.
The blocks run in an empty folder, so their relative paths (``"adapters"``) land there.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

from kit import ROOT
from kit.models import tiny_llama

# the single_thread fixture: tests/wrapper/conftest.py
pytestmark = pytest.mark.usefixtures("single_thread")

README = os.path.join(ROOT, "README.md")
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks() -> list[str]:
    with open(README) as f:
        return BLOCK.findall(f.read())


def reader_supplied_names() -> dict:
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # one left-padded row
    labels = ids.clone()
    labels[:, :4] = -100
    return {"hf_model": tiny_llama(), "ids": ids, "mask": mask, "labels": labels,
            "lengths": torch.tensor([4, 3, 5])}


def test_readme_has_the_blocks_this_test_expects():
    blocks = python_blocks()
    assert len(blocks) >= 3, f"found {len(blocks)} python blocks in README.md"
    assert any("get_para_model(hf_model" in b for b in blocks)


def test_every_readme_python_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = reader_supplied_names()
    for i, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"README.md python block {i + 1} failed: {type(e).__name__}: {e}\n{block}") from e
    # what the Use block's comments say about the files is true
    assert (tmp_path / "adapters" / "adapter_config.json").is_file()
    assert (tmp_path / "adapters" / "b" / "adapter_config.json").is_file()
    assert namespace["model"].active_adapters == ["mix"]
