"""Where PARA attaches in a Hugging Face decoder: the layer list, and in each layer the
modules whose outputs hold Q, V and the FFN's up branch (docs/spec.md §1).

Separate projections are found by name; fused ones (GPT-2's ``c_attn``, Phi-3's ``qkv_proj``
and ``gate_up_proj``, GPT-NeoX's per-head interleaved ``query_key_value``) get a layout that
says which output features belong to q, v or up and which (keys, gate) stay unscaled.

Mixture-of-experts layers (transformers' experts modules: one 3-D ``gate_up_proj`` parameter
[experts, 2·I, d] for all routed experts, as in Mixtral, Qwen2-MoE, Qwen3-MoE) have "up" =
the up half of every routed expert, scaled by one l_u of size I (``moe_intermediate_size``) for
whichever experts a token is routed to (``kind="experts"``, consumers.scaled_experts_forward),
followed, when the block has a shared expert, by the shared expert's up projection:
l_u = [routed (I) | shared (shared_expert_intermediate_size)]. A layout that cannot be scaled
exactly is a MappingError, never a partial adjustment (docs/training.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import PARAConfig

SPLIT_NAMES = {
    "q": ("q_proj", "query"),
    "v": ("v_proj", "value"),
    "up": ("up_proj", "fc1", "c_fc", "dense_h_to_4h", "fc_in"),
}
FUSED_QKV = {"qkv_proj": "concat", "c_attn": "concat", "Wqkv": "concat", "query_key_value": "per_head"}
FUSED_GATE_UP = ("gate_up_proj",)
NORM_NAMES = ("input_layernorm", "ln_1", "self_attn_layer_norm", "attention_norm", "ln_attn")

HOW_TO_MAP = ("pass PARAConfig(target_modules={'q': ..., 'v': ..., 'up': ...}) with module paths "
              "inside one decoder layer (and layers_path= if the layer list is not found), or "
              "drop the target from PARAConfig(targets=...)")


class MappingError(ValueError):
    """The model's structure does not fit the PARA config."""


@dataclass(frozen=True)
class Segment:
    target: str | None  # 'q' | 'v' | 'up', or None for features left unscaled
    start: int  # offset into that target's vector
    size: int


@dataclass(frozen=True)
class ScaledModule:
    path: str  # inside the decoder layer
    segments: tuple
    kind: str = "output"  # "output": the module's output is scaled; "experts": routed experts' up halves

    @property
    def out_features(self) -> int:
        return sum(s.size for s in self.segments)


@dataclass(frozen=True)
class LayerMap:
    sizes: dict  # target -> number of features it scales (n_q, n_v, n_u)
    modules: tuple  # ScaledModule, one per module whose output is rescaled
    norm: str | None  # the layer's input norm, for pool_input='normed'


def out_features(module: nn.Module) -> int | None:
    for attr in ("out_features", "nf"):  # nn.Linear, GPT-2's Conv1D
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    return None


EXPERTS_FLAGS = ("has_gate", "is_concatenated", "is_transposed", "has_bias", "has_post_expert_norm")


def is_experts(module: nn.Module) -> bool:
    """A transformers experts module: the routed experts' weights stacked in 3-D parameters."""
    return any(isinstance(getattr(module, name, None), torch.Tensor) and getattr(module, name).dim() == 3
               for name in ("gate_up_proj", "up_proj"))


def experts_intermediate(module: nn.Module, path: str, layer: nn.Module) -> int:
    """I of an experts module whose routed up projections PARA can scale exactly (gated experts,
    [gate | up] concatenated, transformers' ``use_experts_implementation`` layout); else a
    MappingError naming the architecture."""
    arch = f"{type(layer).__name__} ({type(module).__name__} at {path!r})"
    flags = {f: getattr(module, f, None) for f in EXPERTS_FLAGS}
    weight = getattr(module, "gate_up_proj", None)
    why = None
    if any(v is None for v in flags.values()) or not isinstance(weight, torch.Tensor):
        why = "its experts module is not in transformers' stacked gate_up_proj layout"
    elif not flags["has_gate"] or not flags["is_concatenated"]:
        why = "its experts are not gated with a [gate | up] concatenated gate_up_proj"
    elif flags["has_post_expert_norm"]:
        why = "its experts apply a norm after each expert"
    elif getattr(module, "_is_expert_parallel", False):
        why = "its experts are sharded by expert parallelism"
    if why is not None:
        raise MappingError(f"PARA cannot scale the routed experts' up projections of {arch}: {why}. "
                           "PARA never scales only part of an FFN; use PARAConfig(targets=('q', 'v')) on this model")
    two_i = weight.shape[2] if flags["is_transposed"] else weight.shape[1]
    return two_i // 2


def find_layers(model: nn.Module, config: PARAConfig) -> tuple[str, nn.ModuleList]:
    if config.layers_path is not None:
        try:
            layers = model.get_submodule(config.layers_path)
        except AttributeError as e:
            raise MappingError(f"layers_path={config.layers_path!r} is not a module of the model: {e}") from None
        if not isinstance(layers, nn.ModuleList):
            raise MappingError(f"layers_path={config.layers_path!r} is a {type(layers).__name__}, not a ModuleList")
        return config.layers_path, layers
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    found = [(n, m) for n, m in lists if len(m) == n_layers] if n_layers else []
    if not found:
        raise MappingError(f"could not find the decoder layers of {type(model).__name__} (no ModuleList of "
                           f"num_hidden_layers={n_layers} modules); pass PARAConfig(layers_path='model.layers')")
    return min(found, key=lambda nm: nm[0].count("."))


def _find_by_name(layer: nn.Module, names) -> list[str]:
    return [p for p, _ in layer.named_modules() if p and p.rsplit(".", 1)[-1] in names]


def _attention_sizes(hf_config) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim) from a Hugging Face config."""
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return heads, kv_heads, head_dim


def _fused_qkv(path: str, style: str, out: int, hf_config) -> ScaledModule:
    heads, kv_heads, hd = _attention_sizes(hf_config)
    nq, nkv = heads * hd, kv_heads * hd
    if out != nq + 2 * nkv or (style == "per_head" and kv_heads != heads):
        raise MappingError(f"fused projection {path!r} has {out} outputs, not q+k+v = {nq}+{nkv}+{nkv} as the "
                           f"config says; {HOW_TO_MAP}")
    if style == "concat":  # [q | k | v]
        segs = (Segment("q", 0, nq), Segment(None, 0, nkv), Segment("v", 0, nkv))
    else:  # GPT-NeoX: per head [q_h | k_h | v_h]
        segs = tuple(s for h in range(heads) for s in
                     (Segment("q", h * hd, hd), Segment(None, 0, hd), Segment("v", h * hd, hd)))
    return ScaledModule(path, segs)


def map_layer(layer: nn.Module, hf_config, config: PARAConfig) -> LayerMap:
    modules: dict[str, ScaledModule] = {}
    sizes: dict[str, int] = {}

    def add(module: ScaledModule) -> None:
        for s in module.segments:
            if s.target is not None:
                sizes[s.target] = max(sizes.get(s.target, 0), s.start + s.size)
        modules[module.path] = module

    def module_out(path: str) -> int:
        try:
            module = layer.get_submodule(path)
            if is_experts(module):
                return experts_intermediate(module, path, layer)
            n = out_features(module)
        except AttributeError:
            raise MappingError(f"{path!r} is not a module of the decoder layer {type(layer).__name__}; "
                               f"{HOW_TO_MAP}") from None
        if n is None:
            raise MappingError(f"cannot tell the output size of {path!r}: it is not a Linear or Conv1D; {HOW_TO_MAP}")
        return n

    if config.target_modules is not None:
        for target, path in config.target_modules.items():
            n = module_out(path)  # checks that the path exists
            kind = "experts" if is_experts(layer.get_submodule(path)) else "output"
            if kind == "experts" and target != "up":
                raise MappingError(f"target {target!r} is mapped to the experts module {path!r}; only 'up' can be")
            add(ScaledModule(path, (Segment(target, 0, n),), kind))
    else:
        fused = _find_by_name(layer, FUSED_QKV) if {"q", "v"} & set(config.targets) else []
        for target in config.targets:
            if target in ("q", "v") and fused:
                if len(fused) > 1:
                    raise MappingError(f"several fused qkv projections {fused}; {HOW_TO_MAP}")
                path = fused[0]
                if path not in modules:
                    style = FUSED_QKV[path.rsplit(".", 1)[-1]]
                    add(_fused_qkv(path, style, module_out(path), hf_config))
                continue
            paths = _find_by_name(layer, SPLIT_NAMES[target])
            if target == "up" and _add_experts(layer, paths, add, module_out):
                continue
            if target == "up" and not paths:
                gate_up = _find_by_name(layer, FUSED_GATE_UP)
                if len(gate_up) == 1:  # [gate | up]
                    n = module_out(gate_up[0])
                    add(ScaledModule(gate_up[0], (Segment(None, 0, n // 2), Segment("up", 0, n // 2))))
                    continue
            if len(paths) != 1:
                what = "no" if not paths else f"several ({paths})"
                raise MappingError(f"found {what} module for target {target!r} in {type(layer).__name__} "
                                   f"(looked for {SPLIT_NAMES[target]}); {HOW_TO_MAP}")
            add(ScaledModule(paths[0], (Segment(target, 0, module_out(paths[0])),)))
    norms = _find_by_name(layer, NORM_NAMES)
    norm = min(norms, key=lambda p: p.count(".")) if norms else None
    if config.pool_input == "normed" and norm is None:
        raise MappingError(f"pool_input='normed' needs the layer's input norm, but none of {NORM_NAMES} is in "
                           f"{type(layer).__name__}; use pool_input='residual'")
    return LayerMap(sizes=sizes, modules=tuple(modules.values()), norm=norm)


def _add_experts(layer: nn.Module, up_paths: list, add, module_out) -> bool:
    """Map the 'up' target of a mixture-of-experts layer: the routed experts' up halves, then the
    shared expert's up projection (if any). False when the layer has no experts module."""
    experts = [p for p, m in layer.named_modules() if p and (is_experts(m) or p.rsplit(".", 1)[-1] == "experts")]
    if not experts:
        return False
    if len(experts) > 1:
        raise MappingError(f"several experts modules {experts} in {type(layer).__name__}; {HOW_TO_MAP}")
    path = experts[0]
    n_routed = experts_intermediate(layer.get_submodule(path), path, layer)
    add(ScaledModule(path, (Segment("up", 0, n_routed),), "experts"))
    shared = [p for p in up_paths if not p.startswith(path + ".")]
    if len(shared) > 1:
        raise MappingError(f"several up projections {shared} next to the experts {path!r} in "
                           f"{type(layer).__name__}; {HOW_TO_MAP}")
    if shared:  # l_u = [routed experts | shared expert]
        add(ScaledModule(shared[0], (Segment("up", n_routed, module_out(shared[0])),)))
    return True


def module_scale(module: ScaledModule, pieces: dict, batch: int, like: torch.Tensor) -> torch.Tensor | None:
    """The [batch, out_features] scale of one module's output from the generator's per-target
    vectors ``pieces`` ({target: [batch, n_target]}); None when no feature is scaled."""
    parts = []
    for s in module.segments:
        piece = pieces.get(s.target)
        if piece is None:
            parts.append(None)
        else:
            parts.append(piece if (s.start == 0 and s.size == piece.shape[1]) else piece[:, s.start:s.start + s.size])
    if all(p is None for p in parts):
        return None
    if len(parts) == 1:
        return parts[0]
    return torch.cat([like.new_ones(batch, s.size) if p is None else p for p, s in zip(parts, module.segments)], 1)
