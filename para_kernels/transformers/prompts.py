"""Each row's prompt range [start, end) (PARA_SPEC §2): from prompt_lengths, else from the
labels' ignored (-100) prefix, else the whole attended input. Padding may be on either side."""
from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


def _row_error(kind: str, bad: Tensor, detail) -> ValueError:
    b = int(bad.nonzero()[0, 0])
    return ValueError(f"{kind} of row {b}: {detail(b)}")


def attended_span(attention_mask: Tensor | None, batch: int, length: int, device) -> tuple[Tensor, Tensor]:
    """(first attended index, last attended index + 1) per row; the attended tokens of a row
    must be one contiguous run (left or right padding)."""
    if attention_mask is None:
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        return zeros, zeros + length
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


def prompt_ranges(batch: int, length: int, device, attention_mask: Tensor | None = None,
                  labels: Tensor | None = None, prompt_lengths=None) -> tuple[Tensor, Tensor]:
    """[start, end) of every row's prompt, as int64 tensors on ``device``."""
    first, end = attended_span(attention_mask, batch, length, device)
    if prompt_lengths is not None:
        lengths = torch.as_tensor(prompt_lengths, device=device)
        if lengths.dim() != 1 or lengths.shape[0] != batch or lengths.is_floating_point():
            raise ValueError(f"prompt_lengths must be {batch} integers, one per row, got {list(lengths.shape)} "
                             f"{lengths.dtype}")
        lengths = lengths.long()
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
            raise _row_error("labels", empty, lambda b: "the first attended token is already supervised "
                             "(label != -100), so the prompt is empty; set the prompt's labels to -100 or "
                             "pass prompt_lengths")
        return first, prompt_end
    return first, end
