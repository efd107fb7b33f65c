"""Vectors belong to their request (docs/requests.md): uncached generate equals cached on every
tested architecture, interleaved requests keep their own vectors, threads never share state,
packed rows equal their examples unpacked, and what PARA cannot serve raises a clear error."""
from __future__ import annotations

import threading

import pytest
import torch
from transformers import DynamicCache

from para_kernels import PARAConfig, get_para_model
from para_kernels.transformers.state import ACTIVE, RequestStateError, checkpoint_context_fn

from kit import rel_err
from kit.models import ARCHITECTURES, PAD, batch_inputs, randomize_adapter, tiny_llama, tiny_model

# the single_thread fixture: tests/wrapper/conftest.py
pytestmark = pytest.mark.usefixtures("single_thread")


def _adapters_a_and_b(model):
    """'a' (last pooler) and 'b' (mean pooler, another signature), both with nonzero weights."""
    pm = get_para_model(model, PARAConfig(r=4), adapter_name="a")
    pm.add_adapter("b", PARAConfig(r=5, pooler="mean", activation="silu"))
    randomize_adapter(pm, "a", seed=3, std=0.5)
    randomize_adapter(pm, "b", seed=4, std=0.5)
    return pm


# ---------------------------------------------------------------------------- 1. uncached steps
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_uncached_greedy_equals_cached(arch):
    """use_cache=False re-runs the whole text at every step; the vectors must still be the
    prompt's (the first forward of the generate call), not the prompt + generated tokens'."""
    model = tiny_model(arch)
    pm = _adapters_a_and_b(model)
    ids, mask = batch_inputs(3, 7, pads=[0, 3, 1], seed=5)
    rows = ["b", None, "a"]
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, adapter_names=rows,
              return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        cached = pm.generate(ids, use_cache=True, **kw)
        uncached = pm.generate(ids, use_cache=False, **kw)
        bare = pm.generate(ids, use_cache=True, **{**kw, "adapter_names": [None] * 3})
    assert torch.equal(cached.sequences, uncached.sequences), (cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        assert rel_err(b, a) < 1e-4
    # the adapters do change these rows (else the equality above would prove nothing)
    assert rel_err(cached.logits[0][[0, 2]], bare.logits[0][[0, 2]]) > 1e-3


@pytest.mark.parametrize("mode", ["beam", "sample", "prompt_lookup", "assistant"])
def test_uncached_equals_cached_beyond_greedy(mode):
    """Beam search, seeded sampling and decoding that feeds several tokens per step."""
    model = tiny_llama(dtype=torch.float64)
    pm = _adapters_a_and_b(model)
    ids, mask = batch_inputs(2, 8, pads=[2, 0], seed=6)
    kw = dict(attention_mask=mask, max_new_tokens=6, adapter_names=["a", "b"])
    if mode == "beam":
        kw.update(num_beams=3, num_return_sequences=2, do_sample=False)
    elif mode == "sample":
        kw.update(do_sample=True, top_k=20)
    elif mode == "prompt_lookup":
        kw.update(prompt_lookup_num_tokens=3, do_sample=False)
    else:  # speculative: a bare copy of the backbone proposes the tokens
        kw.update(assistant_model=tiny_llama(dtype=torch.float64), do_sample=False)
    if mode in ("prompt_lookup", "assistant"):  # these modes take one row
        ids, kw["attention_mask"] = batch_inputs(1, 8, pads=[0], seed=6)
        kw["adapter_names"] = ["b"]
    out = {}
    for use_cache in (True, False):
        if use_cache or mode in ("beam", "sample"):  # transformers' assisted decoding needs a cache
            torch.manual_seed(0)
            with torch.no_grad():
                out[use_cache] = pm.generate(ids, use_cache=use_cache, **kw)
    if mode in ("prompt_lookup", "assistant"):  # several tokens per step: the same as plain greedy
        plain = {k: v for k, v in kw.items() if k not in ("prompt_lookup_num_tokens", "assistant_model")}
        with torch.no_grad():
            out[False] = pm.generate(ids, use_cache=False, **plain)
    assert torch.equal(out[True], out[False])


# ---------------------------------------------------------------------------- 2. interleaved
def test_interleaved_requests_keep_their_own_vectors():
    """out = pm(p1); pm(p2); pm(next, past_key_values=out.past_key_values) continues p1 with p1's
    vectors: the same logits as continuing p1 with nothing in between."""
    pm = _adapters_a_and_b(tiny_llama())
    p1, _ = batch_inputs(2, 6, pads=[0, 0], seed=1)
    p2, _ = batch_inputs(2, 9, pads=[0, 0], seed=2)
    nxt = torch.tensor([[5], [7]])
    with torch.no_grad():
        alone = pm(p1, use_cache=True)
        ref = pm(nxt, past_key_values=alone.past_key_values).logits
        out = pm(p1, use_cache=True)
        pm(p2, use_cache=True)  # another request in between, with its own cache
        pm(p2, use_cache=False)  # and one without
        got = pm(nxt, past_key_values=out.past_key_values).logits
        assert torch.equal(got, ref)
        assert pm.request_state(out.past_key_values) is not pm.request_state(alone.past_key_values)


def test_continuing_an_unknown_cache_is_an_error():
    """A cache PARA did not prefill (the bare model's, or one filled elsewhere) has no vectors."""
    model = tiny_llama()
    ids, _ = batch_inputs(2, 6, pads=[0, 0], seed=1)
    with torch.no_grad():
        bare_cache = model(ids, use_cache=True).past_key_values
    pm = _adapters_a_and_b(model)
    with torch.no_grad(), pytest.raises(RequestStateError, match="no vectors for"):
        pm(torch.tensor([[5], [7]]), past_key_values=bare_cache)
    with torch.no_grad(), pytest.raises(RequestStateError, match="no vectors for"):
        pm.generate(ids, past_key_values=bare_cache, max_new_tokens=2)


def test_continuing_with_other_rows_or_adapters_is_an_error():
    pm = _adapters_a_and_b(tiny_llama())
    ids, _ = batch_inputs(2, 6, pads=[0, 0], seed=1)
    with torch.no_grad():
        cache = pm(ids, use_cache=True, adapter_names=["a", "b"]).past_key_values
        with pytest.raises(RequestStateError, match="prefilled with 2 rows"):
            pm(torch.tensor([[5]]), past_key_values=cache)
        with pytest.raises(RequestStateError, match="differ from those this request was prefilled with"):
            pm(torch.tensor([[5], [6]]), past_key_values=cache, adapter_names=["b", "a"])
        with pm.disable_adapter(), pytest.raises(RequestStateError, match="disable_adapter"):
            pm(torch.tensor([[5], [6]]), past_key_values=cache)
        pm(torch.tensor([[5], [6]]), past_key_values=cache, adapter_names=["a", "b"])  # the same: fine
    assert ACTIVE.get() is None  # every error left the running state as it was


def test_a_layer_called_on_its_own_is_an_error():
    model = tiny_llama()
    pm = _adapters_a_and_b(model)
    layer = model.model.layers[0]
    x = torch.randn(1, 3, model.config.hidden_size)
    with pytest.raises(RequestStateError, match="outside a forward of its PARAModel"):
        layer(x, position_embeddings=model.model.rotary_emb(x, torch.arange(3)[None]))
    del pm


# ---------------------------------------------------------------------------- 3. multi-turn
def test_new_turn_keeps_the_first_prompt_vectors_and_reprefill_recomputes():
    pm = _adapters_a_and_b(tiny_llama(dtype=torch.float64))
    turn1, _ = batch_inputs(1, 6, pads=[0], seed=1)
    cache = DynamicCache()
    with torch.no_grad():
        first = pm.generate(turn1, past_key_values=cache, max_new_tokens=3, do_sample=False,
                            adapter_names=["a"])
        state = pm.request_state(cache)
        vectors = [s.clone() for _, s in state.vectors()]
        turn2 = torch.cat([first, batch_inputs(1, 4, pads=[0], seed=2)[0]], 1)
        # a new user turn continues the cache: the first prompt's vectors, unchanged
        second = pm.generate(turn2, past_key_values=cache, max_new_tokens=3, do_sample=False,
                             adapter_names=["a"])
        assert pm.request_state(cache) is state
        assert all(torch.equal(a, s) for a, (_, s) in zip(vectors, state.vectors()))
        # re-prefill: the whole conversation is the new prompt, as if it were sent fresh
        turn3 = torch.cat([second, batch_inputs(1, 3, pads=[0], seed=3)[0]], 1)
        kw = dict(max_new_tokens=3, do_sample=False, adapter_names=["a"], return_dict_in_generate=True,
                  output_logits=True)
        continued = pm.generate(turn3, past_key_values=cache, **kw)
        again = pm.generate(turn3, past_key_values=cache, reprefill=True, **kw)
        fresh = pm.generate(turn3, **kw)
        assert torch.equal(again.sequences, fresh.sequences)
        assert rel_err(again.logits[0], fresh.logits[0]) < 1e-12
        assert pm.request_state(cache) is not state
        assert rel_err(continued.logits[0], again.logits[0]) > 1e-3  # the two policies really differ


# ---------------------------------------------------------------------------- 4. threads
def test_threads_get_what_they_get_alone():
    """4 threads x 10 mixed-adapter generates on one PARAModel == the same calls one by one."""
    pm = _adapters_a_and_b(tiny_llama())
    names = [["a", "b"], ["b", None], [None, "a"], ["a", "a"], ["b", "b"]]
    jobs = []
    for t in range(4):
        for j in range(10):
            ids, mask = batch_inputs(2, 5 + (t + j) % 4, pads=[(t + j) % 3, 0], seed=100 * t + j)
            jobs.append((ids, mask, names[(t + 2 * j) % len(names)], bool(j % 2)))

    def run(job):
        ids, mask, rows, use_cache = job
        with torch.no_grad():
            return pm.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, adapter_names=rows,
                               use_cache=use_cache)

    expected = [run(job) for job in jobs]
    results, errors = [None] * len(jobs), []

    def worker(t):
        try:
            torch.set_num_threads(1)
            for j in range(10):
                results[10 * t + j] = run(jobs[10 * t + j])
        except Exception as e:  # reported below, with the thread
            errors.append((t, repr(e)))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    wrong = [k for k, (a, b) in enumerate(zip(results, expected)) if not torch.equal(a, b)]
    assert not wrong, f"{len(wrong)} of {len(jobs)} generates differ from the sequential run: {wrong}"


def test_disable_adapter_is_private_to_its_thread():
    pm = _adapters_a_and_b(tiny_llama())
    ids, _ = batch_inputs(1, 6, pads=[0], seed=1)
    with torch.no_grad():
        adapted, bare = pm(ids).logits, pm(ids, adapter_names=[None]).logits
        seen = []
        with pm.disable_adapter():
            th = threading.Thread(target=lambda: seen.append(pm(ids).logits))
            th.start()
            th.join()
            inside = pm(ids).logits
    assert torch.equal(inside, bare) and torch.equal(seen[0], adapted)


# ---------------------------------------------------------------------------- 5. packed rows
def _pack(examples):
    """One row holding ``examples`` (1-D id tensors) back to back: (ids [1, W], position_ids
    [1, W], 4-D block-diagonal causal mask [1, 1, W, W], additive: 0 = attend, -inf = not;
    transformers reads a boolean 4-D mask as additive too, so it must be given this way)."""
    width = sum(len(e) for e in examples)
    ids = torch.full((1, width), PAD, dtype=torch.long)
    pos = torch.zeros(1, width, dtype=torch.long)
    mask = torch.zeros(1, 1, width, width, dtype=torch.bool)
    at = 0
    for e in examples:
        n = len(e)
        ids[0, at:at + n] = e
        pos[0, at:at + n] = torch.arange(n)
        mask[0, 0, at:at + n, at:at + n] = torch.ones(n, n, dtype=torch.bool).tril()
        at += n
    additive = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    return ids, pos, additive


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("prompt_from", ["labels", "prompt_lengths"])
def test_packed_rows_equal_unpacked_examples(arch, prompt_from):
    """Two rows packing 2 and 3 examples (as DataCollatorWithFlattening makes them, with a
    block-diagonal mask so that attention separates them on the CPU): every example's logits and
    the adapters' gradients equal running the examples one by one."""
    model = tiny_model(arch, dtype=torch.float64)
    pm = _adapters_a_and_b(model)  # eval mode: no dropout (GPT-2 has some), gradients all the same
    g = torch.Generator().manual_seed(7)
    lengths = [[5, 8], [4, 6, 3]]  # 13 tokens in each row
    prompts = [[2, 3], [1, 4, 2]]
    examples = [[torch.randint(3, 128, (n,), generator=g) for n in row] for row in lengths]
    rows = ["a", "b"]
    packed = [_pack(row) for row in examples]
    ids, pos, mask = (torch.cat(t) for t in zip(*packed))
    labels = ids.clone()
    at = [0, 0]
    for r, row in enumerate(lengths):
        for n, p in zip(row, prompts[r]):
            labels[r, at[r]:at[r] + p] = -100
            at[r] += n
    kw = dict(labels=labels) if prompt_from == "labels" else dict(prompt_lengths=sum(prompts, []))
    out = pm(ids, attention_mask=mask, position_ids=pos, adapter_names=rows, **kw)
    grads_packed = torch.autograd.grad(out.logits[labels != -100].logsumexp(-1).sum(),
                                       [p for p in pm.parameters() if p.requires_grad])
    total = 0
    at = [0, 0]
    for r, row in enumerate(examples):
        for e, p in zip(row, prompts[r]):
            n = len(e)
            alone = pm(e[None], adapter_names=[rows[r]], prompt_lengths=[p]).logits[0]
            # 1e-5: the bare tiny LLaMA packed with this mask is already ~1e-7 from its unpacked self
            # (fp32 rotary tables); a wrong vector for an example gives errors of order 1
            assert rel_err(out.logits[r, at[r]:at[r] + n].detach(), alone.detach()) < 1e-5
            keep = labels[r, at[r]:at[r] + n] != -100
            total = total + alone[keep].logsumexp(-1).sum()
            at[r] += n
    grads_alone = torch.autograd.grad(total, [p for p in pm.parameters() if p.requires_grad])
    assert len(grads_alone) > 0
    for a, b in zip(grads_packed, grads_alone):
        assert rel_err(a, b) < 1e-5


def test_packed_rows_per_token_vectors_without_a_block_mask():
    """Without a block-diagonal mask (attention across examples, as eager attention on the CPU
    does with packed position_ids) the vectors are still per example: the pooled prompt of the
    first example and the whole-row scale layout are checked through the request state."""
    pm = _adapters_a_and_b(tiny_llama(dtype=torch.float64))
    ids, pos, _ = _pack([torch.arange(3, 9), torch.arange(10, 14)])
    seen = {}
    layer = pm.get_base_model().model.layers[0]
    h = layer.register_forward_pre_hook(lambda m, a, k: seen.setdefault("state", ACTIVE.get()) and None,
                                        with_kwargs=True)
    with torch.no_grad():
        pm(ids, position_ids=pos, adapter_names=["a"])
    h.remove()
    st = seen["state"]
    assert st.start.tolist() == [0, 6] and st.end.tolist() == [6, 10]
    assert st.token_rows.tolist() == [0] * 6 + [1] * 4
    assert all(s.shape[0] == 2 for _, s in st.vectors())


def _layer0_scales(pm, run):
    """{module index: scale} of layer 0 from the request state of the forward ``run()`` makes."""
    seen = {}
    layer = pm.get_base_model().model.layers[0]
    h = layer.register_forward_hook(lambda m, a, out: seen.setdefault("state", ACTIVE.get()) and None)
    try:
        with torch.no_grad():
            run()
    finally:
        h.remove()
    return {k: seen["state"].scales[k] for (i, _), k in pm._module_index.items() if i == 0}


def test_data_collator_with_flattening_gives_each_example_its_prompt():
    """transformers' DataCollatorWithFlattening rows (no mask, positions restarting, the prompt
    as each example's -100 label prefix): layer 0's vectors of every example equal those of the
    example run alone (layer 0 reads the embeddings, so no attention is involved)."""
    from transformers import DataCollatorWithFlattening

    pm = _adapters_a_and_b(tiny_llama(dtype=torch.float64))
    g = torch.Generator().manual_seed(11)
    shapes = [(7, 3), (5, 2), (9, 6)]  # (tokens, prompt tokens)
    features = []
    for n, p in shapes:
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        features.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    batch = DataCollatorWithFlattening()(features)
    assert batch["input_ids"].shape == (1, sum(n for n, _ in shapes)) and "attention_mask" not in batch
    packed = _layer0_scales(pm, lambda: pm(**batch, adapter_names=["b"]))
    for e, f in enumerate(features):
        alone = _layer0_scales(pm, lambda f=f: pm(input_ids=torch.tensor([f["input_ids"]]),
                                                  labels=torch.tensor([f["labels"]]), adapter_names=["b"]))
        for k, s in alone.items():
            assert rel_err(packed[k][e], s[0]) < 1e-12, (e, k)


def test_packed_prompt_lengths_must_match_the_examples():
    pm = _adapters_a_and_b(tiny_llama())
    ids, pos, _ = _pack([torch.arange(3, 9), torch.arange(10, 14)])
    with pytest.raises(ValueError, match="one integer per packed example: these rows hold 2"):
        pm(ids, position_ids=pos, prompt_lengths=[3])
    with pytest.raises(ValueError, match="does not fit"):
        pm(ids, position_ids=pos, prompt_lengths=[3, 5])


def test_packed_rows_cannot_be_continued():
    pm = _adapters_a_and_b(tiny_llama())
    ids, pos, _ = _pack([torch.arange(3, 9), torch.arange(10, 14)])
    with torch.no_grad():
        cache = pm(ids, position_ids=pos, use_cache=True).past_key_values
        with pytest.raises(RequestStateError, match="no vectors for"):
            pm(torch.tensor([[5]]), past_key_values=cache)


# ---------------------------------------------------------------------------- 6. continuous batching
def test_continuous_batching_is_a_clear_error():
    model = tiny_llama()
    pm = _adapters_a_and_b(model)
    if not hasattr(model, "generate_batch"):
        pytest.skip("this transformers has no continuous batching")
    for call in (pm.generate_batch, model.generate_batch, getattr(model, "init_continuous_batching", None)):
        if call is not None:
            with pytest.raises(NotImplementedError, match="continuous batching"):
                call([[5, 6, 7]])
    pm.unload()
    assert "generate_batch" not in vars(model) and "generate" not in vars(model)


# ---------------------------------------------------------------------------- 7. checkpointing
class _CheckpointCall(torch.nn.Module):
    """A decoder layer whose whole ``__call__`` (PARA's pre-hook included) is checkpointed, as
    transformers before 5.2x did; newer versions checkpoint only ``forward``."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(self.layer, *args, use_reentrant=False,
                                                 context_fn=checkpoint_context_fn(), **kwargs)


@pytest.mark.parametrize("wrapped", ["forward", "call"])
def test_checkpoint_recompute_uses_the_forward_request(wrapped):
    """Activation checkpointing recomputes each layer in backward, after the forward's state
    was popped: the gradients equal those without checkpointing, for residual and normed
    pooling, whether the checkpoint holds the layer's forward or its whole call."""
    grads = {}
    for ckpt in (False, True):
        model = tiny_llama(dtype=torch.float64)
        pm = _adapters_a_and_b(model)
        pm.add_adapter("n", PARAConfig(r=3, pool_input="normed", pooler="attn"))
        randomize_adapter(pm, "n", seed=5, std=0.5)
        pm.set_adapter("n")
        pm.train()
        if ckpt and wrapped == "forward":
            pm.gradient_checkpointing_enable()
        elif ckpt:
            layers = model.model.layers
            for i in range(len(layers)):
                layers[i] = _CheckpointCall(layers[i])
        ids, mask = batch_inputs(3, 7, pads=[0, 2, 1], seed=9)
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :4] = -100
        loss = pm(ids, attention_mask=mask, labels=labels, adapter_names=["a", "b", "n"], use_cache=False).loss
        params = [p for p in pm.parameters() if p.requires_grad]
        grads[ckpt] = torch.autograd.grad(loss, params)
    assert len(grads[True]) == len(grads[False]) > 0
    for a, b in zip(grads[False], grads[True]):
        assert rel_err(b, a) < 1e-10
