"""The serving comparison's correctness checker (bench/scenarios/checks.py), as tests.

``python -m bench`` calls ``run_checks`` before timing and refuses to time a model that fails
it; here the same function runs on ``llama-tiny`` with every method kind and every entry must
pass, and a deliberately wrong baseline must make it fail (so a pass means something). The op
suite's torch.compile rows record how far the compiled reference is from the eager one; here
that difference must be within float32 rounding.
"""
from __future__ import annotations

import pytest
import torch

from bench.scenarios import ops
from bench.scenarios.checks import run_checks
from bench.scenarios.ops_cases import cases
from bench.scenarios.serving_setup import ServingConfig, Setup

CPU = torch.device("cpu")
TINY = {"model": "llama-tiny", "batch": 4, "tenants": 2, "prompt_len": 12, "check_tokens": 3}


@pytest.fixture(scope="module")
def every_method():
    """llama-tiny holding PARA (default dispatch and the reference forced), PEFT LoRA and BGMV
    LoRA at ranks 8 and 16 (the popularity table's) and (IA)3."""
    cfg = ServingConfig(**TINY, methods=("para", "para@reference", "peft_lora", "bgmv_lora", "ia3"))
    return Setup(cfg, CPU, log=lambda *_: None)


def test_every_check_passes(every_method):
    results = run_checks(every_method, log=lambda *_: None)
    entries = {k: v for k, v in results.items() if isinstance(v, dict) and "ok" in v}
    assert {"para_none_rows_equal_bare_logits", "para_adapter_rows_differ", "para_none_rows_equal_bare_tokens",
            "para@reference_equals_para_logits", "peft_lora_differs", "bgmv_lora_equals_peft_logits",
            "bgmv_lora_equals_peft_logits_with_base_rows", "bgmv_lora_r16_equals_peft_logits", "ia3_differs",
            "ia3_rows_equal_folded_weights"} <= set(entries)
    failed = {k: v for k, v in entries.items() if not v["ok"]}
    assert not failed, failed


def test_a_wrong_baseline_fails_the_checks(every_method):
    """BGMV LoRA with one tenant's B bank scaled: no longer the PEFT weights, so the check fails."""
    bgmv = every_method.bgmv[every_method.cfg.lora_r]
    banks = [b for b in bgmv.B.values()]
    saved = [b.clone() for b in banks]
    try:
        for b in banks:
            b[0].mul_(3.0)
        results = run_checks(every_method, log=lambda *_: None)
    finally:
        for b, s in zip(banks, saved):
            b.copy_(s)
    assert results["bgmv_lora_equals_peft_logits"]["ok"] is False
    assert results["para_none_rows_equal_bare_logits"]["ok"]  # the others still pass


def test_compiled_reference_equals_eager():
    """The op suite's compiled reference (torch.compile of the reference function) gives the
    eager function's output (its max_abs_diff is what the report's compile table shows)."""
    cfg = ops.OpsConfig(models=("SmolLM2-135M",), batches=(2,), prompt_lens=(8,), pool_modes=("mean",))
    case = next(c for c in cases(cfg, CPU, torch.float32) if c.meta["op"] == "scale")
    result = ops._compile(case, CPU)
    if result.get("error"):
        pytest.skip(f"torch.compile cannot run here: {result['error'][:200]}")
    assert result["max_abs_diff"] <= 1e-5
    torch._dynamo.reset()
