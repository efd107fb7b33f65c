"""Generation with PARA (docs/spec.md §2): vectors from the prefill only, reused at every decode
step; left padding, sampling and beam search with per-row adapters."""
from __future__ import annotations

import pytest
import torch

import para_kernels
from para_kernels import PARAConfig, get_para_model

from kit.models import randomize_adapter, tiny_llama

# the single_thread fixture: tests/wrapper/conftest.py
pytestmark = pytest.mark.usefixtures("single_thread")

NEW = 5


def _model_with_adapters():
    """fp64 tiny model with two nonzero adapters of different generator signatures."""
    model = tiny_llama(dtype=torch.float64)
    pm = get_para_model(model, PARAConfig(r=4), adapter_name="a")
    pm.add_adapter("b", PARAConfig(r=4, pooler="mean", activation="silu"))
    randomize_adapter(pm, "a", seed=1, std=0.5)
    randomize_adapter(pm, "b", seed=2, std=0.5)
    return model, pm


def _left_padded(lengths, seed=4):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    rows = []
    for b, n in enumerate(lengths):
        row = torch.randint(3, 128, (n,), generator=gen)
        rows.append(row)
        ids[b, width - n:] = row
        mask[b, width - n:] = 1
    return ids, mask, rows


def _count_calls(monkeypatch, name):
    calls = []
    real = getattr(para_kernels.ops, name)

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(para_kernels.ops, name, spy)
    return calls


def test_vectors_are_computed_once_at_prefill_and_reused(monkeypatch):
    model, pm = _model_with_adapters()
    ids, mask, _ = _left_padded([6, 4])
    calls = _count_calls(monkeypatch, "pool_generate")
    with torch.no_grad():
        out = pm.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    n_layers = len(model.model.layers)
    assert out.shape == (2, ids.shape[1] + NEW)
    assert len(calls) == n_layers  # one fused pool -> generate per layer, at prefill only
    assert all(shape[0] == 2 for shape in calls)

    # the same tokens without a KV cache: every step re-runs the whole sequence, pooling the
    # original prompt only (prompt_lengths), so the cached values were scaled correctly
    seq, m = ids, mask
    with torch.no_grad():
        for _ in range(NEW):
            logits = pm(input_ids=seq, attention_mask=m, prompt_lengths=mask.sum(1), use_cache=False).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(out, seq)

    with torch.no_grad():
        again = pm.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
        with pm.disable_adapter():
            bare = pm.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(again, out)  # no state left over from the previous generate
    assert not torch.equal(bare, out)  # the adapter does change the continuation


def test_left_padded_batch_with_mixed_adapters_equals_each_row_alone():
    _, pm = _model_with_adapters()
    names = ["a", None, "b", "a"]
    ids, mask, rows = _left_padded([7, 5, 3, 4])
    with torch.no_grad():
        out = pm.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, adapter_names=names)
        for b, (row, name) in enumerate(zip(rows, names)):
            alone = pm.generate(row[None], max_new_tokens=NEW, do_sample=False, adapter_names=[name])
            assert torch.equal(out[b, -NEW:], alone[0, -NEW:]), (b, name)
        with pm.disable_adapter():
            bare = pm.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(out[1], bare[1])
    assert not torch.equal(out[[0, 2, 3]], bare[[0, 2, 3]])


def test_sampling_with_a_seed_and_bare_rows_equal_the_backbone():
    _, pm = _model_with_adapters()
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(3, 128, (3, 6), generator=gen)
    names = [None, "a", "b"]
    kwargs = dict(max_new_tokens=NEW, do_sample=True, top_k=0, temperature=1.0)
    with torch.no_grad():
        torch.manual_seed(123)
        first = pm.generate(ids, adapter_names=names, **kwargs)
        torch.manual_seed(123)
        second = pm.generate(ids, adapter_names=names, **kwargs)
        torch.manual_seed(123)
        with pm.disable_adapter():
            bare = pm.generate(ids, **kwargs)
        torch.manual_seed(123)
        multi = pm.generate(ids, adapter_names=names, num_return_sequences=2, **kwargs)
    assert first.shape == (3, 6 + NEW)
    assert torch.equal(first, second)
    assert torch.equal(first[0], bare[0])  # same random stream, no adjustment on row 0
    assert multi.shape == (6, 6 + NEW)
    assert torch.equal(multi[:, :6], ids.repeat_interleave(2, 0))


def test_beam_search_with_mixed_adapters_equals_each_row_alone():
    _, pm = _model_with_adapters()
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 128, (3, 6), generator=gen)
    names = ["a", None, "b"]
    kwargs = dict(max_new_tokens=NEW, do_sample=False, num_beams=3, num_return_sequences=2)
    with torch.no_grad():
        out = pm.generate(ids, adapter_names=names, **kwargs)
        assert out.shape == (6, 6 + NEW)
        for b, name in enumerate(names):
            alone = pm.generate(ids[b:b + 1], adapter_names=[name], **kwargs)
            assert torch.equal(out[2 * b:2 * b + 2], alone), (b, name)
        with pm.disable_adapter():
            bare = pm.generate(ids, **kwargs)
    assert torch.equal(out[2:4], bare[2:4])
    assert not torch.equal(out, bare)


@pytest.mark.parametrize("names,match", [
    (["a"], "adapter_names has 1 entries but the batch has 2 rows"),
    (["a", "b", None], "3 entries"),
    ("a", "one adapter name"),
    (["a", "nope"], "nope"),
])
def test_bad_adapter_names_raise_before_generating(monkeypatch, names, match):
    model, pm = _model_with_adapters()
    called = []
    monkeypatch.setattr(model, "generate", lambda *a, **k: called.append(1))
    with pytest.raises(ValueError, match=match):
        pm.generate(torch.randint(3, 128, (2, 5)), max_new_tokens=NEW, adapter_names=names)
    assert not called


def test_continuing_a_cache_without_a_prefill_raises():
    """A cache another model filled has no vectors; one prefilled under disable_adapter() is
    continued under it only (its keys and values were made without the adapters)."""
    model, pm = _model_with_adapters()
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        with pm.disable_adapter():
            cache = pm(input_ids=ids, use_cache=True).cache
        pm.generate(ids, max_new_tokens=2)  # another request in between
        with pytest.raises(RuntimeError, match="disable_adapter"):
            pm(input_ids=ids[:, -1:], cache=cache, use_cache=True)
        with pm.disable_adapter():
            pm(input_ids=ids[:, -1:], cache=cache, use_cache=True)
        other = tiny_llama(dtype=torch.float64)(input_ids=ids, use_cache=True).cache  # not PARA's
        with pytest.raises(RuntimeError, match="prefill"):
            pm(input_ids=ids[:, -1:], cache=other, use_cache=True)


def test_forward_with_a_cache_reuses_the_prefill_vectors(monkeypatch):
    _, pm = _model_with_adapters()
    ids, mask, _ = _left_padded([6, 3])
    with torch.no_grad():
        want = pm.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, adapter_names=["b", "a"])
        calls = _count_calls(monkeypatch, "pool_generate")
        out = pm(input_ids=ids, attention_mask=mask, use_cache=True, adapter_names=["b", "a"])
        seq, m, cache = ids, mask, out.cache
        for _ in range(NEW):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
            out = pm(input_ids=nxt, attention_mask=m, cache=cache, use_cache=True)
            cache = out.cache
    assert torch.equal(seq, want)
    assert len(calls) == 2 * 2  # prefill only: 2 layers x 2 generator signatures
