"""PARA adapters served by vLLM's engine (CPU build, in-process): each request gets exactly what
it gets alone and what PARAModel.generate gives, whatever it is batched with or arrives beside."""
from __future__ import annotations

import pytest
import torch

from tests.kit.vllm_engine import MAX_TOKENS, PROMPTS, engine, load_hf, params, tokens


@pytest.fixture(scope="module")
def llm(served):
    llm = engine(served)
    yield llm
    del llm


def test_zero_adapter_gives_exactly_the_bare_models_tokens(llm):
    bare = tokens(llm, PROMPTS, [None] * len(PROMPTS))
    assert tokens(llm, PROMPTS, ["zero"] * len(PROMPTS)) == bare


def test_adapters_change_the_tokens(llm):
    """Were the adapters silently ignored (a compiled graph, a missing hook), these would be equal."""
    bare = tokens(llm, PROMPTS, [None] * len(PROMPTS))
    for name in ("a", "b", "attn"):
        ours = tokens(llm, PROMPTS, [name] * len(PROMPTS))
        assert sum(x != y for x, y in zip(ours, bare)) >= 3, name


def test_mixed_batch_gives_each_request_what_it_gets_alone(llm):
    names = ["a", None, "b", "a", "attn"]
    mixed = tokens(llm, PROMPTS, names)
    alone = [tokens(llm, [p], [n])[0] for p, n in zip(PROMPTS, names)]
    assert mixed == alone
    assert mixed[0] == mixed[3]  # the same prompt and adapter in two requests


def test_the_gpu_path_through_para_scale_gives_the_same_tokens(llm, monkeypatch):
    """On a GPU every projection is scaled by para::scale with token_rows (the Triton / CUDA
    kernels); on the CPU in place. The CPU runs the GPU path here: the same tokens."""
    from para_kernels.vllm import models

    names = ["a", None, "b", "a", "attn"]
    want = tokens(llm, PROMPTS, names)
    monkeypatch.setattr(models, "IN_PLACE_ON_CPU", False)
    assert tokens(llm, PROMPTS, names) == want

def test_tokens_equal_paramodel_generate_on_the_same_weights(llm, served):
    import para_kernels as pk

    names = ["a", None, "b", "a", "attn"]
    outs = llm.generate(PROMPTS, [params(n) for n in names], use_tqdm=False)
    pm = pk.PARAModel.from_pretrained(load_hf(served["model"]), served["adapters"]["a"], adapter_name="a")
    for name in ("b", "attn"):
        pm.load_adapter(served["adapters"][name], adapter_name=name)
    for out, name in zip(outs, names):
        ids = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            hf = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                             do_sample=False, adapter_names=[name])
        assert list(out.outputs[0].token_ids) == hf[0, ids.shape[1]:].tolist(), name


def test_staggered_arrivals_prefilled_while_others_decode(llm):
    """Requests added while others decode (their prompts prefilled in the same steps as the
    others' decode tokens) get what they get alone."""
    names = ["a", None, "b", "attn", "a"]
    alone = [tokens(llm, [p], [n])[0] for p, n in zip(PROMPTS, names)]
    eng = llm.llm_engine
    got, added, step = {}, 0, 0
    while added < len(PROMPTS) or eng.has_unfinished_requests():
        if added < len(PROMPTS) and step % 3 == 0:  # a new request every third step
            eng.add_request(f"r{added}", PROMPTS[added], params(names[added]))
            added += 1
        for out in eng.step():
            if out.finished:
                got[int(out.request_id[1:])] = list(out.outputs[0].token_ids)
        step += 1
    assert [got[i] for i in range(len(PROMPTS))] == alone


def test_an_aborted_request_frees_its_slot(llm):
    eng = llm.llm_engine
    state_slots = lambda: llm.collective_rpc(lambda self: len(self.model_runner.get_model().para_serving.slot_of))[0]
    eng.add_request("gone", PROMPTS[0], params("a", max_tokens=50))
    eng.step()
    eng.abort_request(["gone"])
    assert state_slots() == 1  # held until the runner has dropped the request (checked at the next step)
    assert tokens(llm, PROMPTS[:2], ["b", "b"]) == [tokens(llm, [p], ["b"])[0] for p in PROMPTS[:2]]
    tokens(llm, PROMPTS[:1], [None])  # a step after every adapter request has left
    assert state_slots() == 0


def test_unknown_adapter_is_refused_when_the_request_is_added(llm):
    from vllm.exceptions import VLLMValidationError  # the server answers it with HTTP 400

    with pytest.raises(VLLMValidationError, match="unknown PARA adapter 'nope'"):
        tokens(llm, PROMPTS[:1], ["nope"])
    with pytest.raises(VLLMValidationError, match="para_adapter must be an adapter name"):
        tokens(llm, PROMPTS[:1], [3])
    assert tokens(llm, PROMPTS[:1], ["a"]) == tokens(llm, PROMPTS[:1], ["a"])  # the engine still serves


def test_an_adapter_loaded_at_run_time_from_the_requests_path(llm, served, monkeypatch):
    from vllm.exceptions import VLLMValidationError

    import para_kernels.vllm as pv

    path = served["adapters"]["c"]
    with pytest.raises(VLLMValidationError, match="switched off on this server"):
        tokens(llm, PROMPTS[:1], ["c"], path=path)
    monkeypatch.setenv("PARA_VLLM_ALLOW_ADAPTER_PATHS", "1")
    c = tokens(llm, PROMPTS, ["c"] * len(PROMPTS), path=path)
    assert c != tokens(llm, PROMPTS, [None] * len(PROMPTS))
    assert "c" in pv.resident_adapters(llm)
    assert tokens(llm, PROMPTS, ["c"] * len(PROMPTS), path=path) == c
    with pytest.raises(VLLMValidationError, match="unknown PARA adapter 'c'"):  # every request passes its path
        tokens(llm, PROMPTS[:1], ["c"])
    with pytest.raises(VLLMValidationError, match="'a' already names the adapter in"):  # no rebinding a name
        tokens(llm, PROMPTS[:1], ["a"], path=path)
    with pytest.raises(VLLMValidationError, match="cannot be served: no PARA adapter in"):
        tokens(llm, PROMPTS[:1], ["d"], path=served["model"])  # a folder that holds no adapter
    with pytest.raises(VLLMValidationError, match="modules_to_save"):
        tokens(llm, PROMPTS[:1], ["s"], path=served["saved"])
    assert tokens(llm, PROMPTS[:1], ["a"]) == tokens(llm, PROMPTS[:1], ["a"])  # the engine still serves


def test_requests_preempted_for_kv_space_are_pooled_again(served):
    """Too little KV cache for the batch: vLLM preempts requests (dropping their cache) and
    prefills them again later; each still gets what it gets alone. (Last in this module: an
    in-process engine that ends tears down vLLM's process groups, which the module's engine uses.)"""
    small = engine(served, num_gpu_blocks_override=5, block_size=32, max_num_seqs=8, max_model_len=128)
    try:
        names = ["a", "b", None, "attn", "a", "b"]
        prompts = [p * 3 for p in PROMPTS] + ["xyz " * 8]
        long = [params(n, max_tokens=40) for n in names]
        batch = [list(o.outputs[0].token_ids) for o in small.generate(prompts, long, use_tqdm=False)]
        alone = [list(small.generate([p], [q], use_tqdm=False)[0].outputs[0].token_ids) for p, q in zip(prompts, long)]
        assert batch == alone
        free, preempted = small.collective_rpc(
            lambda self: (len(self.model_runner.get_model().para_serving.free),
                          self.model_runner.get_model().para_serving.preempted))[0]
        assert preempted > 0  # the KV cache was too small: requests with adapters were preempted
        assert free >= 6  # and every slot came back
    finally:
        del small

