"""Adapters in the worker: a cap with least-recently-used eviction, load / unload at run time,
and what vLLM cannot serve refused with the reason."""
from __future__ import annotations

import pytest

from tests.kit.vllm_engine import PROMPTS, engine, tokens


def test_lru_cap_load_and_unload_at_run_time(served):
    import para_kernels.vllm as pv

    llm = engine(served, max_adapters=2)
    try:
        ref = {n: tokens(llm, PROMPTS, [n] * len(PROMPTS)) for n in ("a", "b")}
        assert pv.resident_adapters(llm) == ["a", "b"]
        tokens(llm, PROMPTS[:1], ["attn"])
        assert pv.resident_adapters(llm) == ["b", "attn"]  # a, least recently used, is out
        assert tokens(llm, PROMPTS, ["a"] * len(PROMPTS)) == ref["a"]  # read again on use, same tokens
        pv.unload_adapter(llm, "a")
        assert "a" not in pv.resident_adapters(llm)
        pv.load_adapter(llm, "again", served["adapters"]["b"])  # another name for b's folder
        assert tokens(llm, PROMPTS, ["again"] * len(PROMPTS)) == ref["b"]
    finally:
        del llm


def test_modules_to_save_and_foreign_targets_are_refused(served):
    from transformers import AutoConfig

    from para_kernels.transformers.io import AdapterFileError
    from para_kernels.vllm import adapters, models

    facts = models.model_facts(AutoConfig.from_pretrained(served["model"]))
    with pytest.raises(AdapterFileError, match="modules_to_save"):
        adapters.read("saved", served["saved"], facts, "cpu", None)
    small = adapters.ModelFacts(64, 2, facts.sizes)
    with pytest.raises(AdapterFileError, match="hidden size 128"):
        adapters.read("a", served["adapters"]["a"], small, "cpu", None)
