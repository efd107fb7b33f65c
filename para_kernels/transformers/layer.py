"""PARA at one decoder layer: the generator module it carries and the hooks that run it.

Holds:
- :class:`AdapterWeights`: one adapter's generator in one layer (W_down, b_down, W_up, b_up, and
  the attn pooler's w_sa / the rational activation's parameters when the config has them);
- :class:`PARAGenerator`: the adapters resident in one layer, attached to the decoder layer as
  ``para_generator`` (so its tensors are part of the wrapped model's parameters while wrapped);
- :class:`PARALayer`: PARA's side of decoder layer ``index``: it adds an adapter's weights to
  the layer and installs, once per layer / module, the hooks that use them: a pre-hook on the
  layer (pool the layer's input, or the input norm's output for ``pool_input='normed'``, and
  generate the vectors: one ``pool_generate`` per adapter group of the running request), and on
  every q / v / up module a consumer of its scale (consumers.py).

Invariants: a layer computes vectors only while its request is being prefilled (``state.ready``
false) and writes them into the request's state (state.py), never onto a module; at a decode
step its pre-hook is a context-variable read and at most two attribute reads. The adapter registry
(which adapter maps which modules of this layer: ``plans[name].maps[index]``; the index ``k`` of
each scaled module) is the PARAModel's: a PARALayer reads it, and adds only its own modules'
indices.
"""
from __future__ import annotations

import functools
import math
import threading
import weakref
from collections import OrderedDict

import torch
from torch import nn

from .. import ops
from ..config import PARAConfig
from ..ops.activations import RATIONAL_GELU_INIT
from . import consumers
from .mapping import LayerMap, module_scale
from .state import ACTIVE, RequestState, RequestStateError

GENERATOR_ATTR = "para_generator"
WEIGHT_NAMES = ("w_down", "b_down", "w_up", "b_up", "w_sa", "act_params")


def _hook_device(hook) -> torch.device | None:
    """The execution device of an accelerate hook (AlignDevicesHook, or one inside a SequentialHook)."""
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        device = getattr(h, "execution_device", None)
        if device is not None and not isinstance(device, dict):
            return torch.device(device)
    return None


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: the execution device of accelerate's hook when the model was
    dispatched (``device_map``: the weights of an offloaded module are on meta, onloaded by the
    hook for each forward), else the device of its first parameter not on meta, else a hooked
    submodule's execution device."""
    device = _hook_device(getattr(module, "_hf_hook", None))
    if device is not None:
        return device
    params = list(module.parameters())
    for p in params:
        if p.device.type != "meta":
            return p.device
    for m in module.modules():
        device = _hook_device(getattr(m, "_hf_hook", None))
        if device is not None:
            return device
    return params[0].device if params else torch.device("cpu")


def weight_shapes(config: PARAConfig, d: int, n: int) -> dict[str, tuple]:
    """Shape of each of one adapter's tensors in one layer (d: hidden size, n: N = n_q+n_v+n_u)."""
    shapes = {"w_down": (d, config.r), "b_down": (config.r,), "w_up": (config.r, n), "b_up": (n,)}
    if config.pooler == "attn":
        shapes["w_sa"] = (d,)
    if config.activation == "rational":
        shapes["act_params"] = (len(RATIONAL_GELU_INIT),)
    return shapes


class AdapterWeights(nn.Module):
    """One adapter's generator in one layer: p -> 1 + g(p W_down + b_down) W_up + b_up."""

    def __init__(self, config: PARAConfig, d: int, n: int, dtype: torch.dtype, device=None):
        super().__init__()
        for name, shape in weight_shapes(config, d, n).items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, dtype=dtype, device=device)))
        bound = config.init_scale / math.sqrt(d)
        with torch.no_grad():
            self.w_down.uniform_(-bound, bound)
            if config.activation == "rational":
                self.act_params.copy_(torch.tensor(RATIONAL_GELU_INIT, dtype=dtype))
        # w_up, b_up start at zero (v = 1: the model equals its backbone); w_sa at zero
        # makes the attention pooler start as the mean.


# Stacked banks of mixed batches, per generator: {names: (key, bank)}, least recently used first.
# Kept outside the modules (weakly keyed by the generator) so that pickling, deepcopy and the
# state dict of the model never see them. BANK_CACHE_SIZE bounds the entries per layer: each holds
# a copy of its adapters' weights in that layer; 0 switches the cache off.
BANK_CACHE_SIZE = 8
_BANKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BANKS_LOCK = threading.Lock()  # the LRU's dict operations (threads serving one model); never held while stacking


def _stack(tensors: list) -> torch.Tensor:
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


class PARAGenerator(nn.Module):
    """Attached to a decoder layer as ``para_generator``: the adapters resident in that layer."""

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()

    def bank(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named adapters' weights stacked along a leading adapter axis A (a view when A=1),
        in the layout of ``para::generate``: w_down [A,d,r], b_down [A,r], w_up [A,r,N], ...

        A stack of several adapters (a mixed batch's prefill) is a copy of their weights: it is
        cached (``BANK_CACHE_SIZE`` per layer) and rebuilt when any of its tensors changed (another
        parameter object: delete / load / add; another ``_version``: an optimizer step or any
        in-place edit; another storage: ``.to()``, ``.data =``). A forward that records autograd
        for these weights (grad enabled and one of them requires grad) stacks afresh, so that the
        gradient reaches the parameters; a cached stack never carries autograd history."""
        modules = self.adapters._modules
        params = [modules[n]._parameters for n in names]  # in WEIGHT_NAMES order (weight_shapes)
        if len(params) == 1:
            return {key: p.unsqueeze(0) for key, p in params[0].items()}
        flat = [p for ps in params for p in ps.values()]
        if BANK_CACHE_SIZE <= 0 or torch.compiler.is_compiling() or (
                torch.is_grad_enabled() and any(p.requires_grad for p in flat)):
            return {key: _stack([ps[key] for ps in params]) for key in params[0]}
        names = tuple(names)
        cache = _BANKS.get(self)
        entry = None if cache is None else cache.get(names)
        if entry is not None and len(entry[0]) == len(flat) and all(
                r() is p and p._version == v and p.data_ptr() == ptr
                for r, (v, ptr), p in zip(entry[0], entry[1], flat)):
            try:
                cache.move_to_end(names)  # least recently used last out
            except KeyError:  # evicted meanwhile by another thread: still valid for this forward
                pass
            return entry[2]
        with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable in any later mode
            out = {key: _stack([ps[key] for ps in params]) for key in params[0]}
        entry = ([weakref.ref(p) for p in flat], [(p._version, p.data_ptr()) for p in flat], out)
        with _BANKS_LOCK:
            cache = _BANKS.setdefault(self, OrderedDict())
            cache[names] = entry
            cache.move_to_end(names)
            while len(cache) > BANK_CACHE_SIZE:
                cache.popitem(last=False)
        return out

    def cached_banks(self) -> int:
        """How many stacked banks this layer keeps (for tests and memory accounting)."""
        return len(_BANKS.get(self, ()))

    def drop_banks(self, name: str | None = None) -> None:
        """Forget the cached stacks (those holding adapter ``name``, or all)."""
        with _BANKS_LOCK:
            cache = _BANKS.get(self)
            if cache:
                for names in [n for n in cache if name is None or name in n]:
                    del cache[names]


class PARALayer:
    """PARA's side of decoder layer ``index`` (``layer``). ``plans`` and ``module_index`` are the
    PARAModel's registry ({adapter: plan with .maps}, {(layer index, module path): k}), shared,
    not copied. ``once(key, register)`` is the PARAModel's: it calls ``register()`` (which
    returns a removable handle) unless ``key`` was registered before."""

    def __init__(self, index: int, layer: nn.Module, plans: dict, module_index: dict):
        self.index, self.layer = index, layer
        self.plans, self.module_index = plans, module_index
        self.device = None  # the layer's execution device (set by add_adapter): the generators live there
        self.module_devices: dict[int, torch.device] = {}  # k -> where scaled module k computes

    def add_adapter(self, adapter_name: str, config: PARAConfig, lmap: LayerMap, d: int, n: int,
                    dtype: torch.dtype, once) -> None:
        """A fresh (frozen) generator for ``adapter_name`` in this layer, on the layer's execution
        device (offloaded layers included), and the hooks its modules need."""
        layer = self.layer
        if not hasattr(layer, GENERATOR_ATTR):
            setattr(layer, GENERATOR_ATTR, PARAGenerator())
        device = self.device = execution_device(layer)
        weights = AdapterWeights(config, d, n, dtype, device).requires_grad_(False)
        getattr(layer, GENERATOR_ATTR).adapters[adapter_name] = weights
        self.install(lmap, config, once)

    def install(self, lmap: LayerMap, config: PARAConfig, once) -> None:
        """The layer's pre-hook, the norm's hook (pool_input='normed'), and for every scaled
        module its consumer: a fused GLU, a fused linear, else a forward hook (consumers.py)."""
        i, layer = self.index, self.layer
        once((i, "<layer>"), functools.partial(layer.register_forward_pre_hook, layer_pre_hook(self),
                                                with_kwargs=True))
        if config.pool_input == "normed":
            norm = layer.get_submodule(lmap.norm)
            once((i, "<norm>"), functools.partial(norm.register_forward_hook, norm_hook(self)))
        for m in lmap.modules:
            module = layer.get_submodule(m.path)
            k = self.module_index.setdefault((i, m.path), len(self.module_index))
            self.module_devices[k] = execution_device(module)
            glu = consumers.glu_parts(layer, m.path) if m.segments[-1].target == "up" else None
            if m.kind == "experts":  # MoE: the routed experts' up halves (mapping.py)
                once((i, m.path), functools.partial(consumers.ForwardOverride, module,
                                                    consumers.scaled_experts_forward(module, k)))
            elif glu is not None:
                mlp, act = glu
                once((i, m.path), functools.partial(consumers.ForwardOverride, mlp,
                                                    consumers.scaled_glu_forward(mlp, act, k)))
            elif consumers.is_fusable_linear(module, m):
                once((i, m.path), functools.partial(consumers.ForwardOverride, module,
                                                    consumers.scaled_linear_forward(module, k)))
            else:
                once((i, m.path), functools.partial(module.register_forward_hook, consumers.scale_hook(k)))

    def compute(self, state: RequestState, hidden: torch.Tensor, source: str) -> None:
        """pool -> generate for every adapter group of the request whose pool_input is
        ``source``; the per-module scales are multiplied together (rows outside a group get
        ones from it)."""
        i = self.index
        generator = getattr(self.layer, GENERATOR_ATTR)
        if state.token_rows is not None:  # packed: ranges index the flattened tokens
            hidden = hidden.reshape(-1, hidden.shape[-1])
        # a layer's forward pre-hooks run before accelerate's hook moves its input, so under a
        # device_map the hidden states may still be on the previous layer's device
        device = self.device or hidden.device
        hidden = hidden.to(device)
        start, end, ids = state.on(device)  # moved once per device per request
        for group, group_ids in zip(state.groups, ids):
            try:
                config, lmap = group.config, self.plans[group.names[0]].maps[i]
                if config.pool_input != source or lmap is None:
                    continue
                bank = generator.bank(group.names)
            except KeyError as e:  # another thread deleted it mid-prefill: no vectors, not a cryptic KeyError
                raise RequestStateError(
                    f"adapter {e.args[0]!r} was deleted while a request using it was being prefilled (e.g. by another "
                    "thread): the request has no vectors for it; delete an adapter only when no request uses it, "
                    "or run the request again") from None
            w_sa = bank["w_sa"][group_ids.clamp(min=0)].to(hidden.dtype) if "w_sa" in bank else None
            v = ops.pool_generate(hidden, start, end, config.pooler, w_sa, bank["w_down"],
                                  bank["b_down"], bank["w_up"], bank["b_up"], group_ids, config.activation,
                                  bank.get("act_params")).to(hidden.dtype)
            sizes = [lmap.sizes[t] for t in config.targets]
            pieces = dict(zip(config.targets, v.split(sizes, dim=1)))
            for m in lmap.modules:
                s = module_scale(m, pieces, v.shape[0], v)
                if s is not None:
                    k = self.module_index[(i, m.path)]
                    state.put(k, s.to(self.module_devices.get(k, device)))  # where the module computes


def layer_pre_hook(para: PARALayer):
    """The decoder layer's forward pre-hook: pools its input (the residual stream) at prefill."""
    compute = para.compute

    def hook(layer, args, kwargs):
        state = ACTIVE.get()
        if state is None:
            raise RequestStateError(
                "a PARA-transformed decoder layer ran outside a forward of its PARAModel, so PARA does not "
                "know its prompt: call the wrapped model as a whole (the PARAModel or its get_base_model()); for "
                "activation checkpointing use PARAModel.gradient_checkpointing_enable")
        if not state.ready and state.groups:
            compute(state, args[0] if args else kwargs["hidden_states"], "residual")
    return hook


def norm_hook(para: PARALayer):
    """The input norm's forward hook (pool_input='normed'): pools the norm's output at prefill."""
    compute = para.compute

    def hook(norm, args, output):
        state = ACTIVE.get()
        if state is not None and not state.ready and state.groups:
            compute(state, output, "normed")
    return hook
