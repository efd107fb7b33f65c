"""Each row's prompt range (docs/spec.md §2) and what it means end to end: only the prompt is
pooled, so the response never leaks into the generated vectors."""
from __future__ import annotations

import pytest
import torch

import para_kernels
from para_kernels import PARAConfig, get_para_model
from para_kernels.transformers.prompts import prompt_ranges

from kit.models import randomize_adapter, tiny_llama

# the single_thread fixture: tests/wrapper/conftest.py
pytestmark = pytest.mark.usefixtures("single_thread")

X = -100  # an ignored label (-100)


def ranges_of(mask=None, labels=None, prompt_lengths=None, shape=None):
    ref = mask if mask is not None else labels
    batch, length = shape if shape is not None else tuple(torch.as_tensor(ref).shape)
    mask = None if mask is None else torch.tensor(mask)
    labels = None if labels is None else torch.tensor(labels)
    start, end = prompt_ranges(batch, length, torch.device("cpu"), mask, labels, prompt_lengths)
    assert start.dtype == end.dtype == torch.long
    return start.tolist(), end.tolist()


RIGHT = [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
LEFT = [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]


# ---------------------------------------------------------------- the three sources
def test_from_prompt_lengths_right_padding():
    assert ranges_of(RIGHT, prompt_lengths=[2, 5]) == ([0, 0], [2, 5])
    assert ranges_of(RIGHT, prompt_lengths=torch.tensor([4, 6])) == ([0, 0], [4, 6])


def test_from_prompt_lengths_left_padding_counts_from_first_attended_token():
    assert ranges_of(LEFT, prompt_lengths=[2, 3]) == ([2, 0], [4, 3])
    assert ranges_of(LEFT, prompt_lengths=[4, 1]) == ([2, 0], [6, 1])


def test_prompt_lengths_take_precedence_over_labels():
    labels = [[X, X, X, 5, X, X], [X, 7, 8, 9, 9, 9]]
    assert ranges_of(RIGHT, labels=labels, prompt_lengths=[1, 4]) == ([0, 0], [1, 4])


def test_from_labels_right_padding():
    labels = [[X, X, 5, 6, X, X], [X, X, X, X, X, 9]]
    assert ranges_of(RIGHT, labels=labels) == ([0, 0], [2, 5])


def test_from_labels_left_padding_only_attended_tokens_count():
    # the padding's labels are not -100 here: they must not count, being unattended
    labels = [[0, 0, X, X, 7, 8], [X, X, X, 4, X, 5]]
    assert ranges_of(LEFT, labels=labels) == ([2, 0], [4, 3])


def test_from_labels_with_no_supervised_token_is_the_whole_attended_row():
    labels = [[X] * 6, [X] * 6]
    assert ranges_of(RIGHT, labels=labels) == ([0, 0], [4, 6])
    assert ranges_of(LEFT, labels=labels) == ([2, 0], [6, 6])


def test_from_labels_supervised_padding_after_the_row_is_ignored():
    labels = [[X, X, X, X, 3, 3], [X, X, 5, 5, 5, 5]]  # row 0: labels on right padding
    assert ranges_of(RIGHT, labels=labels) == ([0, 0], [4, 2])


def test_default_is_the_whole_attended_input():
    assert ranges_of(RIGHT) == ([0, 0], [4, 6])
    assert ranges_of(LEFT) == ([2, 0], [6, 6])
    assert ranges_of(shape=(3, 5)) == ([0, 0, 0], [5, 5, 5])
    assert ranges_of([[True, True, False]]) == ([0], [2])  # boolean masks too


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("mask,lengths,match", [
    (RIGHT, [0, 3], r"row 0.*at least one token"),
    (RIGHT, [3, -1], r"row 1"),
    (RIGHT, [5, 3], r"row 0.*longer than the row's 4 attended tokens"),
    (LEFT, [2, 7], r"row 1.*longer"),
    (LEFT, [5, 2], r"row 0.*longer"),
    (RIGHT, [2], r"2 integers"),
    (RIGHT, [2, 2, 2], r"2 integers"),
    (RIGHT, [[2, 2]], r"2 integers"),
    (RIGHT, [2.0, 2.0], r"integers"),
])
def test_bad_prompt_lengths_raise(mask, lengths, match):
    with pytest.raises(ValueError, match=match):
        ranges_of(mask, prompt_lengths=lengths)


@pytest.mark.parametrize("mask,labels", [
    (RIGHT, [[X, X, 5, 6, X, X], [4, X, X, X, X, 9]]),
    (LEFT, [[X, X, 5, 6, 7, 8], [X, X, X, X, X, 9]]),  # row 0's first attended token is supervised
])
def test_labels_without_ignored_prefix_raise(mask, labels):
    bad = 1 if mask is RIGHT else 0
    with pytest.raises(ValueError, match=rf"labels of row {bad}.*prompt is empty"):
        ranges_of(mask, labels=labels)


def test_labels_of_the_wrong_shape_raise():
    with pytest.raises(ValueError, match="labels must be"):
        ranges_of(RIGHT, labels=[[X, X, 5], [X, X, 5]])


@pytest.mark.parametrize("mask,match", [
    ([[1, 0, 1, 1], [1, 1, 1, 1]], r"row 0.*contiguous"),
    ([[1, 1, 1, 1], [0, 1, 0, 1]], r"row 1.*contiguous"),
    ([[1, 1, 1, 1], [0, 0, 0, 0]], r"row 1.*no token is attended"),
])
def test_bad_attention_masks_raise(mask, match):
    with pytest.raises(ValueError, match=match):
        ranges_of(mask)


def test_attention_mask_of_the_wrong_shape_raises():
    with pytest.raises(ValueError, match="attention_mask must be"):
        prompt_ranges(2, 5, torch.device("cpu"), torch.ones(2, 4, dtype=torch.long))


def test_errors_reach_the_caller_of_the_model():
    pm = get_para_model(tiny_llama(), PARAConfig(r=4))
    x = torch.randint(3, 128, (2, 6))
    with pytest.raises(ValueError, match="prompt_lengths"):
        pm(input_ids=x, prompt_lengths=[0, 2])
    with pytest.raises(ValueError, match="prompt is empty"):
        pm(input_ids=x, labels=x)
    with pytest.raises(ValueError, match="contiguous"):
        pm(input_ids=x, attention_mask=torch.tensor([[1, 0, 1, 1, 1, 1], [1] * 6]))
    with pytest.raises(ValueError, match="no token is attended"):
        pm(input_ids=x, attention_mask=torch.tensor([[0] * 6, [1] * 6]))


# ---------------------------------------------------------------- end to end: no leak
PROMPT = 5
LENGTH = 10


def _spy_vectors(monkeypatch):
    """Record every generator output v (one per layer per forward)."""
    seen = []
    real = para_kernels.ops.pool_generate

    def spy(*args, **kwargs):
        v = real(*args, **kwargs)
        seen.append(v.detach().clone())
        return v
    monkeypatch.setattr(para_kernels.ops, "pool_generate", spy)
    return seen


def _two_batches(padding: str):
    """Two batches equal on each row's prompt (and padding) and different on every response token."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randint(3, 128, (2, LENGTH), generator=gen)
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    lengths = [PROMPT, PROMPT - 2]
    if padding == "right":
        mask[1, -2:] = 0
        x[1, -2:] = 0
        first = [0, 0]
    else:
        mask[1, :2] = 0
        x[1, :2] = 0
        first = [0, 2]
    y = x.clone()
    for b in range(2):
        response = slice(first[b] + lengths[b], None) if padding == "left" or b == 0 else \
            slice(lengths[b], LENGTH - 2)
        y[b, response] = (x[b, response] + 17) % 125 + 3
    labels = x.clone()
    labels[mask == 0] = X
    for b in range(2):
        labels[b, : first[b] + lengths[b]] = X
    return x, y, mask, lengths, first, labels


@pytest.mark.parametrize("pooler", ["last", "mean", "max", "attn"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("source", ["prompt_lengths", "labels"])
def test_response_tokens_do_not_leak_into_the_vectors(monkeypatch, pooler, padding, source):
    model = tiny_llama(dtype=torch.float64)
    pm = get_para_model(model, PARAConfig(r=4, pooler=pooler))
    randomize_adapter(pm)
    x, y, mask, lengths, first, labels = _two_batches(padding)
    seen = _spy_vectors(monkeypatch)
    outs = []
    with torch.no_grad():
        for ids in (x, y):
            kwargs = {"prompt_lengths": lengths} if source == "prompt_lengths" else \
                {"labels": torch.where(labels == X, labels, ids)}
            outs.append(pm(input_ids=ids, attention_mask=mask, **kwargs).logits)
        # sanity: pooling the whole input does see the response
        whole = [pm(input_ids=ids, attention_mask=mask).logits for ids in (x, y)]
    n = len(model.model.layers)
    assert len(seen) == 4 * n
    for v_x, v_y in zip(seen[:n], seen[n:2 * n]):
        torch.testing.assert_close(v_x, v_y, rtol=0, atol=0)
    assert any(not torch.allclose(a, b) for a, b in zip(seen[2 * n:3 * n], seen[3 * n:]))
    for b in range(2):
        prompt = slice(first[b], first[b] + lengths[b])
        torch.testing.assert_close(outs[0][b, prompt], outs[1][b, prompt], rtol=1e-12, atol=1e-12)
        assert not torch.allclose(whole[0][b, prompt], whole[1][b, prompt], rtol=1e-9, atol=1e-9)
