"""PARAModel: PARA on any Hugging Face decoder, with the API PEFT users know.

How a batch flows: a pre-hook on the wrapped model works out each row's prompt range and
adapter; a pre-hook on every decoder layer pools that layer's input and generates the
vectors (one ``pool_generate`` per adapter group); the q / v / up projections then rescale
their outputs (``scale`` in a forward hook, or a fused consumer — see consumers.py). A forward
that continues a request (a KV cache PARA prefilled, or a later step of one generate call)
reuses that request's vectors unchanged (PARA_SPEC §2). The vectors belong to the request, not
to the model: state.py says where they live; docs/requests.md gives the rules.
"""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from dataclasses import dataclass

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


@dataclass
class _Plan:
    """Where one adapter attaches: the layer maps (None: layer not transformed), d and N."""
    maps: list
    d: int
    n: int


class PARAModel(nn.Module):
    """A Hugging Face causal LM with PARA adapters. Build it with :func:`get_para_model`."""

    def __init__(self, model: nn.Module, config: PARAConfig | None = None, adapter_name: str = "default"):
        super().__init__()
        if any(hasattr(m, GENERATOR_ATTR) for m in model.modules()):
            raise ValueError("this model already carries PARA generators; add adapters to its PARAModel "
                             "with add_adapter(), or unload() it first")
        self.base_model = model
        self.peft_config: dict[str, PARAConfig] = {}
        self.active_adapter: str | None = None
        self._plans: dict[str, _Plan] = {}
        self._trainable: dict[str, bool] = {}
        self._layers = None  # plain list: not registered twice as submodules
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
            return getattr(self.base_model, name)

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
        if self._layers is None:
            self._layers = list(layers)
        return _Plan(maps, d, sum(sizes[t] for t in config.targets))

    def _expected_tensors(self, config: PARAConfig, plan: _Plan) -> dict[str, tuple]:
        return {f"layers.{i}.{k}": s for i, m in enumerate(plan.maps) if m is not None
                for k, s in weight_shapes(config, plan.d, plan.n).items()}

    def add_adapter(self, adapter_name: str, config: PARAConfig) -> None:
        """Give every mapped layer a fresh generator for ``adapter_name`` (W_up = 0: no effect
        until trained). The new adapter is resident but not active; see set_adapter."""
        if not isinstance(config, PARAConfig):
            raise TypeError(f"config must be a PARAConfig, got {type(config).__name__}")
        if not isinstance(adapter_name, str) or not adapter_name or any(c in adapter_name for c in "./\\"):
            raise ValueError(f"adapter_name must be a non-empty string without '.', '/' or '\\', got {adapter_name!r}")
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
        self.peft_config[adapter_name] = config
        self._plans[adapter_name] = plan
        self._trainable[adapter_name] = True

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

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the one every row uses by default, and the one that trains."""
        self._check_known(adapter_name)
        self.active_adapter = adapter_name
        for name in self.peft_config:
            trainable = name == adapter_name and self._trainable[name]
            for _, weights in self._adapter_weights(name):
                weights.requires_grad_(trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_known(adapter_name)
        for i, _ in list(self._adapter_weights(adapter_name)):
            del getattr(self._layers[i], GENERATOR_ATTR).adapters[adapter_name]
        del self.peft_config[adapter_name], self._plans[adapter_name], self._trainable[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.peft_config), None)
            if self.active_adapter is not None:
                self.set_adapter(self.active_adapter)

    @contextmanager
    def disable_adapter(self):
        """Run the bare backbone inside this context (in this thread / task only: the switch is
        private to the caller, like every per-call setting)."""
        token = DISABLED.set(True)
        try:
            yield
        finally:
            DISABLED.reset(token)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = list(self.base_model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    def unload(self) -> nn.Module:
        """Remove every hook and generator and return the original model, as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooked.clear()
        self._module_index.clear()
        for layer in self._layers or []:
            if hasattr(layer, GENERATOR_ATTR):
                delattr(layer, GENERATOR_ATTR)
        model = self.base_model
        for name, p in model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
        self.peft_config.clear()
        self.active_adapter = None
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
            adapter_names = list(adapter_names)
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
        else all attended tokens. adapter_names: one adapter name or None per row; default: the
        active adapter. A forward given a KV cache PARA prefilled reuses that request's vectors;
        reprefill=True empties the cache first and prefills ``input_ids`` (the whole
        conversation) as a new prompt."""
        batch = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if reprefill:
            _empty_cache(kwargs.get("past_key_values", kwargs.get("cache")))
        with self._calling(adapter_names, prompt_lengths, None if batch is None else batch.shape[0]):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    def generate(self, *args, adapter_names=None, reprefill: bool = False, **kwargs):
        """The wrapped model's generate(); the vectors come from this call's input (the prompt)
        and are reused at every later step, cached or not. adapter_names: one adapter name or
        None per row. Given a past_key_values PARA prefilled, generation continues that request
        with its vectors (a new user turn keeps the first prompt's vectors); reprefill=True
        empties that cache and prefills the whole ``input_ids`` as the prompt instead."""
        batch = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if reprefill:
            _empty_cache(kwargs.get("past_key_values", kwargs.get("cache")))
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
        return [name for name in rows for _ in range(batch // len(rows))]  # generate's beams / sequences

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
            cache = kwargs.get("past_key_values")
            if cache is None:
                cache = kwargs.get("cache")  # the name from transformers 5.2x
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

    # ------------------------------------------------------------------ files
    def _adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {f"layers.{i}.{k}": p for i, w in self._adapter_weights(adapter_name)
                for k, p in w.named_parameters()}

    def save_pretrained(self, save_directory: str, selected_adapters=None, **_) -> None:
        """Each adapter into ``save_directory/<adapter name>/``: adapter_model.safetensors and
        adapter_config.json."""
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            self._check_known(name)
        hf_config = getattr(self.base_model, "config", None)
        for name in names:
            config, plan = self.peft_config[name], self._plans[name]
            info = {"model_type": getattr(hf_config, "model_type", None), "hidden_size": plan.d,
                    "num_layers": len(plan.maps), "generator_outputs": plan.n,
                    "base_model_name_or_path": config.base_model_name_or_path
                    or getattr(hf_config, "_name_or_path", None)}
            io.save_adapter(os.path.join(save_directory, name), config, self._adapter_tensors(name), info)

    def load_adapter(self, path: str, adapter_name: str = "default", is_trainable: bool = False) -> None:
        """Load an adapter saved by save_pretrained (``path`` or ``path/adapter_name``) as
        ``adapter_name``; frozen unless is_trainable."""
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter() it first or pick another name")
        folder = io.adapter_folder(path, adapter_name)
        config, info, tensors = io.read_adapter(folder)
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
                        is_trainable: bool = False) -> "PARAModel":
        """Wrap ``model`` and load the adapter saved at ``path`` (or ``path/adapter_name``)."""
        para = cls(model)
        try:
            para.load_adapter(path, adapter_name, is_trainable=is_trainable)
        except Exception:
            para.unload()
            raise
        return para


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


def get_para_model(model: nn.Module, config: PARAConfig, adapter_name: str = "default") -> PARAModel:
    """Freeze ``model`` and give it a trainable PARA adapter ``adapter_name`` (active)."""
    return PARAModel(model, config, adapter_name)
