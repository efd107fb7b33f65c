"""Concurrency: threads (and asyncio tasks) serving one model at once, with mixed adapters, batch
sizes, generate and manual decode loops on KV caches interleaved, disable_adapter() in some
callers, and an admin thread loading / adding / deleting other adapters meanwhile. Every result
must equal the same request run alone, in turn (bitwise: fp64, one intra-op thread)."""
from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
import torch
from serving import (
    ROUTES,
    References,
    generate_mixed,
    left_padded,
    prompt_pool,
    resources,
    served_model,
)

from para_kernels import PARAConfig
from para_kernels.transformers.state import RequestStateError

THREADS = 4
SECONDS = 2.0  # per scale unit, for the threaded run
KINDS = ("generate", "decode", "disabled", "uncached")


def _specs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        batch = rng.randint(1, 4)
        out.append({"kind": KINDS[i % len(KINDS)], "picks": [rng.randrange(8) for _ in range(batch)],
                    "names": [rng.choice(ROUTES) for _ in range(batch)]})
    return out


def _decode_steps(pm, prompts, spec, steps: int = 3):
    """A manual decode loop (prefill + steps - 1 decode forwards on the model's own cache); a
    generator that yields between forwards, so asyncio tasks can interleave on it. Returns (via
    StopIteration) the last-position logits of every step."""
    ids, mask = left_padded([prompts[p] for p in spec["picks"]])
    logits, cache = [], None
    x = ids
    for _ in range(steps):
        with torch.no_grad():
            out = pm(input_ids=x, attention_mask=mask, past_key_values=cache, use_cache=True,
                     adapter_names=spec["names"])
        cache = out.past_key_values
        logits.append(out.logits[:, -1])
        x = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(x)], 1)
        yield
    return torch.stack(logits, 1)


def _drain(gen):
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


def run(pm, prompts, spec) -> torch.Tensor:
    kind = spec["kind"]
    if kind == "decode":
        return _drain(_decode_steps(pm, prompts, spec))
    if kind == "disabled":
        with pm.disable_adapter():  # this caller only: the others keep their adapters
            return generate_mixed(pm, prompts, spec["picks"], [None] * len(spec["picks"]))
    return generate_mixed(pm, prompts, spec["picks"], spec["names"], use_cache=kind != "uncached")


# scales k_proj, which no served adapter does: adding it hooks modules in the middle of others' requests
NEW_MODULES = PARAConfig(r=4, target_modules={"q": "self_attn.k_proj", "v": "self_attn.v_proj", "up": "mlp.up_proj"})


def _admin_cycle(pm, prompts, ref, saved: str) -> None:
    """Load a's file as x, add y, serve a batch on them, delete both: while others serve."""
    pm.load_adapter(saved, adapter_name="x")
    pm.add_adapter("y", NEW_MODULES)  # W_up = b_up = 0: the bare backbone's tokens
    got = generate_mixed(pm, prompts, [0, 1], ["x", "y"])
    assert torch.equal(got[0], ref(0, "a")) and torch.equal(got[1], ref(1, None))
    pm.delete_adapter("x")
    pm.delete_adapter("y")


def test_threads_serving_one_model_equal_sequential(campaign, tmp_path):
    pm = served_model()
    prompts = prompt_pool()
    ref = References(pm, prompts)
    specs = _specs(24)
    expected = [run(pm, prompts, s) for s in specs]  # the sequential reference (and a warm-up)
    for s, want in zip(specs, expected):  # which equals each row alone
        if s["kind"] != "decode":
            for b, p in enumerate(s["picks"]):
                assert torch.equal(want[b], ref(p, None if s["kind"] == "disabled" else s["names"][b]))
    pm.save_pretrained(str(tmp_path), selected_adapters=["a"])
    saved = str(tmp_path / "a")
    for p in (0, 1):
        ref(p, "a"), ref(p, None)
    _admin_cycle(pm, prompts, ref, saved)  # its hooks on k_proj are installed once, before `before`
    start = time.perf_counter()
    for s in specs:
        run(pm, prompts, s)
    sequential = len(specs) / (time.perf_counter() - start)
    before = resources(pm)

    errors, done, cycles = [], [0] * THREADS, [0]
    stop = threading.Event()

    def serve(t: int) -> None:
        rng = random.Random(100 + t)
        try:
            while not stop.is_set():
                i = rng.randrange(len(specs))
                got = run(pm, prompts, specs[i])
                if not torch.equal(got, expected[i]):
                    errors.append(f"thread {t}: request {i} ({specs[i]}) differs from its sequential run")
                done[t] += 1
        except Exception as e:  # noqa: BLE001 (reported below with the thread)
            errors.append(f"thread {t}: {type(e).__name__}: {e}")

    def admin() -> None:
        try:
            while not stop.is_set():
                _admin_cycle(pm, prompts, ref, saved)
                cycles[0] += 1
                time.sleep(0.05)
        except Exception as e:  # noqa: BLE001
            errors.append(f"admin: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=serve, args=(t,)) for t in range(THREADS)]
    threads.append(threading.Thread(target=admin))
    seconds = SECONDS * campaign.scale
    start = time.perf_counter()
    for th in threads:
        th.start()
    time.sleep(seconds)
    stop.set()
    for th in threads:
        th.join(timeout=120)
    elapsed = time.perf_counter() - start
    assert not any(th.is_alive() for th in threads)
    assert not errors, errors[:5]
    total = sum(done)
    campaign.tried("concurrency", total + cycles[0])
    after = resources(pm)
    assert after["cache_states"] == 0 and after["request_states"] == 0
    assert {k: after[k] for k in ("hooks", "handles", "parameters", "modules")} == \
        {k: before[k] for k in ("hooks", "handles", "parameters", "modules")}
    assert min(done) > 0 and cycles[0] > 0
    campaign.measured("throughput, 4 threads vs sequential", round(total / elapsed, 1), "requests/s",
                      f"sequential {sequential:.1f} requests/s ({total / elapsed / sequential:.2f}x); "
                      f"{total} requests and {cycles[0]} admin load/add/delete cycles in {elapsed:.1f} s; the "
                      "machine's 2 cores (shared with other jobs) and the GIL cap the gain: tiny models are "
                      "per-op Python overhead")


def test_asyncio_tasks_interleaving_decode_loops_equal_sequential(campaign):
    """Tasks that yield between the forwards of their decode loops (each with its own cache,
    adapters, and disable_adapter() held across awaits in some): each equals its run alone."""
    pm = served_model()
    prompts = prompt_pool()
    specs = [dict(s, kind="decode") for s in _specs(campaign.cases(8), seed=5)]
    disabled = [i % 3 == 0 for i in range(len(specs))]

    def alone(spec, off):
        if off:
            with pm.disable_adapter():
                return _drain(_decode_steps(pm, prompts, spec))
        return _drain(_decode_steps(pm, prompts, spec))

    expected = [alone(s, off) for s, off in zip(specs, disabled)]

    async def task(spec, off):
        gen = _decode_steps(pm, prompts, spec)
        if off:
            with pm.disable_adapter():
                return await _interleaved(gen)
        return await _interleaved(gen)

    async def _interleaved(gen):
        try:
            while True:
                next(gen)
                await asyncio.sleep(0)
        except StopIteration as stop:
            return stop.value

    async def main():
        return await asyncio.gather(*(task(s, off) for s, off in zip(specs, disabled)))

    got = asyncio.run(main())
    for i, (g, w) in enumerate(zip(got, expected)):
        assert torch.equal(g, w), (i, specs[i], disabled[i])
    campaign.tried("concurrency", len(specs))
    assert resources(pm)["cache_states"] == 0


# ------------------------------------------------------------------ interleavings, made deterministic
def _during_forward(pm, action):
    """Run ``action`` once from inside the next forward, between layer 0's pre-hook and its
    attention: the point another thread's add / delete may land in a running request."""
    done = []

    def hook(module, args):
        if not done:
            done.append(1)
            action()
    return pm._layers[0].self_attn.register_forward_pre_hook(hook)


def test_adapter_added_mid_request_leaves_it_alone(campaign):
    """add_adapter hooks modules no resident adapter scaled (k_proj here) while another request is
    in its forward: that request has no scale for them (its scales list predates them)."""
    pm = served_model()
    ids, mask = left_padded(prompt_pool()[:2])
    with torch.no_grad():
        want = pm(input_ids=ids, attention_mask=mask, adapter_names=["a", "c"], use_cache=True)
    handle = _during_forward(pm, lambda: pm.add_adapter("y", NEW_MODULES))
    with torch.no_grad():
        got = pm(input_ids=ids, attention_mask=mask, adapter_names=["a", "c"], use_cache=True)
    handle.remove()
    assert torch.equal(got.logits, want.logits)
    nxt = want.logits[:, -1:].argmax(-1)
    steps = []
    for out in (want, got):  # both caches continue (the earlier one: prefilled before y existed)
        with torch.no_grad():
            steps.append(pm(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                            past_key_values=out.past_key_values, adapter_names=["a", "c"]).logits)
    assert torch.equal(steps[0], steps[1])
    campaign.tried("concurrency", 2)


def test_adapter_deleted_mid_prefill_raises_a_request_error(campaign):
    pm = served_model()
    ids, mask = left_padded(prompt_pool()[:2])
    handle = _during_forward(pm, lambda: pm.delete_adapter("b"))
    with torch.no_grad(), pytest.raises(RequestStateError, match="'b' was deleted while a request using it"):
        pm(input_ids=ids, attention_mask=mask, adapter_names=["a", "b"])
    handle.remove()
    after = resources(pm)
    assert after["cache_states"] == 0 and after["request_states"] == 0
    with torch.no_grad():  # the model serves on
        pm(input_ids=ids, attention_mask=mask, adapter_names=["a", "d"])
    campaign.tried("concurrency", 1)


def test_adapter_deleted_after_the_names_were_checked_raises_a_request_error(campaign):
    """The window between a call's name check and its prefill's grouping: another thread deletes
    one of the call's adapters there. The grouping refuses with RequestStateError, not KeyError."""
    pm = served_model()
    ids, mask = left_padded(prompt_pool()[:2])
    route = pm._requests.route

    def route_then_delete(call, batch):
        rows = route(call, batch)
        pm.delete_adapter("b")
        return rows

    pm._requests.route = route_then_delete
    try:
        with torch.no_grad(), pytest.raises(RequestStateError, match="'b' was deleted while this request was starting"):
            pm(input_ids=ids, attention_mask=mask, adapter_names=["a", "b"])
    finally:
        del pm._requests.route
    after = resources(pm)
    assert after["cache_states"] == 0 and after["request_states"] == 0
    with torch.no_grad():  # the model serves on
        pm(input_ids=ids, attention_mask=mask, adapter_names=["a", "d"])
    campaign.tried("concurrency", 1)
