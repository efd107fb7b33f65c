"""Fused consumers of the scale: where a model's structure allows it, the q / v projections
run as ``scaled_linear`` (the scale is the matmul's epilogue) and a gated FFN runs its product
as ``scaled_glu``, so that with kernels present the rescale costs no extra pass over memory.
With the reference backend the same forwards compute projection-then-scale, exactly as hooks do.

Each consumer reads its module's ``ScaleSlot`` (s [B, n], None: no adjustment, set at prefill)
and the model's ``RunState``. When the forward is eager inference on the reference backend
(``state.plain``), the rescale is one in-place multiply of the projection's fresh output by
the slot's [B, 1, n] view, with no op dispatch and no re-check (s was made and checked at
prefill, and the batch size is checked per forward): this is the per-token decode path, and
its Python cost is what PARA adds to a decode step, so it is kept to a few attribute reads.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from .. import ops
from .mapping import ScaledModule

_MISSING = object()
GLU_ACTIVATIONS = {"SiLU": "silu", "SiLUActivation": "silu", "GELU": "gelu", "GELUActivation": "gelu",
                   "PytorchGELUTanh": "gelu_tanh", "GELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh"}


class ScaleSlot:
    """One module's scale for the current batch: s [B, n] (None: no adjustment) and s3, the same
    values viewed as [B, 1, n] to multiply a [B, T, n] output in place."""
    __slots__ = ("s", "s3")

    def __init__(self):
        self.s = self.s3 = None

    def set(self, s: torch.Tensor | None) -> None:
        self.s, self.s3 = s, (None if s is None else s.unsqueeze(1))


class RunState:
    """Per-forward facts the consumers read: ``plain`` = eager inference on the reference backend."""
    __slots__ = ("plain",)

    def __init__(self):
        self.plain = False


class ForwardOverride:
    """Sets ``module.forward`` on the instance; ``remove()`` puts back what was there, like a
    hook handle."""

    def __init__(self, module: nn.Module, make_forward: Callable[[Callable], Callable]):
        self.module = module
        self.previous = module.__dict__.get("forward", _MISSING)
        original = functools.partial(type(module).forward, module) if self.previous is _MISSING else self.previous
        module.forward = make_forward(original)

    def remove(self) -> None:
        if self.previous is _MISSING:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self.previous


def kernels_run(device: torch.device) -> bool:
    """Fused consumers pay off only where a kernel backend, not the reference, runs."""
    return ops.backend_for("scaled_linear", device) != "reference"


def scale_output(output: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """output [B, ..., n] (or tokens flattened to [B*T, n], as OPT's FFN does) ⊙ s [B, n]."""
    if output.dim() == 2 and output.shape[0] != s.shape[0]:
        return ops.scale(output.reshape(s.shape[0], -1, output.shape[-1]), s).reshape(output.shape)
    return ops.scale(output, s)


def scale_in_place(output: torch.Tensor, slot: ScaleSlot) -> torch.Tensor:
    """output [B, T, n] *= s (output must be a fresh tensor that only the caller holds); other
    layouts (e.g. OPT's flattened [B*T, n]) take the checked op."""
    if output.dim() == 3 and output.shape[0] == slot.s.shape[0]:
        return output.mul_(slot.s3)
    return scale_output(output, slot.s)


def is_fusable_linear(module: nn.Module, scaled: ScaledModule) -> bool:
    """A plain nn.Linear whose whole output is one target (q or v)."""
    return (type(module) is nn.Linear and len(scaled.segments) == 1 and scaled.segments[0].start == 0
            and "forward" not in module.__dict__)


def scaled_linear_forward(module: nn.Linear, slot: ScaleSlot, state: RunState):
    def make(original):
        def forward(x):
            s = slot.s
            if s is None:
                return original(x)
            if state.plain:
                return scale_in_place(original(x), slot)
            if x.dim() >= 2 and x.shape[0] == s.shape[0] and kernels_run(x.device):
                return ops.scaled_linear(x, module.weight, module.bias, s)
            return scale_output(original(x), s)
        return forward
    return make


def glu_parts(layer: nn.Module, up_path: str) -> tuple[nn.Module, str] | None:
    """(the gated FFN, its activation name) when ``up_path`` is the up branch of an FFN computing
    down(act(gate(x)) * up(x)) with plain linears (LLaMA, Mistral, Qwen, Gemma); else None."""
    if "." not in up_path or not up_path.endswith("up_proj"):
        return None
    mlp = layer.get_submodule(up_path.rsplit(".", 1)[0])
    parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    act = GLU_ACTIVATIONS.get(type(getattr(mlp, "act_fn", None)).__name__)
    if act is None or not all(type(p) is nn.Linear for p in parts) or "forward" in mlp.__dict__:
        return None
    if act == "gelu" and getattr(mlp.act_fn, "approximate", "none") != "none":
        act = "gelu_tanh"
    return mlp, act


def scaled_glu_forward(mlp: nn.Module, activation: str, slot: ScaleSlot, state: RunState):
    def make(original):
        def forward(x):
            s = slot.s
            if s is None:
                return original(x)
            gate, up = mlp.gate_proj(x), mlp.up_proj(x)
            if state.plain:
                return mlp.down_proj(mlp.act_fn(gate).mul_(scale_in_place(up, slot)))
            if up.shape[0] == s.shape[0] and kernels_run(x.device):
                return mlp.down_proj(ops.scaled_glu(gate, up, s, activation))
            return mlp.down_proj(mlp.act_fn(gate) * scale_output(up, s))
        return forward
    return make
