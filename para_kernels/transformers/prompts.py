"""Each row's prompt range [start, end) (docs/spec.md §2): from prompt_lengths, else from a
completion mask (``completion_mask`` / ``assistant_masks``: the prompt is what precedes the
first marked token), else from the labels' ignored (-100) prefix, else the whole attended input.
Padding may be on either side.

Packed rows (several examples in one row, each starting again at position 0, as
``DataCollatorWithFlattening`` and TRL's padding-free packing make them) have one prompt per
example: :func:`packed_prompts`."""
from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100
EMPTY_PROMPT = ("PARA pools each row's prompt, so it must know where the prompt ends: pass prompt_lengths "
                "(prompt tokens per row, or per packed example), set the prompt's labels to -100 (a -100 "
                "prefix), or pass completion_mask (1 on the answer's tokens; TRL's completion-only loss, "
                "assistant_masks alike)")


def mask_as_labels(completion_mask: Tensor | None, assistant_masks: Tensor | None = None,
                   shape: tuple | None = None) -> Tensor | None:
    """A completion mask (1 = answer token) as labels: 0 where marked, -100 elsewhere (both masks
    given: a token is marked where both are, as TRL builds its labels), so the prompt is what
    precedes the first marked token; None when neither mask is given."""
    masks = []
    for name, m in (("completion_mask", completion_mask), ("assistant_masks", assistant_masks)):
        if m is None:
            continue
        try:
            m = torch.as_tensor(m)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be a [batch, seq_len] tensor of 0 / 1, got {type(m).__name__}") from None
        if shape is not None and tuple(m.shape) != shape:
            raise ValueError(f"{name} must be [batch, seq_len] = {list(shape)} (the input's), got {list(m.shape)}")
        masks.append(m)
    if not masks:
        return None
    marked = masks[0].bool()
    for m in masks[1:]:
        marked = marked & m.to(marked.device).bool()
    return torch.where(marked, 0, IGNORE_INDEX)


def _row_error(kind: str, bad: Tensor, detail) -> ValueError:
    b = int(bad.nonzero()[0, 0])
    return ValueError(f"{kind} of row {b}: {detail(b)}")


def _lengths(prompt_lengths, count: int, device, expected: str) -> Tensor:
    """prompt_lengths as ``count`` int64s on ``device``; else ValueError 'prompt_lengths must <expected>'."""
    try:
        lengths = torch.as_tensor(prompt_lengths, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"prompt_lengths must {expected}, got {prompt_lengths!r}") from None
    if lengths.dim() != 1 or lengths.shape[0] != count or lengths.is_floating_point():
        raise ValueError(f"prompt_lengths must {expected}, got {list(lengths.shape)} {lengths.dtype}")
    return lengths.long()


def attended_span(attention_mask: Tensor | None, batch: int, length: int, device) -> tuple[Tensor, Tensor]:
    """(first attended index, last attended index + 1) per row; the attended tokens of a row
    must be one contiguous run (left or right padding)."""
    if attention_mask is None:
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        return zeros, zeros + length
    if attention_mask.dim() == 4:
        attention_mask = attended_tokens(attention_mask, batch, length)
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"attention_mask must be [batch, seq_len] = [{batch}, {length}], got "
                         f"{list(attention_mask.shape)}")
    mask = attention_mask.bool()
    count = mask.sum(1)
    if bool((count == 0).any()):
        raise _row_error("attention_mask", count == 0, lambda b: "no token is attended, so there is no prompt")
    first = mask.int().argmax(1)
    end = length - mask.flip(1).int().argmax(1)
    holes = (end - first) != count
    if bool(holes.any()):
        raise _row_error("attention_mask", holes, lambda b: "attended tokens are not one contiguous run "
                         "(PARA pools the prompt of left- or right-padded rows)")
    return first, end


def attended_tokens(mask4: Tensor, batch: int, length: int) -> Tensor:
    """A custom 4-D mask [B, 1, T, T] (bool: True = attend; float: 0 = attend, additive): the
    tokens that may attend to themselves are the real ones, the others are padding."""
    if tuple(mask4.shape) != (batch, 1, length, length):
        raise ValueError(f"a 4-D attention_mask must be [batch, 1, seq_len, seq_len] = [{batch}, 1, {length}, "
                         f"{length}] (PARA reads each row's real tokens from its diagonal), got {list(mask4.shape)}")
    diagonal = mask4[:, 0].diagonal(dim1=-2, dim2=-1)
    if diagonal.dtype == torch.bool:
        return diagonal
    return diagonal == 0 if diagonal.is_floating_point() else diagonal != 0


def is_packed(position_ids: Tensor | None, attention_mask: Tensor | None, batch: int, length: int) -> bool:
    """Whether some row holds several sequences: its positions restart between two real tokens."""
    if position_ids is None or length < 2 or position_ids.dim() != 2 or position_ids.shape[1] != length:
        return False
    restart = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if attention_mask is not None:
        real = attention_mask.bool() if attention_mask.dim() == 2 else attended_tokens(attention_mask, batch, length)
        restart = restart & real[:, 1:] & real[:, :-1]
    return bool(restart.any())


def packed_prompts(position_ids: Tensor, batch: int, length: int, device, attention_mask: Tensor | None = None,
                   labels: Tensor | None = None, prompt_lengths=None):
    """Packed rows: (start [E], end [E], token_rows [B*T], example_row [E]) for the E examples,
    in row order. Ranges index the flattened [B*T] tokens; an example starts at every real token
    that does not continue its predecessor's positions. Each example's prompt: prompt_lengths
    (E integers), else its labels' ignored prefix, else the whole example."""
    first, last = attended_span(attention_mask, batch, length, device)
    t = torch.arange(length, device=device)
    real = (t >= first[:, None]) & (t < last[:, None])
    position_ids = position_ids.to(device).expand(batch, length)
    continues = torch.zeros_like(real)
    continues[:, 1:] = (position_ids[:, 1:] == position_ids[:, :-1] + 1) & real[:, :-1]
    begins = (real & ~continues).reshape(-1)
    start = begins.nonzero()[:, 0]  # [E], ascending
    example_row = start // length
    row_end = example_row * length + last[example_row]
    next_start = torch.cat([start[1:], start.new_full((1,), batch * length)])
    end = torch.minimum(next_start, row_end)
    flat = torch.arange(batch * length, device=device)
    token_rows = (torch.searchsorted(start, flat, right=True) - 1).clamp(min=0)
    n = start.shape[0]
    if prompt_lengths is not None:
        lengths = _lengths(prompt_lengths, n, device, f"give one integer per packed example: these rows hold {n} "
                           "examples (positions restart)")
        bad = (lengths < 1) | (lengths > end - start)
        if bool(bad.any()):
            raise _row_error("prompt_lengths", bad, lambda e: f"packed example {e} has {int(end[e] - start[e])} "
                             f"tokens, so prompt length {int(lengths[e])} does not fit (1..length)")
        return start, start + lengths, token_rows, example_row
    if labels is not None:
        if tuple(labels.shape) != (batch, length):
            raise ValueError(f"labels must be [batch, seq_len] = [{batch}, {length}], got {list(labels.shape)}")
        supervised = (labels.reshape(-1) != IGNORE_INDEX) & real.reshape(-1)
        next_supervised = torch.where(supervised, flat, batch * length).flip(0).cummin(0).values.flip(0)
        prompt_end = torch.minimum(next_supervised[start], end)
        empty = prompt_end <= start
        if bool(empty.any()):
            raise _row_error("labels", empty, lambda e: f"the first token of packed example {e} is already "
                             f"supervised (label != -100, or marked by the completion mask), so its prompt is "
                             f"empty. {EMPTY_PROMPT}")
        return start, prompt_end, token_rows, example_row
    return start, end, token_rows, example_row


def prompt_ranges(batch: int, length: int, device, attention_mask: Tensor | None = None,
                  labels: Tensor | None = None, prompt_lengths=None) -> tuple[Tensor, Tensor]:
    """[start, end) of every row's prompt, as int64 tensors on ``device``."""
    first, end = attended_span(attention_mask, batch, length, device)
    if prompt_lengths is not None:
        lengths = _lengths(prompt_lengths, batch, device, f"be {batch} integers, one per row")
        if bool((lengths < 1).any()):
            raise _row_error("prompt_lengths", lengths < 1,
                             lambda b: f"prompt length {int(lengths[b])}: a prompt needs at least one token")
        too_long = lengths > end - first
        if bool(too_long.any()):
            raise _row_error("prompt_lengths", too_long, lambda b: f"prompt length {int(lengths[b])} is longer "
                             f"than the row's {int(end[b] - first[b])} attended tokens")
        return first, first + lengths
    if labels is not None:
        if tuple(labels.shape) != (batch, length):
            raise ValueError(f"labels must be [batch, seq_len] = [{batch}, {length}], got {list(labels.shape)}")
        positions = torch.arange(length, device=device)
        in_row = (positions >= first[:, None]) & (positions < end[:, None])
        supervised = (labels != IGNORE_INDEX) & in_row
        prompt_end = torch.where(supervised.any(1), supervised.int().argmax(1), end)
        empty = prompt_end <= first
        if bool(empty.any()):
            every = supervised.sum(1) == end - first

            def detail(b):
                what = ("every attended token is supervised (labels == input_ids, as DataCollatorForLanguageModeling "
                        "and a plain-text SFT dataset make them)" if bool(every[b]) else
                        "the first attended token is already supervised (label != -100, or marked by the "
                        "completion mask)")
                return f"{what}, so the prompt is empty. {EMPTY_PROMPT}"
            raise _row_error("labels", empty, detail)
        return first, prompt_end
    return first, end
