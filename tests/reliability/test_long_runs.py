"""Long runs and resources: many generate calls with changing adapters and batch sizes, and
add / delete / load cycles, leave memory flat (RSS, hooks, cache map entries, cached banks,
parameters, live RequestStates) and every result equal to its reference (each row run alone,
computed once per (prompt, adapter)). Also the cache of stacked adapter banks (layer.py): a
cached prefill equals an uncached one, and every way of changing the weights invalidates it."""
from __future__ import annotations

import random
import statistics
import time

import pytest
import torch
from serving import (
    ADAPTERS,
    ROUTES,
    SAME,
    References,
    generate_mixed,
    left_padded,
    prompt_pool,
    resources,
    rss_kib,
    served_model,
)

from para_kernels import PARAConfig, get_para_model
from para_kernels.transformers import layer as layer_mod
from para_kernels.transformers.layer import GENERATOR_ATTR

from kit.models import randomize_adapter, tiny_llama

# RSS may grow by this much over a whole run: glibc's arenas and torch's CPU allocator keep freed
# blocks (a few MiB of drift from batch shapes seen for the first time after the warm-up), while a
# leak of one request per call (its KV cache and vectors, ~20 KiB here) reaches 20 MiB at 1,000
# calls. The exact detectors are the object counts (resources()): those must not grow at all.
RSS_BOUND_KIB = 24 * 1024
FLAT = ("hooks", "handles", "hooked", "module_index", "modules", "parameters", "buffers", "cache_states",
        "finalizers", "request_states")


def _assert_flat(before: dict, after: dict) -> None:
    grown = {k: (before[k], after[k]) for k in FLAT if after[k] != before[k]}
    assert not grown, f"per-call state grew (before, after): {grown}"


def _random_call(rng: random.Random, n_prompts: int) -> tuple[list[int], list]:
    batch = rng.randint(1, 4)
    return [rng.randrange(n_prompts) for _ in range(batch)], [rng.choice(ROUTES) for _ in range(batch)]


def test_generate_calls_with_changing_adapters_and_batches_stay_flat_and_correct(campaign):
    pm = served_model()
    prompts = prompt_pool()
    ref = References(pm, prompts)
    rng = random.Random(0)
    n = campaign.cases(50)

    def one_call(i: int) -> None:
        picks, names = _random_call(rng, len(prompts))
        got = generate_mixed(pm, prompts, picks, names, use_cache=i % 7 != 3)  # some uncached calls
        for b, (p, name) in enumerate(zip(picks, names)):
            assert torch.equal(got[b], ref(p, name)), (i, b, picks, names)
        if i % 5 == 0:  # a manual decode step on a cache the model made, then the cache is dropped
            ids, mask = left_padded([prompts[p] for p in picks])
            with torch.no_grad():
                out = pm(input_ids=ids, attention_mask=mask, use_cache=True, adapter_names=names)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                assert pm.request_state(out.past_key_values) is not None
                pm(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                   past_key_values=out.past_key_values)
            for b, (p, name) in enumerate(zip(picks, names)):
                assert nxt[b, 0] == ref(p, name)[0], (i, b)

    for i in range(10):  # warm-up: every reference, every bank combination's first stack, the allocator
        one_call(i)
    for p in range(len(prompts)):
        for name in ROUTES:
            ref(p, name)
    before, rss0 = resources(pm), rss_kib()
    start = time.perf_counter()
    for i in range(n):
        one_call(i)
    elapsed = time.perf_counter() - start
    after, rss1 = resources(pm), rss_kib()
    campaign.tried("long_runs", n)

    _assert_flat(before, after)
    assert after["cache_states"] == 0 and after["request_states"] == 0  # nothing outlives its call
    # at most one stack per combination of >= 2 same-signature adapters ({a, b, d}: 4 sets, in either
    # order of first appearance: bounded by BANK_CACHE_SIZE) per layer
    assert after["cached_banks"] <= layer_mod.BANK_CACHE_SIZE * len(pm._layers)
    growth = rss1 - rss0
    campaign.measured("RSS growth over generate calls", round(growth / 1024, 2), "MiB",
                      f"{n} mixed generate calls after a 10-call warm-up (bound {RSS_BOUND_KIB // 1024} MiB); "
                      f"{1000 * elapsed / n:.1f} ms per call")
    assert growth < RSS_BOUND_KIB, f"RSS grew by {growth} KiB over {n} calls"


def test_add_delete_load_cycles_stay_flat_and_use_the_new_weights(campaign, tmp_path):
    pm = served_model()
    prompts = prompt_pool()
    ref = References(pm, prompts)
    pm.save_pretrained(str(tmp_path / "a"), selected_adapters=["a"])
    pm.save_pretrained(str(tmp_path / "b"), selected_adapters=["b"])
    saved = {"a": str(tmp_path / "a" / "a"), "b": str(tmp_path / "b" / "b")}
    # "y": a fresh adapter given the weights of "d" each cycle; its reference is d's
    d_weights = {k: p.detach().clone() for k, p in pm.named_parameters() if ".adapters.d." in k}
    n = campaign.cases(10)
    picks = [0, 1, 2, 3]

    def cycle(i: int) -> None:
        source = "ab"[i % 2]  # "x" is a's weights, then b's, then a's...: a stale bank would show
        pm.load_adapter(saved[source], adapter_name="x")
        pm.add_adapter("y", SAME)
        with torch.no_grad():
            for k, p in pm.named_parameters():
                if ".adapters.y." in k:
                    p.copy_(d_weights[k.replace(".adapters.y.", ".adapters.d.")])
        names = ["x", "y", "a", "c"] if i % 3 else ["y", "x", None, "b"]
        got = generate_mixed(pm, prompts, picks, names)
        for b, (p, name) in enumerate(zip(picks, names)):
            want = ref(p, {"x": source, "y": "d"}.get(name, name))
            assert torch.equal(got[b], want), (i, b, name, source)
        pm.delete_adapter("x")
        pm.delete_adapter("y")

    cycle(0)
    cycle(1)
    before, rss0 = resources(pm), rss_kib()
    for i in range(n):
        cycle(i)
    after, rss1 = resources(pm), rss_kib()
    campaign.tried("long_runs", n)
    _assert_flat(before, after)
    assert sorted(pm.peft_config) == sorted(ADAPTERS)
    for layer in pm._layers:  # no stack holds a deleted adapter
        assert all("x" not in names and "y" not in names for names in layer_mod._BANKS.get(
            getattr(layer, GENERATOR_ATTR), {}))
    growth = rss1 - rss0
    campaign.measured("RSS growth over add / delete / load cycles", round(growth / 1024, 2), "MiB",
                      f"{n} cycles (load, add, mixed generate, delete x2)")
    assert growth < RSS_BOUND_KIB


def test_failing_calls_in_a_long_run_leave_no_state_behind(campaign):
    """Calls that raise (bad arguments, a cache continued with other rows, an error inside the
    backbone's forward, a layer called alone) restore every context variable and leave nothing in
    the maps; the next call is served right."""
    from para_kernels.transformers import requests as req
    from para_kernels.transformers import state as st

    pm = served_model()
    prompts = prompt_pool()
    ref = References(pm, prompts)
    ids, mask = left_padded(prompts[:2])

    def prefilled():
        return pm(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values

    failing = [
        lambda: pm(input_ids=ids, adapter_names=["zz", "a"]),
        lambda: pm(input_ids=ids, adapter_names=["a"]),
        lambda: pm.generate(ids, adapter_names=["zz", "a"], max_new_tokens=2),
        lambda: pm(input_ids=ids + 1000),
        lambda: pm.generate(ids + 1000, max_new_tokens=2),
        lambda: pm(input_ids=ids[:1, :1], past_key_values=prefilled()),
        lambda: pm.get_base_model()(input_ids=ids[:1, :1], past_key_values=prefilled()),
        lambda: pm.get_base_model()(input_ids=ids + 1000),
        lambda: pm._layers[0](torch.zeros(1, 2, 32, dtype=torch.float64)),
    ]
    rng = random.Random(1)
    before = resources(pm)
    n = campaign.cases(20)
    for i in range(n):
        with torch.no_grad(), pytest.raises((ValueError, IndexError, RuntimeError)):
            failing[i % len(failing)]()
        assert (st.TOKENS.get(), req.WRAPPER_TOKENS.get(), st.ACTIVE.get(), req.OPENED.get(), st.SESSION.get(),
                st.CALL.get(), st.DISABLED.get()) == ((), (), None, None, None, st.NO_CALL, False), i
        picks, names = _random_call(rng, len(prompts))
        got = generate_mixed(pm, prompts, picks, names)
        for b, (p, name) in enumerate(zip(picks, names)):
            assert torch.equal(got[b], ref(p, name)), (i, b)
    campaign.tried("long_runs", n)
    _assert_flat(before, resources(pm))


# ------------------------------------------------------------------ the cache of stacked banks
def _mixed_logits(pm, names=("a", "b", "d", "c")) -> torch.Tensor:
    ids, mask = left_padded(prompt_pool()[:len(names)])
    with torch.no_grad():
        return pm(input_ids=ids, attention_mask=mask, adapter_names=list(names)).logits


def _uncached(pm, monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setattr(layer_mod, "BANK_CACHE_SIZE", 0)
        return fn(pm)


def _count_stacks(monkeypatch) -> list:
    calls = []
    real = layer_mod._stack

    def spy(tensors):
        if len(tensors) > 1:  # a copy (one adapter is a view, never cached)
            calls.append(len(tensors))
        return real(tensors)
    monkeypatch.setattr(layer_mod, "_stack", spy)
    return calls


def test_cached_bank_equals_uncached_and_is_reused(monkeypatch, campaign):
    pm = served_model()
    stacks = _count_stacks(monkeypatch)
    first = _mixed_logits(pm)
    built = len(stacks)
    assert built > 0
    again = _mixed_logits(pm)
    assert len(stacks) == built  # the second prefill stacked nothing
    assert torch.equal(again, first)
    assert torch.equal(_uncached(pm, monkeypatch, _mixed_logits), first)
    with torch.inference_mode():  # a stack built in inference mode serves a later no_grad forward
        layer_mod._BANKS.clear()
        inf = _mixed_logits(pm)
    assert torch.equal(inf, first) and torch.equal(_mixed_logits(pm), first)
    campaign.tried("long_runs", 4)


def _edits():
    def optimizer_step(pm):
        pm.set_adapter("b")  # b trains; a mixed forward with grad, backward, SGD step
        ids, mask = left_padded(prompt_pool()[:3])
        out = pm(input_ids=ids, attention_mask=mask, adapter_names=["a", "b", "d"])
        out.logits.square().mean().backward()
        params = [p for k, p in pm.named_parameters() if ".adapters.b." in k]
        assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        torch.optim.SGD(params, lr=1.0).step()
        pm.set_adapter("a")

    def in_place(pm):
        with torch.no_grad():
            for k, p in pm.named_parameters():
                if ".adapters.d." in k and k.endswith("w_up"):
                    p.mul_(-1.0)

    def data_assignment(pm):
        for k, p in pm.named_parameters():
            if ".adapters.b." in k and k.endswith("b_up"):
                p.data = p.data + 0.5

    def reload(pm, tmp):
        pm.delete_adapter("b")
        pm.add_adapter("b", SAME)
        randomize_adapter(pm, "b", seed=99, std=0.5)

    def load(pm, tmp):
        # d's file loaded as "b": the same signature, other weights
        pm.save_pretrained(tmp, selected_adapters=["d"])
        pm.delete_adapter("b")
        pm.load_adapter(tmp + "/d", adapter_name="b")

    return {"optimizer_step": optimizer_step, "in_place": in_place, "data_assignment": data_assignment,
            "delete_add": reload, "delete_load": load}


@pytest.mark.parametrize("edit", list(_edits()))
def test_cached_bank_follows_every_weight_change(edit, monkeypatch, campaign, tmp_path):
    pm = served_model()
    stale = _mixed_logits(pm)  # caches the stacks of {a, b, d}
    fn = _edits()[edit]
    fn(pm, str(tmp_path)) if edit.startswith("delete") else fn(pm)
    fresh = _mixed_logits(pm)
    want = _uncached(pm, monkeypatch, _mixed_logits)
    assert torch.equal(fresh, want), f"the cached bank was stale after {edit}"
    assert not torch.equal(fresh[:3], stale[:3])  # the edit did change the mixed rows
    campaign.tried("long_runs", 1)


def test_grad_forward_after_a_cached_no_grad_forward_trains_the_generators(monkeypatch, campaign):
    """A stack cached by a no_grad forward has no autograd history: a training forward must not
    reuse it (the gradient would not reach the parameters), and the training forward's stack
    must not be cached for a later no_grad forward."""
    def grads(pm):
        pm.set_adapter("b")
        pm.zero_grad(set_to_none=True)
        ids, mask = left_padded(prompt_pool()[:3])
        pm(input_ids=ids, attention_mask=mask, adapter_names=["a", "b", "d"]).logits.square().mean().backward()
        return {k: p.grad.clone() for k, p in pm.named_parameters() if ".adapters.b." in k}

    pm = served_model()
    _mixed_logits(pm)  # caches the stacks under no_grad
    got = grads(pm)
    want = _uncached(pm, monkeypatch, grads)
    assert got and all(g.abs().sum() > 0 for k, g in got.items() if not k.endswith(("w_sa", "act_params")))
    for k in want:
        assert torch.equal(got[k], want[k]), k
    out = _mixed_logits(pm)  # no_grad after the grad forward: no tensor with history was cached
    for layer in pm._layers:
        for _, _, bank in layer_mod._BANKS.get(getattr(layer, GENERATOR_ATTR), {}).values():
            assert all(t.grad_fn is None and not t.requires_grad for t in bank.values())
    assert torch.equal(out, _uncached(pm, monkeypatch, _mixed_logits))
    campaign.tried("long_runs", 1)


def _median_seconds(fn, reps: int) -> float:
    fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def test_prefill_time_saved_by_the_bank_cache(monkeypatch, campaign):
    """Reported, not asserted (timing on a shared machine): a whole prefill of a small model
    (hidden 256, 4 layers, 4 adapters of r 32, one row each), and one layer's bank at the sizes of
    a 7B Llama (d 4096, N = 4096 + 1024 + 11008, r 12, 8 adapters), times 32 layers."""
    model = tiny_llama(hidden=256, intermediate=688, layers=4)
    config = PARAConfig(r=32)
    pm = get_para_model(model, config, adapter_name="a0")
    names = [f"a{i}" for i in range(4)]
    for i, name in enumerate(names):
        if i:
            pm.add_adapter(name, config)
        randomize_adapter(pm, name, seed=i + 1, std=0.1)
    ids = torch.randint(3, 128, (4, 8), generator=torch.Generator().manual_seed(0))

    def prefill():
        with torch.no_grad():
            return pm(input_ids=ids, adapter_names=names).logits

    generator = layer_mod.PARAGenerator()
    big = PARAConfig(r=12)
    for i in range(8):
        generator.adapters[f"a{i}"] = layer_mod.AdapterWeights(big, 4096, 4096 + 1024 + 11008, torch.float32)

    def bank():
        with torch.no_grad():
            return generator.bank([f"a{i}" for i in range(8)])

    def interleaved(fn, reps: int) -> tuple[float, float]:  # (cached, uncached): alternated, so drift hits both
        times: dict = {8: [], 0: []}
        for _ in range(reps):
            for size in (8, 0):
                monkeypatch.setattr(layer_mod, "BANK_CACHE_SIZE", size)
                times[size].append(_median_seconds(fn, 1))
        monkeypatch.setattr(layer_mod, "BANK_CACHE_SIZE", 8)
        return statistics.median(times[8]), statistics.median(times[0])

    want = prefill()
    cached, uncached = interleaved(prefill, 40)
    cached_bank, uncached_bank = interleaved(bank, 15)
    monkeypatch.setattr(layer_mod, "BANK_CACHE_SIZE", 0)
    assert torch.equal(prefill(), want)
    campaign.tried("long_runs", 1)
    campaign.measured("prefill time saved by the bank cache (small model)", round(1000 * (uncached - cached), 3),
                      "ms", f"median prefill {1000 * uncached:.2f} ms uncached, {1000 * cached:.2f} ms cached: "
                      "4 adapters (r 32) x 4 layers, hidden 256, batch 4 x 8 tokens, CPU, one thread")
    campaign.measured("prefill time saved by the bank cache (7B-sized banks)",
                      round(32 * 1000 * (uncached_bank - cached_bank), 2), "ms",
                      f"one layer's stack of 8 adapters (d 4096, N 16128, r 12): {1e6 * uncached_bank:.0f} us "
                      f"uncached, {1e6 * cached_bank:.1f} us cached (the check of 32 tensors' versions), x 32 "
                      "layers; CPU, one thread")


def test_training_loop_then_serving_uses_the_trained_weights(monkeypatch, campaign):
    """Alternating optimizer steps (mixed batches, grad) and no_grad serving calls: each served
    prefill equals an uncached one."""
    pm = served_model()
    pm.set_adapter("d")
    params = [p for k, p in pm.named_parameters() if ".adapters.d." in k]
    opt = torch.optim.Adam(params, lr=0.05)
    ids, mask = left_padded(prompt_pool()[:3])
    steps = campaign.cases(5)
    previous = None
    for _ in range(steps):
        opt.zero_grad()
        pm(input_ids=ids, attention_mask=mask, adapter_names=["a", "b", "d"]).logits.square().mean().backward()
        opt.step()
        served = _mixed_logits(pm)
        assert torch.equal(served, _uncached(pm, monkeypatch, _mixed_logits))
        if previous is not None:
            assert not torch.equal(served[2], previous[2])  # d's row follows the training
        previous = served
    campaign.tried("long_runs", steps)
