"""Fused consumers of the scale: where a model's structure allows it, the q / v projections
run as ``scaled_linear`` (the scale is the matmul's epilogue) and a gated FFN runs its product
as ``scaled_glu``, so that with kernels present the rescale costs no extra pass over memory.
With the reference backend the same forwards compute projection-then-scale, exactly as hooks do.

Each consumer knows its module's index ``k`` and reads the running request's state
(``state.ACTIVE``): ``scales[k]`` (s [rows, n], None: no adjustment, set at prefill). When the
forward is eager inference on the reference backend (``plain``), the rescale is one in-place
multiply of the projection's fresh output by the [rows, 1, n] view, with no op dispatch and no
re-check (s was made and checked at prefill, and the batch size is checked per forward): this
is the per-token decode path, and its Python cost is what PARA adds to a decode step, so it is
kept to a context-variable read and a few attribute reads. Packed rows (several examples in
one row) scale every token by its own example's vectors (``ops.scale`` with ``token_rows``).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from .. import ops
from .mapping import ScaledModule
from .state import ACTIVE

_MISSING = object()
GLU_ACTIVATIONS = {"SiLU": "silu", "SiLUActivation": "silu", "GELU": "gelu", "GELUActivation": "gelu",
                   "PytorchGELUTanh": "gelu_tanh", "GELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh"}


class MethodOverride:
    """Sets ``obj.<name>`` on the instance to ``make_method(original)``; ``remove()`` puts back
    what was there, like a hook handle."""

    def __init__(self, obj, name: str, make_method: Callable[[Callable], Callable]):
        self.obj, self.name = obj, name
        self.previous = obj.__dict__.get(name, _MISSING)
        original = functools.partial(getattr(type(obj), name), obj) if self.previous is _MISSING else self.previous
        setattr(obj, name, make_method(original))

    def remove(self) -> None:
        if self.previous is _MISSING:
            self.obj.__dict__.pop(self.name, None)
        else:
            setattr(self.obj, self.name, self.previous)


class ForwardOverride(MethodOverride):
    """``module.forward`` overridden on the instance."""

    def __init__(self, module: nn.Module, make_forward: Callable[[Callable], Callable]):
        super().__init__(module, "forward", make_forward)


def kernels_run(device: torch.device) -> bool:
    """Fused consumers pay off only where a kernel backend, not the reference, runs."""
    return ops.backend_for("scaled_linear", device) != "reference"


def fit(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """s in x's dtype: the scale is applied in the projection's dtype (under autocast a projection
    of the fp32 residual stream returns bf16 / fp16, while the vectors follow the fp32 generator).
    The cast is differentiable, so the gradient reaches the fp32 generator weights."""
    return s if s.dtype == x.dtype else s.to(x.dtype)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast gives a linear on ``device`` (None: autocast is off there)."""
    kind = device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def scale_output(output: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """output [B, ..., n] (or tokens flattened to [B*T, n], as OPT's FFN does) ⊙ s [B, n]."""
    s = fit(s, output)
    if output.dim() == 2 and output.shape[0] != s.shape[0]:
        return ops.scale(output.reshape(s.shape[0], -1, output.shape[-1]), s).reshape(output.shape)
    return ops.scale(output, s)


def scale_in_place(output: torch.Tensor, s: torch.Tensor, s3: torch.Tensor) -> torch.Tensor:
    """output [B, T, n] *= s3 = s [B, 1, n] (output must be a fresh tensor that only the caller
    holds); other layouts (e.g. OPT's flattened [B*T, n]) take the checked op."""
    if output.dim() == 3 and output.shape[0] == s.shape[0]:
        return output.mul_(s3 if s3.dtype == output.dtype else s3.to(output.dtype))
    return scale_output(output, s)


def scale_packed(output: torch.Tensor, s: torch.Tensor, token_rows: torch.Tensor) -> torch.Tensor:
    """Packed rows: output [B, T, n] (or [B*T, n]) ⊙ s[token_rows[token]], s [examples, n]."""
    n = output.shape[-1]  # token_rows: on the input's device (a no-op move unless split by device_map)
    return ops.scale(output.reshape(-1, n), fit(s, output), token_rows.to(output.device)).reshape(output.shape)


def is_fusable_linear(module: nn.Module, scaled: ScaledModule) -> bool:
    """A plain nn.Linear whose whole output is one target (q or v)."""
    return (type(module) is nn.Linear and len(scaled.segments) == 1 and scaled.segments[0].start == 0
            and "forward" not in module.__dict__)


def scaled_linear_forward(module: nn.Linear, k: int):
    def make(original):
        def forward(x):
            state = ACTIVE.get()
            try:
                s = None if state is None else state.scales[k]
            except IndexError:  # hooked after this request began (an adapter added meanwhile): not scaled
                s = None
            if s is None:
                return original(x)
            if state.plain:
                return scale_in_place(original(x), s, state.scales3[k])
            if state.token_rows is not None:
                return scale_packed(original(x), s, state.token_rows)
            if x.dim() >= 2 and x.shape[0] == s.shape[0] and kernels_run(x.device):
                weight, bias = module.weight, module.bias
                dtype = autocast_dtype(x.device)
                if dtype is not None:  # as F.linear under autocast: the matmul in the autocast dtype
                    x, weight = x.to(dtype), weight.to(dtype)
                    bias = None if bias is None else bias.to(dtype)
                return ops.scaled_linear(x, weight, bias, fit(s, x))
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


def scaled_glu_forward(mlp: nn.Module, activation: str, k: int):
    def make(original):
        def forward(x):
            state = ACTIVE.get()
            try:
                s = None if state is None else state.scales[k]
            except IndexError:  # hooked after this request began (an adapter added meanwhile): not scaled
                s = None
            if s is None:
                return original(x)
            gate, up = mlp.gate_proj(x), mlp.up_proj(x)
            if state.plain:
                return mlp.down_proj(mlp.act_fn(gate).mul_(scale_in_place(up, s, state.scales3[k])))
            if state.token_rows is not None:
                return mlp.down_proj(mlp.act_fn(gate) * scale_packed(up, s, state.token_rows))
            if up.shape[0] == s.shape[0] and kernels_run(x.device):
                return mlp.down_proj(ops.scaled_glu(gate, up, fit(s, up), activation))
            return mlp.down_proj(mlp.act_fn(gate) * scale_output(up, s))
        return forward
    return make


def scale_hook(k: int):
    """A forward hook rescaling a module's output (modules no fused consumer fits)."""
    def hook(module, args, output):  # not in place: other hooks may hold this output
        state = ACTIVE.get()
        try:
            s = None if state is None else state.scales[k]
        except IndexError:  # hooked after this request began (an adapter added meanwhile): not scaled
            s = None
        if s is None:
            return None
        if state.token_rows is not None:
            return scale_packed(output, s, state.token_rows)
        return scale_output(output, s)
    return hook


def _token_rows(state, tokens: int, rows: int, device) -> torch.Tensor:
    """The vector row of each of the ``tokens`` flattened [batch * length] tokens."""
    if state.token_rows is not None:
        return state.token_rows
    if tokens % rows:
        raise RuntimeError(f"the experts got {tokens} tokens, not a multiple of the request's {rows} rows")
    return torch.arange(tokens, device=device) // (tokens // rows)


def experts_forward(experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, up_scale: torch.Tensor) -> torch.Tensor:
    """transformers' reference ("eager") experts loop (integrations/moe.py layout: stacked
    ``gate_up_proj`` [E, 2I, d] or transposed, optional biases, [gate | up] halves) with the up
    half of each routed expert's output multiplied by ``up_scale`` [tokens, I], its token's l_u."""
    out = torch.zeros_like(hidden)
    n_experts = experts.num_experts
    transposed, bias = experts.is_transposed, experts.has_bias
    with torch.no_grad():
        mask = nn.functional.one_hot(top_k_index, num_classes=n_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    default_gate = getattr(type(experts)._apply_gate, "__name__", "") == "_default_apply_gate"
    for e in hit:
        e = e[0]
        if e == n_experts:
            continue
        top_k_pos, token_idx = torch.where(mask[e])
        x = hidden[token_idx]
        w = experts.gate_up_proj[e]
        gate_up = x @ w if transposed else nn.functional.linear(x, w)
        if bias:
            gate_up = gate_up + experts.gate_up_proj_bias[e]
        gate, up = gate_up.chunk(2, dim=-1)
        up = up * up_scale[token_idx]
        h = experts.act_fn(gate) * up if default_gate else experts._apply_gate(torch.cat([gate, up], -1))
        w = experts.down_proj[e]
        h = h @ w if transposed else nn.functional.linear(h, w)
        if bias:
            h = h + experts.down_proj_bias[e]
        h = h * top_k_weights[token_idx, top_k_pos, None]
        out.index_add_(0, token_idx, h.to(out.dtype))
    return out


def scaled_experts_forward(experts: nn.Module, k: int):
    """The experts module's forward with each token's l_u on its routed experts' up halves; with
    no scale (bare rows only, disabled) transformers' own forward (any experts implementation)."""
    def make(original):
        def forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            state = ACTIVE.get()
            try:
                s = None if state is None else state.scales[k]
            except IndexError:  # hooked after this request began (an adapter added meanwhile): not scaled
                s = None
            if s is None:
                return original(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
            if args or kwargs or getattr(experts, "_is_expert_parallel", False):
                raise RuntimeError("PARA's scaled experts take (hidden_states, top_k_index, top_k_weights) "
                                   "without expert parallelism")
            rows = _token_rows(state, hidden_states.shape[0], s.shape[0], hidden_states.device)
            return experts_forward(experts, hidden_states, top_k_index, top_k_weights, s.to(hidden_states.dtype)[rows])
        return forward
    return make
