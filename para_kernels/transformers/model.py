"""PARAModel: PARA on any Hugging Face decoder, with the API PEFT users know (the model-level tuner).

Holds the wrapper and its adapter registry: ``peft_config`` (adapter -> PARAConfig), the plan of
each adapter (which layers / modules it maps, d, N, its modules_to_save paths), which adapters
train, the active adapter, the decoder layers (``_layers``) and each scaled module's index
(``_module_index``), and every hook handle it installed (``unload()`` removes them all and
returns the backbone as it was). The rest lives beside it:

- layer.py: what PARA does at one decoder layer (the ``para_generator`` module with each
  adapter's weights, the hook that pools and generates the vectors at prefill);
- consumers.py: how a q / v / up module applies its scale;
- requests.py: the hooks on the wrapped model that find each forward's request (prefill or
  continuation), and a call's routing (adapter_names, prompt_lengths);
- state.py: the request's state (its vectors), which no module holds;
- saved.py: modules_to_save copies and the forward that routes rows to them;
- io.py: adapter files (PEFT's folder layout, Hub ids).

Invariants: adapters are added, deleted and activated only here; the backbone's parameters stay
frozen (their requires_grad is restored by unload()); nothing per request is kept on the
wrapper. PEFT's ``PeftModel`` names and arguments are kept where PARA can honour them;
``merge_and_unload`` / ``merge_adapter`` raise (the vectors depend on the prompt, so no weight
holds them). After ``unload()`` every call raises UnloadedError. docs/api.md lists the public
API; docs/requests.md gives the request rules.
"""
from __future__ import annotations

import functools
import math
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import PARAConfig
from . import consumers, io, saved
from .layer import GENERATOR_ATTR, PARALayer, weight_shapes
from .mapping import MappingError, find_layers, map_layer
from .requests import (
    BASE_ROW,
    OPENED,
    RequestHooks,
    cache_of,
    checkpoint_func,
    empty_cache,
    refuse_reentrant_checkpointing,
)
from .state import DISABLED, RequestState, checkpoint_context_fn

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
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (a Hugging Face causal LM), got {type(model).__name__}")
        if config is not None and not isinstance(config, PARAConfig):
            raise TypeError(f"config must be a PARAConfig or None, got {type(config).__name__}")
        if any(hasattr(m, GENERATOR_ATTR) for m in model.modules()):
            raise ValueError("this model already carries PARA generators; add adapters to its PARAModel "
                             "with add_adapter(), or unload() it first")
        refuse_reentrant_checkpointing(model.modules(), "the model")
        self.base_model = model  # registered as "base_model" (state dict keys); read it as _model
        self.__dict__["_model"] = model  # not a second registration: a plain reference
        self.peft_config: dict[str, PARAConfig] = {}
        self.active_adapter: str | None = None
        self._plans: dict[str, _Plan] = {}
        self._trainable: dict[str, bool] = {}
        self._layers = None  # plain list: not registered twice as submodules
        self._para_layers: dict[int, PARALayer] = {}  # layer index -> PARA's side of it (layer.py)
        # modules_to_save: {adapter: {escaped module path: the adapter's copy}}; registered here,
        # not in the backbone, so the backbone's own state dict stays the backbone's
        self.saved_modules = nn.ModuleDict()
        self._handles: list = []
        self._hooked: set = set()
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        # Nothing per request lives here (state.py): the model knows which scaled module has
        # which index in a RequestState's scales; its request hooks, which state each KV cache
        # was prefilled with.
        self._module_index: dict[tuple, int] = {}  # (layer, module path) -> k
        self._requests = RequestHooks(self)
        self._handles += self._requests.install(model)
        self._handles += self._requests.install_wrapper(self)
        # checkpointing the backbone already had on (e.g. prepare_model_for_kbit_training's) recomputes
        # in backward, after the forward's request state was popped: give it PARA's context_fn
        self._handles += [CheckpointContext(m) for m in model.modules() if checkpoint_func(m) is not None]
        if "bitsandbytes" in sys.modules:  # 4-bit layers keep the layout training needs (_cpu_packed_4bit)
            self._handles += [consumers.MethodOverride(m, "support_avx512bf16_for_cpu", lambda _: False)
                              for m in _cpu_packed_4bit(model)]
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
            if name == "_model":
                raise
            if self.__dict__.get("_unloaded"):
                raise AttributeError(f"this PARAModel was unloaded, so it has no {name!r}: use the model "
                                     "unload() returned") from None
            return getattr(self._model, name)

    def _check_usable(self) -> None:
        if self._unloaded:
            raise UnloadedError("this PARAModel was unloaded (its hooks and generators are removed): use the model "
                                "unload() returned, or wrap it again with get_para_model / PARAModel.from_pretrained")

    def get_base_model(self) -> nn.Module:
        """The wrapped Hugging Face model (with PARA's hooks in place)."""
        self._check_usable()
        return self._model

    @property
    def base_model(self) -> nn.Module:
        """transformers' ``base_model``: the wrapped model's decoder backbone (``LlamaModel`` of a
        ``LlamaForCausalLM``; the model itself when it names none), as TRL's fused LM head and
        transformers' utilities read it. Called inside a call of this PARAModel it runs in that
        call's request; the whole wrapped model is ``get_base_model()``."""
        self._check_usable()
        model = self._model
        return getattr(model, "base_model", model)

    @property
    def active_adapters(self) -> list[str]:
        """The active adapter as a list (PEFT's name); empty when none is resident."""
        return [] if self.active_adapter is None else [self.active_adapter]

    @property
    def _hf_peft_config_loaded(self) -> bool:
        """transformers' flag for "adapters are attached to this model": Trainer reads it to allow
        training a quantized (or GGUF-dequantized) backbone that carries trainable adapters."""
        return bool(self.peft_config)

    def merge_and_unload(self, *args, **kwargs):
        raise NotImplementedError(MERGE_ERROR)

    def merge_adapter(self, *args, **kwargs):
        raise NotImplementedError(MERGE_ERROR)

    # ------------------------------------------------------------------ adapters
    def _plan(self, config: PARAConfig) -> _Plan:
        """Map ``config`` onto the model, or raise an error that says what does not fit."""
        _, layers = find_layers(self._model, config)
        if self._layers is not None and list(layers) != self._layers:
            raise MappingError("this adapter's layers_path selects other layers than the resident adapters'")
        n_layers = len(layers)
        chosen = config.layers_to_transform
        if chosen is not None and chosen[-1] >= n_layers:
            raise MappingError(f"layers_to_transform {chosen} names layer {chosen[-1]}, but the model has "
                               f"{n_layers} decoder layers (0..{n_layers - 1})")
        hf_config = getattr(self._model, "config", None)
        maps = [map_layer(layer, hf_config, config) if chosen is None or i in chosen else None
                for i, layer in enumerate(layers)]
        sizes = next(m.sizes for m in maps if m is not None)
        uneven = [i for i, m in enumerate(maps) if m is not None and m.sizes != sizes]
        if uneven:  # e.g. dense and mixture-of-experts layers mixed: one generator size N per adapter
            raise MappingError(f"decoder layers {uneven} scale {maps[uneven[0]].sizes} features, the first "
                               f"mapped layer {sizes}; choose layers of one kind with layers_to_transform")
        d = getattr(hf_config, "hidden_size", None)
        if d is None:
            raise MappingError("the model's config has no hidden_size, so the generator's input size is unknown")
        to_save = saved.find(self._model, config, layers)
        if self._layers is None:
            self._layers = list(layers)
        return _Plan(maps, d, sum(sizes[t] for t in config.targets), to_save)

    def _expected_tensors(self, config: PARAConfig, plan: _Plan) -> dict[str, tuple]:
        shapes = {f"layers.{i}.{k}": s for i, m in enumerate(plan.maps) if m is not None
                  for k, s in weight_shapes(config, plan.d, plan.n).items()}
        for path in plan.saved:
            for k, p in self._model.get_submodule(path).named_parameters():
                shapes[f"{saved.SAVED_PREFIX}.{path}.{k}"] = tuple(p.shape)
        return shapes

    def add_adapter(self, adapter_name: str, config: PARAConfig) -> None:
        """Give every mapped layer a fresh generator for ``adapter_name`` (W_up = 0: no effect
        until trained). The new adapter is resident but not active; see set_adapter."""
        self._check_usable()
        if not isinstance(config, PARAConfig):
            raise TypeError(f"config must be a PARAConfig, got {type(config).__name__}")
        _check_new_name(adapter_name, self.peft_config)
        plan = self._plan(config)
        base_dtype = next(self._model.parameters()).dtype
        dtype = torch.float64 if base_dtype == torch.float64 else torch.float32
        for i, (layer, lmap) in enumerate(zip(self._layers, plan.maps)):
            if lmap is None:
                continue
            para = self._para_layers.get(i)
            if para is None:
                para = self._para_layers[i] = PARALayer(i, layer, self._plans, self._module_index)
            para.add_adapter(adapter_name, config, lmap, plan.d, plan.n, dtype, self._once)
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
            module = self._model.get_submodule(path)
            copies[saved.escape(path)] = saved.frozen_copy(module)
            self._once(("<saved>", path), functools.partial(consumers.ForwardOverride, module,
                                                            saved.routed_forward(self, path)))
        self.saved_modules[adapter_name] = copies

    def _once(self, key, register) -> None:
        """Install a hook or override (``register()`` returns its handle) unless ``key`` was."""
        if key not in self._hooked:
            self._hooked.add(key)
            self._handles.append(register())

    def _adapter_weights(self, adapter_name: str):
        """(layer index, AdapterWeights) for every layer the adapter lives in."""
        for i, layer in enumerate(self._layers or []):
            adapters = getattr(layer, GENERATOR_ATTR, None)
            if adapters is not None and adapter_name in adapters.adapters:
                yield i, adapters.adapters[adapter_name]

    def _check_known(self, adapter_name: str, argument: str = "adapter_name") -> None:
        if not isinstance(adapter_name, str):
            raise TypeError(f"{argument}: an adapter name must be a str, got {adapter_name!r}")
        if adapter_name not in self.peft_config:
            raise ValueError(f"{argument}: unknown adapter {adapter_name!r}; resident adapters: "
                             f"{sorted(self.peft_config)}")

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
        if not isinstance(inference_mode, bool):
            raise TypeError(f"inference_mode must be a bool, got {inference_mode!r}")
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
            generator = getattr(self._layers[i], GENERATOR_ATTR)
            del generator.adapters[adapter_name]
            generator.drop_banks(adapter_name)  # its cached stacks (layer.py) go with it
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
        """(trainable, total) counted as PEFT counts them: a bitsandbytes 4-bit weight (two values
        per stored byte) counts numel * 2 * its storage's element size."""
        params = list(self._model.parameters()) + list(self.saved_modules.parameters())
        counts = [(_n_params(p), p.requires_grad) for p in params]
        return sum(n for n, grad in counts if grad), sum(n for n, _ in counts)

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
        self._para_layers.clear()
        for layer in self._layers or []:
            if hasattr(layer, GENERATOR_ATTR):
                delattr(layer, GENERATOR_ATTR)
        for name in list(self.saved_modules):
            del self.saved_modules[name]
        model = self._model
        for name, p in model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))
        self.peft_config.clear()
        self.active_adapter = None
        self._unloaded = True
        return model

    # ------------------------------------------------------------------ running
    def forward(self, input_ids=None, attention_mask=None, labels=None, prompt_lengths=None,
                adapter_names=None, reprefill: bool = False, completion_mask=None, assistant_masks=None,
                **kwargs):
        """The wrapped model's forward. prompt_lengths [B]: prompt tokens per row (counted from
        its first attended token; packed rows: one per example); else completion_mask [B, T]
        (1 on the answer's tokens; assistant_masks alike): the prompt is what precedes a row's
        first marked token; else the labels' -100 prefix; else all attended tokens.
        adapter_names: one adapter name or None (or PEFT's "__base__") per row; default: the
        active adapter. A forward given a KV cache PARA prefilled reuses that request's vectors;
        reprefill=True empties the cache first and prefills ``input_ids`` (the whole
        conversation) as a new prompt. The call's pre-hook (requests.py) reads these arguments
        and opens the request, so whatever forward runs in this call (this one, accelerate's
        autocast wrapper of it, TRL's fused LM head) runs in it."""
        self._check_usable()
        if OPENED.get() is not self._requests:  # called as pm.forward(...): go through the call's hooks
            return self(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                        prompt_lengths=prompt_lengths, adapter_names=adapter_names, reprefill=reprefill,
                        completion_mask=completion_mask, assistant_masks=assistant_masks, **kwargs)
        return self._model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    def generate(self, *args, adapter_names=None, reprefill: bool = False, **kwargs):
        """The wrapped model's generate(); the vectors come from this call's input (the prompt)
        and are reused at every later step, cached or not. adapter_names: one adapter name or
        None per row. Given a past_key_values PARA prefilled, generation continues that request
        with its vectors (a new user turn keeps the first prompt's vectors); reprefill=True
        empties that cache and prefills the whole ``input_ids`` as the prompt instead."""
        self._check_usable()
        batch = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if not isinstance(reprefill, bool):
            raise TypeError(f"reprefill must be a bool, got {reprefill!r}")
        if reprefill:
            empty_cache(cache_of(kwargs))
        with self._requests.calling(adapter_names, None, None if batch is None else batch.shape[0]):
            return self._model.generate(*args, **kwargs)

    def request_state(self, past_key_values) -> RequestState | None:
        """The state (vectors) a KV cache was prefilled with through this model; None if none."""
        return self._requests.cache_states.get(past_key_values)

    # ------------------------------------------------------------------ training helpers
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        """As the wrapped model's, but always non-reentrant: the PARA vectors reach a layer's
        projections through hooks, not as checkpoint inputs, and a reentrant checkpoint's
        recompute would backpropagate through them a second time."""
        if gradient_checkpointing_kwargs is not None and not isinstance(gradient_checkpointing_kwargs, dict):
            raise TypeError("gradient_checkpointing_kwargs must be a dict or None, got "
                            f"{gradient_checkpointing_kwargs!r}")
        ckpt = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if ckpt["use_reentrant"]:
            raise ValueError("PARA needs non-reentrant activation checkpointing: pass "
                             "gradient_checkpointing_kwargs={'use_reentrant': False} (the default)")
        # the recompute runs in backward, after this forward's request state was popped
        user_fn = ckpt.get("context_fn")
        if not getattr(user_fn, "para_checkpoint", False):
            ckpt["context_fn"] = checkpoint_context_fn(user_fn)
        base = self._model
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x: no deprecation warning
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt, **kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        """The transformers 5 name of :meth:`gradient_checkpointing_enable` (what Trainer calls)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    # ------------------------------------------------------------------ status
    def _layer_names(self) -> list[str]:
        names = {id(m): n for n, m in self._model.named_modules()}
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
            base_model_type=type(self._model).__name__, adapter_model_type=type(self).__name__,
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
        if not isinstance(adapters, (list, tuple)):
            raise TypeError(f"adapters must be a list of adapter names, got {adapters!r}")
        if not isinstance(weights, (list, tuple)) or any(
                isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) for w in weights):
            raise ValueError(f"weights must be a list of finite numbers (one per adapter), got {weights!r}")
        _check_new_name(adapter_name, self.peft_config)
        adapters, weights = list(adapters), [float(w) for w in weights]
        if combination_type != "cat":
            raise ValueError(f"combination_type must be 'cat' (the exact combination PARA supports), got "
                             f"{combination_type!r}: an SVD or linear mix of generators is not the weighted sum "
                             "of their vectors")
        if not adapters or len(adapters) != len(weights):
            raise ValueError(f"adapters and weights must be non-empty and of equal length, got {len(adapters)} "
                             f"adapters and {len(weights)} weights")
        for name in adapters:
            self._check_known(name, "adapters")
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
            for k, p in self.saved_modules[adapter_name][saved.escape(path)].named_parameters():
                tensors[f"{saved.SAVED_PREFIX}.{path}.{k}"] = p
        return tensors

    def _base_model_name(self, config: PARAConfig) -> tuple[str | None, str | None]:
        """(base_model_name_or_path, revision) to record: the config's if set, else the model's
        (None for a model built from a config: no name identifies its weights)."""
        if config.base_model_name_or_path:
            return config.base_model_name_or_path, config.revision
        hf_config = getattr(self._model, "config", None)
        name = getattr(self._model, "name_or_path", None) or getattr(hf_config, "_name_or_path", None) or None
        revision = config.revision or (getattr(hf_config, "_commit_hash", None) if name else None)
        return name, revision

    def save_pretrained(self, save_directory: str, selected_adapters=None, is_main_process: bool = True,
                        safe_serialization: bool = True, allow_non_finite: bool = False, **kwargs) -> None:
        """As PEFT: adapter ``default`` at ``save_directory`` itself, any other in
        ``save_directory/<name>/``; each folder: adapter_model.safetensors + adapter_config.json.
        Only the main process writes (is_main_process=False: nothing is written). An adapter with a
        NaN / Inf weight (a diverged training step) is refused, nothing written, unless
        ``allow_non_finite``."""
        self._check_usable()
        if kwargs:
            raise TypeError(f"save_pretrained() got arguments PARA does not support: {sorted(kwargs)}")
        if not safe_serialization:
            raise ValueError("safe_serialization=False asks for pickled weights; para_kernels writes safetensors "
                             "only (nothing it loads is unpickled)")
        if not isinstance(save_directory, (str, os.PathLike)):
            raise TypeError(f"save_directory must be a folder path (str or os.PathLike), got {save_directory!r}")
        if selected_adapters is not None and not (isinstance(selected_adapters, (list, tuple)) and selected_adapters):
            raise TypeError(f"selected_adapters must be a non-empty list of adapter names (or None: all), got "
                            f"{selected_adapters!r}")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            self._check_known(name, "selected_adapters")
        if not allow_non_finite:
            for name in names:
                for key, t in self._adapter_tensors(name).items():
                    if not bool(torch.isfinite(t.detach()).all()):
                        raise ValueError(f"adapter {name!r} has non-finite values (NaN / Inf) in tensor {key}: it "
                                         "diverged; nothing was saved (pass allow_non_finite=True to save it anyway)")
        if not is_main_process:
            return
        hf_config = getattr(self._model, "config", None)
        for name in names:
            config, plan = self.peft_config[name], self._plans[name]
            base_name, revision = self._base_model_name(config)
            written = io.with_fields(config, base_model_name_or_path=base_name, revision=revision,
                                     inference_mode=True)
            info = {"model_type": getattr(hf_config, "model_type", None), "hidden_size": plan.d,
                    "num_layers": len(plan.maps), "generator_outputs": plan.n}
            folder = os.path.join(save_directory, io.adapter_subfolder(name))
            io.save_adapter(folder, written, self._adapter_tensors(name), info)

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
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be an adapter folder or a Hub repo id (str), got {path!r}")
        _check_new_name(adapter_name, self.peft_config)
        for arg, value in (("is_trainable", is_trainable), ("local_files_only", local_files_only)):
            if not isinstance(value, bool):
                raise TypeError(f"{arg} must be a bool, got {value!r}")
        for arg, value in (("subfolder", subfolder), ("revision", revision), ("cache_dir", cache_dir)):
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise TypeError(f"{arg} must be a str or None, got {value!r}")
        folder = io.resolve_adapter(path, adapter_name, subfolder, revision=revision, token=token,
                                    cache_dir=cache_dir, local_files_only=local_files_only)
        config, info = io.read_config(folder)
        config = io.with_fields(config, inference_mode=not is_trainable)
        try:
            plan = self._plan(config)
        except MappingError as e:
            raise io.AdapterFileError(f"the adapter in {folder} does not fit this model: {e}") from None
        if info.get("hidden_size") not in (None, plan.d) or info.get("num_layers") not in (None, len(plan.maps)):
            raise io.AdapterFileError(f"the adapter in {folder} was saved for hidden size {info.get('hidden_size')} "
                                      f"and {info.get('num_layers')} layers; this model has {plan.d} and "
                                      f"{len(plan.maps)}")
        # names, shapes and dtypes checked against the model before any tensor is read
        tensors = io.read_weights(folder, self._expected_tensors(config, plan), config)
        self.add_adapter(adapter_name, config)
        try:
            with torch.no_grad():
                for key, p in self._adapter_tensors(adapter_name).items():
                    p.copy_(tensors[key])
        except BaseException:
            self.delete_adapter(adapter_name)
            raise
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


def _cpu_packed_4bit(model: nn.Module) -> list:
    """The bitsandbytes Linear4bit modules that may repack their weight for CPU inference. On CPU
    with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place at its first forward in eval mode
    without grad: the packed matmul has no backward (a model trained after an evaluation gets no
    gradient through its 4-bit layers: every generator's gradient is zero) and the quantization
    state's absmax is rounded to bf16 (the frozen weights change). PARA switches that repacking off
    while it wraps the model (unload() restores it) and puts a weight already repacked back in the
    layout training uses, as bitsandbytes' own state_dict() and .cuda() do."""
    found = []
    for module in model.modules():
        if not module.__dict__.get("support_avx512bf16_for_cpu", False):
            continue
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        found.append(module)
    return found


def _check_new_name(adapter_name, resident) -> None:
    """Raise unless ``adapter_name`` may name a new adapter (add_adapter, load_adapter, add_weighted_adapter)."""
    if not isinstance(adapter_name, str) or not adapter_name or any(c in adapter_name for c in "./\\"):
        raise ValueError(f"adapter_name must be a non-empty string without '.', '/' or '\\', got {adapter_name!r}")
    if adapter_name == BASE_ROW:
        raise ValueError(f"adapter_name {BASE_ROW!r} is reserved: in adapter_names it means the bare backbone")
    if adapter_name in resident:
        raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter() it first or pick another name")


def _n_params(p: torch.Tensor) -> int:
    """A parameter's count as PEFT's get_nb_trainable_parameters gives it (Params4bit packs two
    4-bit values per byte of its storage)."""
    n = p.numel()
    if type(p).__name__ == "Params4bit":
        size = p.element_size() if hasattr(p, "element_size") else getattr(p, "quant_storage", torch.uint8).itemsize
        n *= 2 * size
    return n


class CheckpointContext:
    """A handle: a module's (non-reentrant) checkpoint function, set by the backbone before it
    was wrapped, with PARA's context_fn added (its recompute sees the forward's request state);
    ``remove()`` puts the original back."""

    def __init__(self, module: nn.Module):
        self.module, self.original = module, module.__dict__["_gradient_checkpointing_func"]
        keywords = {}
        func = self.original
        while isinstance(func, functools.partial):
            keywords = {**func.keywords, **keywords}
            func = func.func
        user_fn = keywords.get("context_fn")
        self.installed = self.original
        if not getattr(user_fn, "para_checkpoint", False):
            self.installed = functools.partial(self.original, context_fn=checkpoint_context_fn(user_fn))
            module._gradient_checkpointing_func = self.installed

    def remove(self) -> None:
        if self.module.__dict__.get("_gradient_checkpointing_func") is self.installed:  # not set again since
            self.module._gradient_checkpointing_func = self.original


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


def get_para_model(model: nn.Module, config: PARAConfig, adapter_name: str = "default",
                   revision: str | None = None) -> PARAModel:
    """Freeze ``model`` and give it a trainable PARA adapter ``adapter_name`` (active; frozen if
    config.inference_mode). revision: the backbone's revision, recorded in the saved config (PEFT's
    get_peft_model argument)."""
    if not isinstance(config, PARAConfig):
        raise TypeError(f"config must be a PARAConfig, got {type(config).__name__}")
    if revision is not None:
        config = io.with_fields(config, revision=revision)
    return PARAModel(model, config, adapter_name)
