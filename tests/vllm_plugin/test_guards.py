"""What would make the adapters silently wrong is an error: another vLLM release, a compiled
model, prompts split across steps; the config hook turns off what PARA cannot serve."""
from __future__ import annotations

import os
import types

import numpy as np
import pytest

from tests.kit.vllm_engine import PROMPTS, engine, tokens


def test_another_vllm_release_is_refused_with_the_supported_one_named():
    pytest.importorskip("vllm")
    from para_kernels.vllm import UnsupportedVLLMError, check_version

    assert check_version("0.32.0+cpu") == "0.32.0+cpu"
    with pytest.raises(UnsupportedVLLMError, match=r"supports vLLM 0\.32\.x, found vLLM 0\.33\.1"):
        check_version("0.33.1")


def test_compile_requested_still_applies_the_adapters(served):
    """enforce_eager=False asks vLLM to torch.compile the model; the config hook turns eager mode
    back on (a graph traced at warm-up would replay without the vectors), and says so."""
    eager = engine(served)
    try:
        want = tokens(eager, PROMPTS, ["a", None, "b", "a", "attn"])
        config = eager.llm_engine.vllm_config
        assert not config.cache_config.enable_prefix_caching
        assert not config.scheduler_config.enable_chunked_prefill
    finally:
        del eager
    compiled = engine(served, enforce_eager=False)
    try:
        assert compiled.llm_engine.vllm_config.model_config.enforce_eager
        assert tokens(compiled, PROMPTS, ["a", None, "b", "a", "attn"]) == want
    finally:
        del compiled


def _runner(state, req_ids, qsl, computed, prompt, adapters):
    sp = lambda name: types.SimpleNamespace(extra_args={"para_adapter": name} if name else None)
    return types.SimpleNamespace(
        input_batch=types.SimpleNamespace(num_reqs=len(req_ids), req_ids=req_ids,
                                          num_computed_tokens_cpu=np.array(computed),
                                          num_prompt_tokens=np.array(prompt)),
        query_start_loc=types.SimpleNamespace(np=np.array(qsl)),
        requests={r: types.SimpleNamespace(sampling_params=sp(a)) for r, a in zip(req_ids, adapters)},
        get_model=lambda: types.SimpleNamespace(para_serving=state))


@pytest.fixture
def state(served):
    import torch
    from transformers import AutoConfig

    from para_kernels.vllm import models, serving

    facts = models.model_facts(AutoConfig.from_pretrained(served["model"]))
    shard = serving.Shard((0, facts.sizes["q"]), facts.sizes["v"], (0, facts.sizes["v"]), (0, facts.sizes["up"]))
    return serving.ServingState(facts, {0: shard, 1: shard}, 4, "cpu", torch.float32,
                                known={"a": served["adapters"]["a"]})


def test_a_prompt_split_across_steps_is_an_error(state):
    from para_kernels.vllm.serving import ServingError

    with pytest.raises(ServingError, match="cannot pool its whole prompt"):  # a prefix-cache hit: 4 computed before
        state.begin_step(_runner(state, ["r"], [0, 3], [4], [7], ["a"]), 3)
    with pytest.raises(ServingError, match="cannot pool its whole prompt"):  # chunked: 3 of 7 prompt tokens
        state.begin_step(_runner(state, ["r"], [0, 3], [0], [7], ["a"]), 3)
    with pytest.raises(ServingError, match="not prefilled through PARA"):  # decoding with no vectors
        state.begin_step(_runner(state, ["r"], [0, 1], [8], [7], ["a"]), 1)
    with pytest.raises(ServingError, match="the runner's layout is not this forward's"):
        state.begin_step(_runner(state, ["r"], [0, 7], [0], [7], ["a"]), 5)


def test_slots_layout_release_and_continued_sessions(state):
    step = state.begin_step(_runner(state, ["x", "y", "z"], [0, 5, 6, 9], [0, 9, 0], [5, 8, 3], ["a", None, "a"]), 12)
    sx, sz = state.slot_of["x"], state.slot_of["z"]
    assert set(state.slot_of) == {"x", "z"} and 0 not in (sx, sz) and sx != sz  # y: no adapter, no slot
    assert step.token_rows.tolist() == [sx] * 5 + [0] + [sz] * 3 + [0] * 3  # padding tokens: slot 0 (ones)
    assert [(p.start.tolist(), p.end.tolist()) for p in step.prefills] == [([0, 6], [5, 9])]  # one adapter, one launch
    # x continues with new input (a longer prompt, 9 tokens computed): its first vectors are kept, nothing pooled
    cont = state.begin_step(_runner(state, ["x", "z"], [0, 3, 4], [9, 3], [12, 3], ["a", "a"]), 4)
    assert cont.token_rows.tolist() == [sx] * 3 + [sz] and cont.prefills == []
    state.release(["z"])  # preempted: its KV cache is gone
    resumed = state.begin_step(_runner(state, ["x", "z"], [0, 1, 6], [12, 0], [12, 3], ["a", "a"]), 6)
    assert [(p.start.tolist(), p.end.tolist()) for p in resumed.prefills] == [([1], [4])]  # its prompt only
    assert state.begin_step(_runner(state, ["y"], [0, 1], [9], [8], [None]), 1) is None  # x, z left: freed
    assert state.slot_of == {} and len(state.free) == 4


def test_a_step_that_reaches_no_para_layer_raises(state):
    """A forward that skipped the PARA layers (as a graph compiled without them would) is an error."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from para_kernels.vllm import runner
    from para_kernels.vllm.serving import ServingError

    runner.install()
    fake = _runner(state, ["x"], [0, 5], [0], [5], ["a"])
    fake.model = lambda **kwargs: "hidden states"  # a model in which no PARA layer runs
    with pytest.raises(ServingError, match="without reaching any PARA layer"):
        GPUModelRunner._model_forward(fake, input_ids=np.zeros(5))
    bare = _runner(state, ["y"], [0, 5], [0], [5], [None])
    bare.model = fake.model
    assert GPUModelRunner._model_forward(bare, input_ids=np.zeros(5)) == "hidden states"  # nothing to scale


def test_an_adapter_request_to_an_engine_without_para_is_refused(served, tmp_path):
    """A model started without the PARA architecture would serve para_adapter requests bare."""
    import subprocess
    import sys

    script = tmp_path / "plain.py"
    script.write_text(f"""
import os
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.pop("PARA_VLLM_ENGINE", None)
from vllm import LLM, SamplingParams
llm = LLM({served["model"]!r}, max_model_len=256, dtype="float32", enforce_eager=True)
print(len(llm.generate(["hi"], SamplingParams(max_tokens=2))[0].outputs[0].token_ids))
try:
    llm.generate(["hi"], SamplingParams(max_tokens=2, extra_args={{"para_adapter": "a"}}))
except Exception as e:
    print("refused:", e)
""")
    env = {k: v for k, v in os.environ.items() if k != "PARA_VLLM_ENGINE"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert "refused: para_adapter='a' was given, but this vLLM engine does not serve a PARA model" in out.stdout, \
        out.stdout[-2000:] + out.stderr[-3000:]
