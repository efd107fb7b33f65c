"""The README's Python blocks run as written, top to bottom, in one namespace per section.

The only substitutions (the names the README leaves to the reader): in "Use", ``hf_model`` is a
tiny random Llama (nothing downloaded) and ``ids`` / ``mask`` / ``labels`` / ``lengths`` a 3-row
batch for it; in "Training", the Hub id ``MODEL_ID`` becomes a folder holding a tiny random Llama
and a character-level tokenizer. The blocks run in an empty folder, so their relative paths
(``"adapters"``, ``"para-run"``) land there.
"""
from __future__ import annotations

import pytest
import torch

from kit import readme
from kit.models import save_tiny_checkpoint, tiny_llama

# the single_thread fixture: tests/wrapper/conftest.py
pytestmark = pytest.mark.usefixtures("single_thread")

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TRAINING = "## Training"
VLLM = "## Serving with vLLM"  # runs in the vLLM venv: tests/vllm_plugin/test_readme_block.py


def python_blocks(which: str | None = None) -> list[str]:
    """The Python blocks of the README's section ``which`` ('## Training'), or of every section
    but Training and Serving with vLLM."""
    return readme.python_blocks(which) if which is not None else readme.python_blocks(excluding=(TRAINING, VLLM))


def run_blocks(blocks: list[str], namespace: dict, what: str) -> None:
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md {what} python block {i + 1}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"README.md {what} python block {i + 1} failed: {type(e).__name__}: {e}\n"
                                 f"{block}") from e


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
    run_blocks(python_blocks(), namespace, "Use")
    # what the Use block's comments say about the files is true
    assert (tmp_path / "adapters" / "adapter_config.json").is_file()
    assert (tmp_path / "adapters" / "b" / "adapter_config.json").is_file()
    assert namespace["model"].active_adapters == ["mix"]


def test_readme_training_blocks_run(tmp_path, monkeypatch):
    """PARATrainer (bf16), TRL, autocast generation, a 4-bit backbone and device_map, as written."""
    monkeypatch.chdir(tmp_path)
    folder = save_tiny_checkpoint(str(tmp_path / "tiny"))
    blocks = python_blocks(TRAINING)
    assert len(blocks) >= 4 and sum(MODEL_ID in b for b in blocks) == 1
    run_blocks([b.replace(MODEL_ID, folder) for b in blocks], {}, "Training")
    for adapter in ("para-run/adapter", "qlora-adapter"):
        assert (tmp_path / adapter / "adapter_config.json").is_file()
