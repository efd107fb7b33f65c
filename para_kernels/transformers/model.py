"""PARAModel: PARA on any Hugging Face decoder, with the API PEFT users know.

How a batch flows: a pre-hook on the wrapped model works out each row's prompt range and
adapter; a pre-hook on every decoder layer pools that layer's input and generates the
vectors (one ``pool_generate`` per adapter group); the q / v / up projections then rescale
their outputs (``scale`` in a forward hook, or a fused consumer — see consumers.py). A forward
that continues a request (a KV cache PARA prefilled, or a later step of one generate call)
reuses that request's vectors unchanged (PARA_SPEC §2). The vectors belong to the request, not
to the model: state.py says where they live; docs/requests.md gives the rules.

The PEFT surface (``PeftModel``'s names and arguments) is kept where PARA can honour it:
save/load in PEFT's folder layout and from Hub ids (io.py), ``get_base_model``,
``active_adapters``, ``add_weighted_adapter`` (exact: concatenated generators),
``get_layer_status`` / ``get_model_status``, ``push_to_hub`` (the adapter folder only),
``modules_to_save`` (each adapter's own copy of a module outside the decoder layers, registered
on the PARAModel, not in the backbone; a row goes through the copy of its request's adapter,
else the active adapter's; rows without adapter and disable_adapter() through the original). What
PARA cannot do (``merge_and_unload``: the vectors depend on the prompt, so no weight holds them)
raises an error that says why. After ``unload()`` the wrapper refuses every call.
"""
from __future__ import annotations

import copy
import functools
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import ops
from ..config import PARAConfig
from . import consumers, io
from .generator import AdapterWeights, PARAGenerator, weight_shapes
from .mapping import LayerMap, MappingError, find_layers, map_layer, module_scale
from .prompts import is_packed, packed_prompts, prompt_ranges
from .state import (ACTIVE, CALL, DISABLED, SESSION, TOKENS, AdapterGroup, CacheStates, CallOptions,
                    GenerateSession, RequestState, RequestStateError, checkpoint_context_fn)

GENERATOR_ATTR = "para_generator"
SAVED_PREFIX = "modules_to_save"  # tensor names of an adapter's module copies: modules_to_save.<path>.<param>
BASE_ROW = "__base__"  # PEFT's adapter_names entry for a row without adapter (as None)
MERGE_ERROR = (
    "PARA adapters cannot be merged into the model's weights: PARA's vectors are computed from each "
    "prompt (pool -> generate at every layer), so the scale of q / v / up differs from one request to the "
    "next and no fixed weight can hold it. unload() returns the bare backbone (every hook and generator "
    "removed); keep the PARAModel to serve the adapters (several adapters share one batch, for the cost of "
    "an elementwise multiply per token).")


class UnloadedError(RuntimeError):
    """A PARAModel used after unload(): its hooks and generators are gone."""


@dataclass
class LayerStatus:
    """One transformed decoder layer, with the fields of PEFT's TunerLayerStatus."""
    name: str
    module_type: str
    enabled: bool
    active_adapters: list
    merged_adapters: list
    requires_grad: dict
    available_adapters: list
    devices: dict
    scaled_modules: list = field(default_factory=list)  # q / v / up projections this layer rescales


@dataclass
class ModelStatus:
    """The whole model, with the fields of PEFT's ModelStatus."""
    base_model_type: str
    adapter_model_type: str
    peft_types: dict
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool
    active_adapters: list
    merged_adapters: list
    requires_grad: dict
    available_adapters: list
    devices: dict


@dataclass
class _Plan:
    """Where one adapter attaches: the layer maps (None: layer not transformed), d and N, and
    the paths of the backbone modules it keeps a copy of (modules_to_save)."""
    maps: list
    d: int
    n: int
    saved: list = field(default_factory=list)


class PARAModel(nn.Module):
    """A Hugging Face causal LM with PARA adapters. Build it with :func:`get_para_model`."""

    def __init__(self, model: nn.Module, config: PARAConfig | None = None, adapter_name: str = "default"):
        super().__init__()
        self._unloaded = False
        if any(hasattr(m, GENERATOR_ATTR) for m in model.modules()):
            raise ValueError("this model already carries PARA generators; add adapters to its PARAModel "
                             "with add_adapter(), or unload() it first")
        self.base_model = model
        self.peft_config: dict[str, PARAConfig] = {}
        self.active_adapter: str | None = None
        self._plans: dict[str, _Plan] = {}
        self._trainable: dict[str, bool] = {}
        self._layers = None  # plain list: not registered twice as submodules
        # modules_to_save: {adapter: {escaped module path: the adapter's copy}}; registered here,
        # not in the backbone, so the backbone's own state dict stays the backbone's
        self.saved_modules = nn.ModuleDict()
        self._handles: list = []
        self._hooked: set = set()
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        # Nothing per request lives here (state.py): the model knows which scaled module has
        # which index in a RequestState's scales, and which state each KV cache was prefilled with.
        self._module_index: dict[tuple, int] = {}  # (layer, module path) -> k
        self._cache_states = CacheStates()
        self._handles.append(model.register_forward_pre_hook(self._before_model, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._after_model, always_call=True))
        if hasattr(model, "generate"):
            self._handles.append(consumers.MethodOverride(model, "generate", self._generate_session))
        for method in ("generate_batch", "init_continuous_batching"):
            if hasattr(model, method):
                self._handles.append(consumers.MethodOverride(model, method, _no_continuous_batching))
        if hasattr(model, "save_pretrained"):  # the backbone's own files stay the backbone's
            self._handles.append(consumers.MethodOverride(model, "save_pretrained",
                                                           functools.partial(_without_generators, model)))
        if config is not None:
            try:
                self.add_adapter(adapter_name, config)
            except Exception:
                self.unload()  # a failed wrap leaves the model as it was (no hooks, grads restored)
                raise
            self.set_adapter(adapter_name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            if self.__dict__.get("_unloaded"):
                raise AttributeError(f"this PARAModel was unloaded, so it has no {name!r}: use the model "
                                     "unload() returned") from None
            return getattr(self.base_model, name)

    def _check_usable(self) -> None:
        if self._unloaded:
            raise UnloadedError("this PARAModel was unloaded (its hooks and generators are removed): use the model "
                                "unload() returned, or wrap it again with get_para_model / PARAModel.from_pretrained")

    def get_base_model(self) -> nn.Module:
        """The wrapped Hugging Face model (with PARA's hooks in place)."""
        self._check_usable()
        return self.base_model

    @property
    def active_adapters(self) -> list[str]:
        """The active adapter as a list (PEFT's name); empty when none is resident."""
        return [] if self.active_adapter is None else [self.active_adapter]

    def merge_and_unload(self, *args, **kwargs):
        raise NotImplementedError(MERGE_ERROR)

    def merge_adapter(self, *args, **kwargs):
        raise NotImplementedError(MERGE_ERROR)

    # ------------------------------------------------------------------ adapters
    def _plan(self, config: PARAConfig) -> _Plan:
        """Map ``config`` onto the model, or raise an error that says what does not fit."""
        _, layers = find_layers(self.base_model, config)
        if self._layers is not None and list(layers) != self._layers:
            raise MappingError("this adapter's layers_path selects other layers than the resident adapters'")
        n_layers = len(layers)
        chosen = config.layers_to_transform
        if chosen is not None and chosen[-1] >= n_layers:
            raise MappingError(f"layers_to_transform {chosen} names layer {chosen[-1]}, but the model has "
                               f"{n_layers} decoder layers (0..{n_layers - 1})")
        hf_config = getattr(self.base_model, "config", None)
        maps = [map_layer(layer, hf_config, config) if chosen is None or i in chosen else None
                for i, layer in enumerate(layers)]
        sizes = next(m.sizes for m in maps if m is not None)
        d = getattr(hf_config, "hidden_size", None)
        if d is None:
            raise MappingError("the model's config has no hidden_size, so the generator's input size is unknown")
        saved = self._modules_to_save(config, layers)
        if self._layers is None:
            self._layers = list(layers)
        return _Plan(maps, d, sum(sizes[t] for t in config.targets), saved)

    def _modules_to_save(self, config: PARAConfig, layers) -> list[str]:
        """The backbone module paths config.modules_to_save names (PEFT's suffix match)."""
        inside = {id(m) for layer in layers for m in layer.modules()}
        found = []
        for key in config.modules_to_save or ():
            paths = [n for n, m in self.base_model.named_modules() if n and (n == key or n.endswith("." + key))]
            if not paths:
                raise MappingError(f"modules_to_save names {key!r}, but the model has no module of that name "
                                   "(e.g. 'lm_head')")
            in_layers = [n for n in paths if id(self.base_model.get_submodule(n)) in inside]
            if in_layers:
                raise MappingError(f"modules_to_save {key!r} matches {in_layers}, inside the decoder layers, whose "
                                   "projections PARA rescales; name modules outside them (a head, the embeddings, "
                                   "the final norm)")
            found += paths
        return sorted(set(found))

    def _expected_tensors(self, config: PARAConfig, plan: _Plan) -> dict[str, tuple]:
        shapes = {f"layers.{i}.{k}": s for i, m in enumerate(plan.maps) if m is not None
                  for k, s in weight_shapes(config, plan.d, plan.n).items()}
        for path in plan.saved:
            for k, p in self.base_model.get_submodule(path).named_parameters():
                shapes[f"{SAVED_PREFIX}.{path}.{k}"] = tuple(p.shape)
        return shapes

    def add_adapter(self, adapter_name: str, config: PARAConfig) -> None:
        """Give every mapped layer a fresh generator for ``adapter_name`` (W_up = 0: no effect
        until trained). The new adapter is resident but not active; see set_adapter."""
        self._check_usable()
        if not isinstance(config, PARAConfig):
            raise TypeError(f"config must be a PARAConfig, got {type(config).__name__}")
        if not isinstance(adapter_name, str) or not adapter_name or any(c in adapter_name for c in "./\\"):
            raise ValueError(f"adapter_name must be a non-empty string without '.', '/' or '\\', got {adapter_name!r}")
        if adapter_name == BASE_ROW:
            raise ValueError(f"adapter_name {BASE_ROW!r} is reserved: in adapter_names it means the bare backbone")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter() it first or pick another name")
        plan = self._plan(config)
        base_dtype = next(self.base_model.parameters()).dtype
        dtype = torch.float64 if base_dtype == torch.float64 else torch.float32
        for i, (layer, lmap) in enumerate(zip(self._layers, plan.maps)):
            if lmap is None:
                continue
            if not hasattr(layer, GENERATOR_ATTR):
                setattr(layer, GENERATOR_ATTR, PARAGenerator())
            device = next(layer.parameters()).device
            weights = AdapterWeights(config, plan.d, plan.n, dtype, device).requires_grad_(False)
            getattr(layer, GENERATOR_ATTR).adapters[adapter_name] = weights
            self._install_hooks(i, layer, lmap, config)
        if plan.saved:
            self._add_module_copies(adapter_name, plan.saved)
        self.peft_config[adapter_name] = config
        self._plans[adapter_name] = plan
        self._trainable[adapter_name] = not config.inference_mode

    def _add_module_copies(self, adapter_name: str, paths: list[str]) -> None:
        """The adapter's own (frozen until set_adapter) copy of each module in ``paths``, and on
        each original module, once, a forward that routes every row to its adapter's copy."""
        copies = nn.ModuleDict()
        for path in paths:
            module = self.base_model.get_submodule(path)
            duplicate = copy.deepcopy(module).requires_grad_(False)
            if getattr(duplicate.__dict__.get("forward"), "para_routing", False):
                del duplicate.forward  # the copy runs itself, not the router copied with it
            copies[_escape(path)] = duplicate
            if ("<saved>", path) not in self._hooked:
                self._hooked.add(("<saved>", path))
                self._handles.append(consumers.ForwardOverride(module, self._routed_forward(path)))
        self.saved_modules[adapter_name] = copies

    def _saved_module_rows(self, batch: int) -> list | None:
        """The adapter of each row for modules_to_save (None: all rows use the original): the
        running request's routing, else the active adapter."""
        state = ACTIVE.get()
        if DISABLED.get() or (state is not None and state.disabled):
            return None
        requested = None if state is None else state.requested
        if requested is None or batch % len(requested):
            return [self.active_adapter] * batch
        return _per_row(requested, batch)

    def _routed_forward(self, path: str):
        key = _escape(path)

        def make(original):
            def forward(*args, **kwargs):
                x = args[0] if args else next(iter(kwargs.values()))
                rows = self._saved_module_rows(x.shape[0])
                copies = {} if rows is None else {
                    n: self.saved_modules[n][key] for n in set(rows)
                    if n is not None and n in self.saved_modules and key in self.saved_modules[n]}
                if not copies:
                    return original(*args, **kwargs)
                if len(set(rows)) == 1:
                    return copies[rows[0]](*args, **kwargs)
                if not args:
                    raise TypeError(f"modules_to_save: {path} was called without a positional input, so its rows "
                                    "cannot be split among adapters")
                pieces, order = [], []
                for name in dict.fromkeys(rows):  # a mixed batch: each row through its adapter's copy
                    idx = [i for i, r in enumerate(rows) if r == name]
                    sub = x.index_select(0, torch.tensor(idx, device=x.device))
                    pieces.append(copies.get(name, original)(sub, *args[1:], **kwargs))
                    order += idx
                inverse = torch.argsort(torch.tensor(order, device=pieces[0].device))
                return torch.cat(pieces).index_select(0, inverse)
            forward.para_routing = True
            return forward
        return make

    def _install_hooks(self, i: int, layer: nn.Module, lmap: LayerMap, config: PARAConfig) -> None:
        def once(key, register):
            if key not in self._hooked:
                self._hooked.add(key)
                self._handles.append(register())

        once((i, "<layer>"), functools.partial(layer.register_forward_pre_hook, self._layer_hook(i),
                                                with_kwargs=True))
        if config.pool_input == "normed":
            norm = layer.get_submodule(lmap.norm)
            once((i, "<norm>"), functools.partial(norm.register_forward_hook, self._norm_hook(i)))
        for m in lmap.modules:
            module = layer.get_submodule(m.path)
            k = self._module_index.setdefault((i, m.path), len(self._module_index))
            glu = consumers.glu_parts(layer, m.path) if m.segments[-1].target == "up" else None
            if glu is not None:
                mlp, act = glu
                once((i, m.path), functools.partial(consumers.ForwardOverride, mlp,
                                                    consumers.scaled_glu_forward(mlp, act, k)))
            elif consumers.is_fusable_linear(module, m):
                once((i, m.path), functools.partial(consumers.ForwardOverride, module,
                                                    consumers.scaled_linear_forward(module, k)))
            else:
                once((i, m.path), functools.partial(module.register_forward_hook, consumers.scale_hook(k)))

    def _adapter_weights(self, adapter_name: str):
        """(layer index, AdapterWeights) for every layer the adapter lives in."""
        for i, layer in enumerate(self._layers or []):
            adapters = getattr(layer, GENERATOR_ATTR, None)
            if adapters is not None and adapter_name in adapters.adapters:
                yield i, adapters.adapters[adapter_name]

    def _check_known(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; resident adapters: {sorted(self.peft_config)}")

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the one every row uses by default, and the one that trains
        (frozen when inference_mode, or when it was loaded without is_trainable)."""
        self._check_usable()
        if isinstance(adapter_name, (list, tuple)):
            if len(adapter_name) != 1:
                raise ValueError(
                    f"set_adapter takes one adapter name, got {list(adapter_name)}: PARA activates one adapter at a "
                    "time. To serve several, pass adapter_names=[one name per row] to forward / generate; to "
                    "combine them into one, use add_weighted_adapter(adapters, weights, adapter_name)")
            adapter_name = adapter_name[0]
        if not isinstance(adapter_name, str):
            raise TypeError(f"adapter_name must be a str, got {type(adapter_name).__name__}")
        self._check_known(adapter_name)
        self.active_adapter = adapter_name
        for name in self.peft_config:
            trainable = name == adapter_name and self._trainable[name] and not inference_mode
            for _, weights in self._adapter_weights(name):
                weights.requires_grad_(trainable)
            if name in self.saved_modules:
                self.saved_modules[name].requires_grad_(trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_usable()
        self._check_known(adapter_name)
        for i, _ in list(self._adapter_weights(adapter_name)):
            del getattr(self._layers[i], GENERATOR_ATTR).adapters[adapter_name]
        if adapter_name in self.saved_modules:
            del self.saved_modules[adapter_name]
        del self.peft_config[adapter_name], self._plans[adapter_name], self._trainable[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.peft_config), None)
            if self.active_adapter is not None:
                self.set_adapter(self.active_adapter)

    @contextmanager
    def disable_adapter(self):
        """Run the bare backbone inside this context (in this thread / task only: the switch is
        private to the caller, like every per-call setting)."""
        self._check_usable()
        token = DISABLED.set(True)
        try:
            yield
        finally:
            DISABLED.reset(token)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = list(self.base_model.parameters()) + list(self.saved_modules.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    def unload(self) -> nn.Module:
        """Remove every hook and generator and return the original model, as it was. The
        wrapper is unusable afterwards (every call raises UnloadedError)."""
        self._check_usable()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooked.clear()
        self._module_index.clear()
        for layer in self._layers or []:
            if hasattr(layer, GENERATOR_ATTR):
                delattr(layer, GENERATOR_ATTR)
        for name in list(self.saved_modules):
            del self.saved_modules[name]
        model = self.base_model
        for name, p in model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
        self.peft_config.clear()
        self.active_adapter = None
        self._unloaded = True
        return model

    # ------------------------------------------------------------------ running
    @contextmanager
    def _calling(self, adapter_names, prompt_lengths, batch_size: int | None):
        """This call's routing, checked (adapter_names: one adapter name or None per row), as the
        CALL context variable for the hooks of the forwards it makes."""
        if adapter_names is not None:
            if isinstance(adapter_names, str) or not hasattr(adapter_names, "__len__"):
                raise ValueError(f"adapter_names must be a list with one adapter name (or None) per row, "
                                 f"got {adapter_names!r}")
            adapter_names = [None if name == BASE_ROW else name for name in adapter_names]
            if batch_size is not None and len(adapter_names) != batch_size:
                raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has "
                                 f"{batch_size} rows; give one adapter name (or None) per row")
            for name in adapter_names:
                if name is not None:
                    self._check_known(name)
        token = CALL.set(CallOptions(adapter_names, prompt_lengths))
        try:
            yield
        finally:
            CALL.reset(token)

    def forward(self, input_ids=None, attention_mask=None, labels=None, prompt_lengths=None,
                adapter_names=None, reprefill: bool = False, **kwargs):
        """The wrapped model's forward. prompt_lengths [B]: prompt tokens per row (counted from
        its first attended token; packed rows: one per example); else the labels' -100 prefix,
        else all attended tokens. adapter_names: one adapter name or None (or PEFT's "__base__")
        per row; default: the active adapter. A forward given a KV cache PARA prefilled reuses that request's vectors;
        reprefill=True empties the cache first and prefills ``input_ids`` (the whole
        conversation) as a new prompt."""
        self._check_usable()
        batch = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if reprefill:
            _empty_cache(_cache_of(kwargs))
        with self._calling(adapter_names, prompt_lengths, None if batch is None else batch.shape[0]):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    def generate(self, *args, adapter_names=None, reprefill: bool = False, **kwargs):
        """The wrapped model's generate(); the vectors come from this call's input (the prompt)
        and are reused at every later step, cached or not. adapter_names: one adapter name or
        None per row. Given a past_key_values PARA prefilled, generation continues that request
        with its vectors (a new user turn keeps the first prompt's vectors); reprefill=True
        empties that cache and prefills the whole ``input_ids`` as the prompt instead."""
        self._check_usable()
        batch = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if reprefill:
            _empty_cache(_cache_of(kwargs))
        with self._calling(adapter_names, None, None if batch is None else batch.shape[0]):
            return self.base_model.generate(*args, **kwargs)

    def _generate_session(self, original):
        """The wrapped model's generate, with a session that holds the first forward's vectors
        for the later steps (installed on the model, so a direct base_model.generate gets it too)."""
        def generate(*args, **kwargs):
            token = SESSION.set(GenerateSession(self))
            try:
                return original(*args, **kwargs)
            finally:
                SESSION.reset(token)
        return generate

    def request_state(self, past_key_values) -> RequestState | None:
        """The state (vectors) a KV cache was prefilled with through this model; None if none."""
        return self._cache_states.get(past_key_values)

    def _route(self, call: CallOptions, batch: int) -> list:
        """The adapter (or None) of each of this forward's rows."""
        if DISABLED.get():
            return [None] * batch
        rows = call.adapter_names
        if rows is None:
            return [self.active_adapter] * batch
        if batch % len(rows):
            raise ValueError(f"adapter_names has {len(rows)} entries but the batch has {batch} rows")
        return _per_row(rows, batch)

    def _make_groups(self, rows: list, device) -> list[AdapterGroup]:
        by_signature: dict[tuple, list] = {}
        for name in dict.fromkeys(r for r in rows if r is not None):
            by_signature.setdefault(self.peft_config[name].generator_signature(), []).append(name)
        groups = []
        for names in by_signature.values():
            index = {n: k for k, n in enumerate(names)}
            ids = torch.tensor([index.get(r, -1) for r in rows], dtype=torch.long, device=device)
            groups.append(AdapterGroup(self.peft_config[names[0]], names, ids))
        return groups

    def _new_state(self, kwargs: dict, call: CallOptions, batch: int, length: int, device) -> RequestState:
        """A prefill's state: each row's (or packed example's) prompt range and adapter."""
        mask, labels, positions = kwargs.get("attention_mask"), kwargs.get("labels"), kwargs.get("position_ids")
        rows = self._route(call, batch)
        token_rows = None
        if is_packed(positions, mask, batch, length):
            start, end, token_rows, example_row = packed_prompts(positions, batch, length, device, mask, labels,
                                                                 call.prompt_lengths)
            rows = [rows[b] for b in example_row.tolist()]
        else:
            start, end = prompt_ranges(batch, length, device, mask, labels, call.prompt_lengths)
        n = len(self._module_index)
        requested = None if call.adapter_names is None else tuple(call.adapter_names)
        return RequestState(batch, requested, self._make_groups(rows, device), start, end, token_rows,
                            [None] * n, [None] * n, disabled=DISABLED.get())

    def _refuse_continuation(self, state: RequestState, batch: int, call: CallOptions) -> None:
        """Raise the error that says why this forward cannot continue ``state``'s request."""
        if batch != state.batch:
            raise RequestStateError(f"this forward continues a request prefilled with {state.batch} rows, but "
                                    f"has {batch} rows")
        if state.token_rows is not None:
            raise RequestStateError("this forward continues packed rows (several sequences in one row): packed "
                                    "rows can be trained and scored, not continued; generate from unpacked rows")
        if DISABLED.get() != state.disabled:
            raise RequestStateError(
                f"disable_adapter() is {'on' if DISABLED.get() else 'off'} for a forward that continues a request "
                f"prefilled with it {'on' if state.disabled else 'off'}: a request keeps its prefill's vectors, so "
                "disable the adapters for the whole request (prefill included) or for none of it")
        raise RequestStateError(
            f"adapter_names {call.adapter_names} differ from those this request was prefilled with "
            f"({None if state.requested is None else list(state.requested)}): a request keeps its prefill's "
            "vectors; start a new request (a fresh cache) to change adapters")

    def _before_model(self, module, args, kwargs):
        # Runs at every forward, decode steps included: the path that continues a request is
        # written out here, without helper calls, because its Python cost is what PARA adds to
        # every generated token.
        try:
            cache = kwargs.get("past_key_values")  # _cache_of, written out (per-token path)
            if cache is None:
                cache = kwargs.get("cache")
            cached = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
            x = kwargs.get("input_ids")
            if x is None:
                x = args[0] if args else kwargs.get("inputs_embeds")
            call = CALL.get()
            session = SESSION.get()
            if session is not None and session.owner is not self:
                session = None  # another model's generate (e.g. an assistant's)
            state = None
            if cached > 0:  # continues the request this cache was prefilled with
                entry = self._cache_states.by_id.get(id(cache))
                state = entry[1] if entry is not None and entry[0]() is cache else None
                if state is None:
                    _refuse_paged(cache)
                    raise RequestStateError(
                        f"this forward continues a KV cache ({cached} tokens) that PARA has no vectors for: the "
                        "vectors come from the prompt, so the cache must be prefilled through this PARAModel "
                        "(or pass reprefill=True with the whole conversation to start the request again)")
            elif session is not None:  # a later step of this generate call, uncached
                state = session.state
            if state is not None:
                if (x.shape[0] != state.batch or state.token_rows is not None or DISABLED.get() != state.disabled
                        or (call.adapter_names is not None and tuple(call.adapter_names) != state.requested)):
                    self._refuse_continuation(state, x.shape[0], call)
                if len(state.scales) < len(self._module_index):  # an adapter was added since the prefill
                    state.fit(len(self._module_index))
            else:  # a prefill: a new request
                _refuse_paged(cache)
                state = self._new_state(kwargs, call, x.shape[0], x.shape[1], x.device)
                if cache is not None:
                    self._cache_states.put(cache, state)
            if session is not None and session.state is None:
                session.state = state
            state.plain = (state.token_rows is None and not torch.is_grad_enabled()
                           and not torch.compiler.is_compiling()
                           and ops.backend_for("scale", x.device) == "reference")
        except Exception:
            TOKENS.set(TOKENS.get() + (ACTIVE.set(None),))  # the post-hook (always called) pops it
            raise
        TOKENS.set(TOKENS.get() + (ACTIVE.set(state),))

    def _after_model(self, module, args, output):
        tokens = TOKENS.get()
        if not tokens:
            return
        state = ACTIVE.get()
        ACTIVE.reset(tokens[-1])
        TOKENS.set(tokens[:-1])
        if state is None or state.ready:
            return
        state.ready = True  # the prefill ended: every layer's vectors are in
        cache = None if output is None else getattr(output, "past_key_values", None)
        if cache is not None and not isinstance(cache, (tuple, list)) and state.token_rows is None:
            self._cache_states.put(cache, state)  # a cache the model made itself (use_cache, none given)

    def _layer_hook(self, i: int):
        def hook(layer, args, kwargs):
            state = ACTIVE.get()
            if state is None:
                raise RequestStateError(
                    "a PARA-transformed decoder layer ran outside a forward of its PARAModel, so PARA does not "
                    "know its prompt: call the wrapped model as a whole (PARAModel or its base_model); for "
                    "activation checkpointing use PARAModel.gradient_checkpointing_enable")
            if not state.ready and state.groups:
                self._compute(state, i, args[0] if args else kwargs["hidden_states"], "residual")
        return hook

    def _norm_hook(self, i: int):
        def hook(norm, args, output):
            state = ACTIVE.get()
            if state is not None and not state.ready and state.groups:
                self._compute(state, i, output, "normed")
        return hook

    def _compute(self, state: RequestState, i: int, hidden: torch.Tensor, source: str) -> None:
        """pool -> generate for every adapter group of the request at layer i; the per-module
        scales are multiplied together (rows outside a group get ones from it)."""
        generator = getattr(self._layers[i], GENERATOR_ATTR)
        if state.token_rows is not None:  # packed: ranges index the flattened tokens
            hidden = hidden.reshape(-1, hidden.shape[-1])
        for group in state.groups:
            config, lmap = group.config, self._plans[group.names[0]].maps[i]
            if config.pool_input != source or lmap is None:
                continue
            bank = generator.bank(group.names)
            w_sa = bank["w_sa"][group.ids.clamp(min=0)].to(hidden.dtype) if "w_sa" in bank else None
            v = ops.pool_generate(hidden, state.start, state.end, config.pooler, w_sa, bank["w_down"],
                                  bank["b_down"], bank["w_up"], bank["b_up"], group.ids, config.activation,
                                  bank.get("act_params")).to(hidden.dtype)
            pieces = dict(zip(config.targets, v.split([lmap.sizes[t] for t in config.targets], dim=1)))
            for m in lmap.modules:
                s = module_scale(m, pieces, v.shape[0], v)
                if s is not None:
                    state.put(self._module_index[(i, m.path)], s)

    # ------------------------------------------------------------------ training helpers
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        """As the wrapped model's, but always non-reentrant: the PARA vectors reach a layer's
        projections through hooks, not as checkpoint inputs, and a reentrant checkpoint's
        recompute would backpropagate through them a second time."""
        ckpt = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if ckpt["use_reentrant"]:
            raise ValueError("PARA needs non-reentrant activation checkpointing: pass "
                             "gradient_checkpointing_kwargs={'use_reentrant': False} (the default)")
        # the recompute runs in backward, after this forward's request state was popped
        user_fn = ckpt.get("context_fn")
        if not getattr(user_fn, "para_checkpoint", False):
            ckpt["context_fn"] = checkpoint_context_fn(user_fn)
        base = self.base_model
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x: no deprecation warning
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt, **kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        """The transformers 5 name of :meth:`gradient_checkpointing_enable` (what Trainer calls)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    # ------------------------------------------------------------------ status
    def _layer_names(self) -> list[str]:
        names = {id(m): n for n, m in self.base_model.named_modules()}
        return [names.get(id(layer), str(i)) for i, layer in enumerate(self._layers or [])]

    def get_layer_status(self) -> list[LayerStatus]:
        """One entry per decoder layer that holds a PARA generator (PEFT's TunerLayerStatus)."""
        self._check_usable()
        status = []
        for i, name in enumerate(self._layer_names()):
            generator = getattr(self._layers[i], GENERATOR_ATTR, None)
            if generator is None or not len(generator.adapters):
                continue
            resident = sorted(generator.adapters)
            grads = {a: all(p.requires_grad for p in generator.adapters[a].parameters()) for a in resident}
            devices = {a: sorted({p.device.type for p in generator.adapters[a].parameters()}) for a in resident}
            scaled = sorted({m.path for a in resident for m in (self._plans[a].maps[i].modules
                                                                if self._plans[a].maps[i] else ())})
            status.append(LayerStatus(
                name=name, module_type="PARAGenerator", enabled=not DISABLED.get(),
                active_adapters=[a for a in self.active_adapters if a in resident], merged_adapters=[],
                requires_grad=grads, available_adapters=resident, devices=devices, scaled_modules=scaled))
        return status

    def get_model_status(self) -> ModelStatus:
        """The layers' status summed up (PEFT's ModelStatus)."""
        layers = self.get_layer_status()
        trainable, total = self.get_nb_trainable_parameters()
        grads: dict = {}
        devices: dict = {}
        for layer in layers:
            for a, flag in layer.requires_grad.items():
                grads[a] = flag if grads.get(a, flag) == flag else "irregular"
            for a, devs in layer.devices.items():
                devices[a] = sorted(set(devices.get(a, [])) | set(devs))
        return ModelStatus(
            base_model_type=type(self.base_model).__name__, adapter_model_type=type(self).__name__,
            peft_types={a: io.PEFT_TYPE for a in self.peft_config}, trainable_params=trainable, total_params=total,
            num_adapter_layers=len(layers), enabled=not DISABLED.get(), active_adapters=self.active_adapters,
            merged_adapters=[], requires_grad=grads, available_adapters=sorted(self.peft_config), devices=devices)

    # ------------------------------------------------------------------ combining
    def add_weighted_adapter(self, adapters, weights, adapter_name: str, combination_type: str = "cat") -> None:
        """Add ``adapter_name`` whose vectors are exactly 1 + Σ w_i (v_i - 1), v_i the vectors of
        ``adapters[i]``. The generators are concatenated along r (W_down, b_down side by side,
        the up-projections stacked with w_i W_up_i, b_up = Σ w_i b_up_i): exact when the adapters
        pool the same vector from the prompt and share the activation, so they must agree on
        everything but r (and the attn pooler's w_sa, the rational activation's parameters must
        be equal). The new adapter is resident, not active, frozen unless made trainable."""
        self._check_usable()
        adapters, weights = list(adapters), [float(w) for w in weights]
        if combination_type != "cat":
            raise ValueError(f"combination_type must be 'cat' (the exact combination PARA supports), got "
                             f"{combination_type!r}: an SVD or linear mix of generators is not the weighted sum "
                             "of their vectors")
        if not adapters or len(adapters) != len(weights):
            raise ValueError(f"adapters and weights must be non-empty and of equal length, got {len(adapters)} "
                             f"adapters and {len(weights)} weights")
        for name in adapters:
            self._check_known(name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter() it first or pick another name")
        configs = [self.peft_config[a] for a in adapters]
        with_copies = [a for a, c in zip(adapters, configs) if c.modules_to_save]
        if with_copies:
            raise ValueError(f"add_weighted_adapter cannot combine {with_copies}: they keep modules_to_save copies, "
                             "and a weighted sum of modules' weights is not the weighted sum of their outputs' effect")
        first = configs[0]
        for name, config in zip(adapters[1:], configs[1:]):
            if io.with_fields(config, r=first.r) != first:
                raise ValueError(
                    f"add_weighted_adapter is exact only for adapters that differ in r alone: {adapters[0]!r} has "
                    f"{first.generator_signature()[1:]}, {name!r} has {config.generator_signature()[1:]} "
                    "(pooler, activation, targets, pool_input, target_modules, layers, layers_path)")
        self._check_shared(adapters, "w_sa", "the attn pooler's w_sa (the pooled vector depends on it)")
        self._check_shared(adapters, "act_params", "the rational activation's parameters")
        combined = io.with_fields(first, r=sum(c.r for c in configs), inference_mode=True)
        self.add_adapter(adapter_name, combined)
        self._trainable[adapter_name] = False
        parts = {a: dict(self._adapter_weights(a)) for a in adapters}
        with torch.no_grad():
            for i, target in self._adapter_weights(adapter_name):
                sources = [parts[a][i] for a in adapters]
                target.w_down.copy_(torch.cat([s.w_down for s in sources], dim=1))
                target.b_down.copy_(torch.cat([s.b_down for s in sources]))
                target.w_up.copy_(torch.cat([w * s.w_up for w, s in zip(weights, sources)], dim=0))
                target.b_up.copy_(sum(w * s.b_up for w, s in zip(weights, sources)))
                for shared in ("w_sa", "act_params"):
                    if hasattr(target, shared):
                        getattr(target, shared).copy_(getattr(sources[0], shared))

    def _check_shared(self, adapters: list, weight: str, what: str) -> None:
        """Raise unless every adapter has the same ``weight`` tensor in every layer (or none)."""
        first = dict(self._adapter_weights(adapters[0]))
        for name in adapters[1:]:
            for i, w in self._adapter_weights(name):
                mine, theirs = getattr(first[i], weight, None), getattr(w, weight, None)
                if mine is not None and not torch.equal(mine, theirs):
                    raise ValueError(f"add_weighted_adapter cannot combine {adapters[0]!r} and {name!r} exactly: "
                                     f"{what} differ (layer {i}); the weighted sum of their vectors is not one "
                                     "generator's output")

    # ------------------------------------------------------------------ files
    def _adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        tensors = {f"layers.{i}.{k}": p for i, w in self._adapter_weights(adapter_name)
                   for k, p in w.named_parameters()}
        for path in self._plans[adapter_name].saved:
            for k, p in self.saved_modules[adapter_name][_escape(path)].named_parameters():
                tensors[f"{SAVED_PREFIX}.{path}.{k}"] = p
        return tensors

    def _base_model_name(self, config: PARAConfig) -> tuple[str | None, str | None]:
        """(base_model_name_or_path, revision) to record: the config's if set, else the model's
        (None for a model built from a config: no name identifies its weights)."""
        if config.base_model_name_or_path:
            return config.base_model_name_or_path, config.revision
        hf_config = getattr(self.base_model, "config", None)
        name = getattr(self.base_model, "name_or_path", None) or getattr(hf_config, "_name_or_path", None) or None
        revision = config.revision or (getattr(hf_config, "_commit_hash", None) if name else None)
        return name, revision

    def save_pretrained(self, save_directory: str, selected_adapters=None, is_main_process: bool = True,
                        safe_serialization: bool = True, **kwargs) -> None:
        """As PEFT: adapter ``default`` at ``save_directory`` itself, any other in
        ``save_directory/<name>/``; each folder: adapter_model.safetensors + adapter_config.json.
        Only the main process writes (is_main_process=False: nothing is written)."""
        self._check_usable()
        if kwargs:
            raise TypeError(f"save_pretrained() got arguments PARA does not support: {sorted(kwargs)}")
        if not safe_serialization:
            raise ValueError("safe_serialization=False asks for pickled weights; para_kernels writes safetensors "
                             "only (nothing it loads is unpickled)")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            self._check_known(name)
        if not is_main_process:
            return
        hf_config = getattr(self.base_model, "config", None)
        for name in names:
            config, plan = self.peft_config[name], self._plans[name]
            base_name, revision = self._base_model_name(config)
            saved = io.with_fields(config, base_model_name_or_path=base_name, revision=revision,
                                   inference_mode=True)
            info = {"model_type": getattr(hf_config, "model_type", None), "hidden_size": plan.d,
                    "num_layers": len(plan.maps), "generator_outputs": plan.n}
            folder = os.path.join(save_directory, io.adapter_subfolder(name))
            io.save_adapter(folder, saved, self._adapter_tensors(name), info)

    def push_to_hub(self, repo_id: str, selected_adapters=None, private: bool | None = None, token=None,
                    revision: str | None = None, commit_message: str = "Upload PARA adapter",
                    create_pr: bool = False):
        """Upload the adapter folder save_pretrained writes (never the backbone) to Hub repo
        ``repo_id`` (created if missing); returns the commit info."""
        self._check_usable()
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory(prefix="para_push_") as folder:
            self.save_pretrained(folder, selected_adapters=selected_adapters)
            return api.upload_folder(repo_id=getattr(repo, "repo_id", repo_id), folder_path=folder,
                                     repo_type="model", revision=revision, commit_message=commit_message,
                                     create_pr=create_pr)

    def load_adapter(self, path: str, adapter_name: str = "default", is_trainable: bool = False,
                     subfolder: str | None = None, revision: str | None = None, token=None,
                     cache_dir: str | None = None, local_files_only: bool = False) -> None:
        """Load an adapter saved by save_pretrained as ``adapter_name``; frozen unless is_trainable.
        ``path``: a folder or a Hub repo id; the adapter is read from its ``adapter_name``
        subfolder when there is one (save_pretrained's layout), else from the folder itself."""
        self._check_usable()
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter() it first or pick another name")
        folder = io.resolve_adapter(path, adapter_name, subfolder, revision=revision, token=token,
                                    cache_dir=cache_dir, local_files_only=local_files_only)
        config, info, tensors = io.read_adapter(folder)
        config = io.with_fields(config, inference_mode=not is_trainable)
        try:
            plan = self._plan(config)
        except MappingError as e:
            raise io.AdapterFileError(f"the adapter in {folder} does not fit this model: {e}") from None
        expected = self._expected_tensors(config, plan)
        if info.get("hidden_size") not in (None, plan.d) or info.get("num_layers") not in (None, len(plan.maps)):
            raise io.AdapterFileError(f"the adapter in {folder} was saved for hidden size {info.get('hidden_size')} "
                                      f"and {info.get('num_layers')} layers; this model has {plan.d} and "
                                      f"{len(plan.maps)}")
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or extra:
            raise io.AdapterFileError(f"the adapter in {folder} does not match this model: missing tensors "
                                      f"{missing[:4]}, unexpected tensors {extra[:4]}")
        for key, shape in expected.items():
            if tuple(tensors[key].shape) != shape or not tensors[key].is_floating_point():
                raise io.AdapterFileError(f"tensor {key} in {folder} has shape {list(tensors[key].shape)} "
                                          f"({tensors[key].dtype}); this model needs {list(shape)} floats")
        self.add_adapter(adapter_name, config)
        with torch.no_grad():
            for key, p in self._adapter_tensors(adapter_name).items():
                p.copy_(tensors[key])
        self._trainable[adapter_name] = is_trainable
        if self.active_adapter is None:
            self.set_adapter(adapter_name)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str, adapter_name: str = "default",
                        is_trainable: bool = False, **load_kwargs) -> "PARAModel":
        """Wrap ``model`` and load the adapter saved at ``path`` (a folder or a Hub repo id; see
        load_adapter for ``subfolder``, ``revision``, ``token``, ``cache_dir``, ``local_files_only``)."""
        para = cls(model)
        try:
            para.load_adapter(path, adapter_name, is_trainable=is_trainable, **load_kwargs)
        except Exception:
            para.unload()
            raise
        return para


def _per_row(names, batch: int) -> list:
    """One name per row: generate() repeats each row of the call for beams / return sequences."""
    return [name for name in names for _ in range(batch // len(names))]


def _cache_of(kwargs: dict):
    """The KV cache a call was given: ``past_key_values``, else ``cache`` (its name from
    transformers 5.2x)."""
    cache = kwargs.get("past_key_values")
    return kwargs.get("cache") if cache is None else cache


def _escape(path: str) -> str:
    """A module path as a ModuleDict key (no dots)."""
    return path.replace(".", "__")


def _refuse_paged(cache) -> None:
    if type(cache).__name__ == "PagedAttentionCache":
        _no_continuous_batching(None)()


def _empty_cache(cache) -> None:
    """reprefill: the cache starts again, empty (the same object), so the whole input is prefilled
    as the prompt."""
    if cache is None or not hasattr(cache, "get_seq_length"):
        return
    if cache.get_seq_length() > 0:
        cache.reset()


def _without_generators(model: nn.Module, original):
    """The backbone's save_pretrained, minus the PARA generator tensors that live inside its
    layers while it is wrapped (they would reload as unexpected keys): the adapters are saved by
    PARAModel.save_pretrained."""
    marker = f".{GENERATOR_ATTR}."

    def save_pretrained(*args, state_dict=None, **kwargs):
        state_dict = model.state_dict() if state_dict is None else state_dict
        kept = {k: v for k, v in state_dict.items() if marker not in f".{k}"}
        return original(*args, state_dict=kept, **kwargs)
    return save_pretrained


def _no_continuous_batching(original):
    def refuse(*args, **kwargs):
        raise NotImplementedError(
            "PARA does not run under transformers' continuous batching (generate_batch / "
            "init_continuous_batching) yet: that engine packs every request's tokens into one row "
            "with a paged KV cache and does not tell the model which request each token belongs to, "
            "so PARA cannot give each request its own vectors. Use generate() with adapter_names "
            "(one per row) for mixed-adapter batches; docs/requests.md says what the engine would "
            "need to pass.")
    return refuse


def get_para_model(model: nn.Module, config: PARAConfig, adapter_name: str = "default",
                   revision: str | None = None) -> PARAModel:
    """Freeze ``model`` and give it a trainable PARA adapter ``adapter_name`` (active; frozen if
    config.inference_mode). revision: the backbone's revision, recorded in the saved config (PEFT's
    get_peft_model argument)."""
    if revision is not None:
        config = io.with_fields(config, revision=revision)
    return PARAModel(model, config, adapter_name)
