"""The wrapped model's request hooks: which request each forward belongs to.

Holds :class:`RequestHooks`, one per PARAModel, installed on the backbone itself (so a direct
``get_base_model()(...)`` or ``.generate(...)`` call is served the same way):

- a forward pre-hook that finds the forward's request: a *prefill* (no KV cache, or an empty
  one, outside a running generate session) gets a new :class:`RequestState` (each row's prompt
  range from prompts.py, each row's adapter from the call's routing), linked to the cache it was
  given; a forward that *continues* a request (a non-empty cache PARA prefilled, or a later step
  of the same generate call) gets that request's state, after checking that it fits (rows,
  adapter_names, disable_adapter(), not packed); anything else raises RequestStateError. The
  state is pushed on ``state.ACTIVE`` for the layers and consumers;
- a forward post-hook (``always_call``: also after an exception) that pops it, marks a
  prefill's vectors ready, and links the cache the model made itself;
- an override of ``generate`` that opens a :class:`GenerateSession`, and refusals of
  transformers' continuous batching (which does not say which request a token belongs to);
- ``calling()``: one forward / generate call's routing (adapter_names, prompt_lengths), checked,
  in the ``CALL`` context variable.

Invariants: no state of a request is kept here except the weak cache -> state map; the path
that continues a request (every decode step) is written out in :meth:`RequestHooks.before_model`
with no helper call. docs/requests.md gives the rules.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from .. import ops
from . import consumers
from .prompts import is_packed, mask_as_labels, packed_prompts, prompt_ranges
from .state import (
    ACTIVE,
    CALL,
    DISABLED,
    SESSION,
    TOKENS,
    AdapterGroup,
    CacheStates,
    CallOptions,
    GenerateSession,
    RequestState,
    RequestStateError,
)

BASE_ROW = "__base__"  # PEFT's adapter_names entry for a row without adapter (as None)
# PARAModel.forward's own arguments, in its order after input_ids, attention_mask, labels: the
# wrapper's pre-hook takes them out of the call, so that whatever forward runs (PARA's, accelerate's
# autocast wrapper, TRL's fused-LM-head forward) never sees them
PARA_ARGS = ("prompt_lengths", "adapter_names", "reprefill", "completion_mask", "assistant_masks")
FORWARD_ORDER = ("input_ids", "attention_mask", "labels") + PARA_ARGS
# The RequestHooks whose PARAModel call is running (its pre-hook opened the request): the wrapped
# model's own hooks then pass it through, whichever of its modules the forward calls
OPENED: ContextVar = ContextVar("para_opened", default=None)
WRAPPER_TOKENS: ContextVar[tuple] = ContextVar("para_wrapper_tokens", default=())


class RequestHooks:
    """The request hooks of one PARAModel (``model``: read at prefill for the active adapter, the
    resident adapters' configs and the scaled modules' count)."""

    def __init__(self, model):
        self.model = model
        self.module_index = model._module_index  # (layer, module path) -> k: its size is the scales' length
        self.cache_states = CacheStates()

    def install(self, base_model) -> list:
        """Hook ``base_model``; returns the handles (each with remove())."""
        handles = [base_model.register_forward_pre_hook(self.before_model, with_kwargs=True),
                   base_model.register_forward_hook(self.after_model, always_call=True)]
        if hasattr(base_model, "generate"):
            handles.append(consumers.MethodOverride(base_model, "generate", self.generate_session))
        for method in ("generate_batch", "init_continuous_batching"):
            if hasattr(base_model, method):
                handles.append(consumers.MethodOverride(base_model, method, no_continuous_batching))
        return handles

    def install_wrapper(self, wrapper) -> list:
        """Hook the PARAModel itself: a call of it is one request, opened before its forward runs
        (so a forward that calls the decoder backbone directly, as TRL's fused LM head does, runs
        inside it) and closed after; returns the handles."""
        return [wrapper.register_forward_pre_hook(self.before_wrapper, with_kwargs=True),
                wrapper.register_forward_hook(self.after_wrapper, always_call=True)]

    def before_wrapper(self, module, args, kwargs):
        """PARAModel.__call__: take PARA's arguments out of the call, set its routing (CALL) and
        open its request with everything the call says about the prompt (labels, masks)."""
        kwargs = dict(kwargs)
        for name, value in zip(FORWARD_ORDER, args):
            if name in kwargs:
                raise TypeError(f"PARAModel.forward() got multiple values for argument {name!r}")
            kwargs[name] = value
        para = {name: kwargs.pop(name, None) for name in PARA_ARGS}
        entry = [None, None, False]  # CALL's token, OPENED's token, whether before_model ran
        try:
            if not isinstance(para["reprefill"] or False, bool):
                raise TypeError(f"reprefill must be a bool, got {para['reprefill']!r}")
            if para["reprefill"]:
                empty_cache(cache_of(kwargs))
            x = kwargs.get("input_ids")
            x = kwargs.get("inputs_embeds") if x is None else x
            entry[0] = CALL.set(self.options(para["adapter_names"], para["prompt_lengths"],
                                             None if x is None else x.shape[0]))
            prompt_mask = mask_as_labels(para["completion_mask"], para["assistant_masks"],
                                         None if x is None else tuple(x.shape[:2]))
            seen = kwargs if prompt_mask is None else dict(kwargs, prompt_mask=prompt_mask)
            entry[2] = True  # before_model pushes onto TOKENS even when it raises
            self.before_model(module, (), seen)
            entry[1] = OPENED.set(self)
        except Exception:
            WRAPPER_TOKENS.set(WRAPPER_TOKENS.get() + (tuple(entry),))
            raise
        WRAPPER_TOKENS.set(WRAPPER_TOKENS.get() + (tuple(entry),))
        return (), kwargs

    def after_wrapper(self, module, args, output):
        tokens = WRAPPER_TOKENS.get()
        if not tokens:
            return
        WRAPPER_TOKENS.set(tokens[:-1])
        call_token, opened_token, opened = tokens[-1]
        if opened_token is not None:
            OPENED.reset(opened_token)
        if opened:
            self.after_model(module, args, output)
        if call_token is not None:
            CALL.reset(call_token)

    def options(self, adapter_names, prompt_lengths, batch_size: int | None) -> CallOptions:
        """A call's routing, checked (adapter_names: one adapter name or None per row)."""
        if adapter_names is not None:
            if isinstance(adapter_names, str) or not hasattr(adapter_names, "__len__"):
                raise ValueError(f"adapter_names must be a list with one adapter name (or None) per row, "
                                 f"got {adapter_names!r}")
            bad = [name for name in adapter_names if name is not None and not isinstance(name, str)]
            if bad:
                raise TypeError(f"adapter_names must hold one adapter name (str) or None per row, got {bad[0]!r}")
            adapter_names = [None if name == BASE_ROW else name for name in adapter_names]
            if batch_size is not None and len(adapter_names) != batch_size:
                raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has "
                                 f"{batch_size} rows; give one adapter name (or None) per row")
            for name in adapter_names:
                if name is not None:
                    self.model._check_known(name, "adapter_names")
        return CallOptions(adapter_names, prompt_lengths)

    @contextmanager
    def calling(self, adapter_names, prompt_lengths, batch_size: int | None):
        """This call's routing, checked, as the CALL context variable for the hooks of the
        forwards it makes."""
        token = CALL.set(self.options(adapter_names, prompt_lengths, batch_size))
        try:
            yield
        finally:
            CALL.reset(token)

    def generate_session(self, original):
        """The wrapped model's generate, with a session that holds the first forward's vectors
        for the later steps (installed on the model, so a direct base_model.generate gets it too)."""
        def generate(*args, **kwargs):
            token = SESSION.set(GenerateSession(self))
            try:
                return original(*args, **kwargs)
            finally:
                SESSION.reset(token)
        return generate

    # ------------------------------------------------------------------ a prefill's state
    def route(self, call: CallOptions, batch: int) -> list:
        """The adapter (or None) of each of this forward's rows."""
        if DISABLED.get():
            return [None] * batch
        rows = call.adapter_names
        if rows is None:
            return [self.model.active_adapter] * batch
        if batch % len(rows):
            raise ValueError(f"adapter_names has {len(rows)} entries but the batch has {batch} rows")
        return per_row(rows, batch)

    def make_groups(self, rows: list, device) -> list[AdapterGroup]:
        """The rows' adapters grouped by generator signature (one pool_generate per group)."""
        peft_config = self.model.peft_config
        by_signature: dict[tuple, list] = {}
        for name in dict.fromkeys(r for r in rows if r is not None):
            config = peft_config.get(name)
            if config is None:  # deleted by another thread after this call checked its names
                raise RequestStateError(f"adapter {name!r} was deleted while this request was starting; "
                                        "no row was computed with it")
            by_signature.setdefault(config.generator_signature(), []).append(name)
        groups = []
        for names in by_signature.values():
            index = {n: k for k, n in enumerate(names)}
            ids = torch.tensor([index.get(r, -1) for r in rows], dtype=torch.long, device=device)
            groups.append(AdapterGroup(peft_config[names[0]], names, ids))
        return groups

    def new_state(self, kwargs: dict, call: CallOptions, batch: int, length: int, device) -> RequestState:
        """A prefill's state: each row's (or packed example's) prompt range and adapter. A
        completion mask (``prompt_mask``, set by the wrapper's pre-hook) takes the labels' place."""
        mask, labels, positions = kwargs.get("attention_mask"), kwargs.get("labels"), kwargs.get("position_ids")
        if kwargs.get("prompt_mask") is not None:
            labels = kwargs["prompt_mask"].to(device)
        rows = self.route(call, batch)
        token_rows = None
        if is_packed(positions, mask, batch, length):
            start, end, token_rows, example_row = packed_prompts(positions, batch, length, device, mask, labels,
                                                                 call.prompt_lengths)
            rows = [rows[b] for b in example_row.tolist()]
        else:
            start, end = prompt_ranges(batch, length, device, mask, labels, call.prompt_lengths)
        n = len(self.module_index)
        requested = None if call.adapter_names is None else tuple(call.adapter_names)
        return RequestState(batch, requested, self.make_groups(rows, device), start, end, token_rows,
                            [None] * n, [None] * n, disabled=DISABLED.get())

    def refuse_continuation(self, state: RequestState, batch: int, call: CallOptions) -> None:
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

    # ------------------------------------------------------------------ the hooks
    def before_model(self, module, args, kwargs):
        # Runs at every forward, decode steps included: the path that continues a request is
        # written out here, without helper calls, because its Python cost is what PARA adds to
        # every generated token.
        if OPENED.get() is self:  # inside this model's PARAModel call, which opened the request
            TOKENS.set(TOKENS.get() + (None,))
            return
        try:
            cache = kwargs.get("past_key_values")  # cache_of, written out (per-token path)
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
                entry = self.cache_states.by_id.get(id(cache))
                state = entry[1] if entry is not None and entry[0]() is cache else None
                if state is None:
                    refuse_paged(cache)
                    raise RequestStateError(
                        f"this forward continues a KV cache ({cached} tokens) that PARA has no vectors for: the "
                        "vectors come from the prompt, so the cache must be prefilled through this PARAModel "
                        "(or pass reprefill=True with the whole conversation to start the request again)")
            elif session is not None:  # a later step of this generate call, uncached
                state = session.state
            if state is not None:
                if (x.shape[0] != state.batch or state.token_rows is not None or DISABLED.get() != state.disabled
                        or (call.adapter_names is not None and tuple(call.adapter_names) != state.requested)):
                    self.refuse_continuation(state, x.shape[0], call)
                if len(state.scales) < len(self.module_index):  # an adapter was added since the prefill
                    state.fit(len(self.module_index))
            else:  # a prefill: a new request
                refuse_paged(cache)
                if module.training and torch.is_grad_enabled():  # checkpointing switched on after wrapping
                    refuse_reentrant_checkpointing(self.model._layers or (), "the wrapped model")
                state = self.new_state(kwargs, call, x.shape[0], x.shape[1], x.device)
                if cache is not None:
                    self.cache_states.put(cache, state)
            if session is not None and session.state is None:
                session.state = state
            state.plain = (state.token_rows is None and not torch.is_grad_enabled()
                           and not torch.compiler.is_compiling()
                           and ops.backend_for("scale", x.device) == "reference")
        except Exception:
            TOKENS.set(TOKENS.get() + (ACTIVE.set(None),))  # the post-hook (always called) pops it
            raise
        TOKENS.set(TOKENS.get() + (ACTIVE.set(state),))

    def after_model(self, module, args, output):
        tokens = TOKENS.get()
        if not tokens:
            return
        if tokens[-1] is None:  # passed through (the PARAModel call's hooks own the request)
            TOKENS.set(tokens[:-1])
            return
        state = ACTIVE.get()
        ACTIVE.reset(tokens[-1])
        TOKENS.set(tokens[:-1])
        if state is None or state.ready:
            return
        state.ready = True  # the prefill ended: every layer's vectors are in
        cache = None if output is None else getattr(output, "past_key_values", None)
        if cache is not None and not isinstance(cache, (tuple, list)) and state.token_rows is None:
            self.cache_states.put(cache, state)  # a cache the model made itself (use_cache, none given)


def per_row(names, batch: int) -> list:
    """One name per row: generate() repeats each row of the call for beams / return sequences."""
    return [name for name in names for _ in range(batch // len(names))]


def cache_of(kwargs: dict):
    """The KV cache a call was given: ``past_key_values``, else ``cache`` (its name from
    transformers 5.2x)."""
    cache = kwargs.get("past_key_values")
    return kwargs.get("cache") if cache is None else cache


def empty_cache(cache) -> None:
    """reprefill: the cache starts again, empty (the same object), so the whole input is prefilled
    as the prompt."""
    if cache is None or not hasattr(cache, "get_seq_length"):
        return
    if cache.get_seq_length() > 0:
        cache.reset()


_REENTRANT_ERROR = (
    "{where} has reentrant activation checkpointing on (use_reentrant=True, or no use_reentrant, which "
    "torch.utils.checkpoint takes as True; PEFT's prepare_model_for_kbit_training passes none unless told). "
    "PARA's vectors reach each layer's projections through hooks, not as checkpoint inputs, so a reentrant "
    "recompute would backpropagate through them a second time. Use non-reentrant checkpointing: "
    "prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={{'use_reentrant': False}}), "
    "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={{'use_reentrant': False}}) (the "
    "default of transformers 5's activation_checkpointing_enable()), or enable it after wrapping with "
    "PARAModel.gradient_checkpointing_enable()")


def checkpoint_func(module):
    """The checkpoint function of a module transformers checkpoints (None if it does not)."""
    if not getattr(module, "gradient_checkpointing", False):
        return None
    return module.__dict__.get("_gradient_checkpointing_func")


def _is_reentrant(func) -> bool:
    """Whether transformers' checkpoint function ``func`` (torch.utils.checkpoint.checkpoint, or a
    functools.partial of it or of transformers' offloading wrapper, with the kwargs) is reentrant."""
    from torch.utils.checkpoint import checkpoint

    keywords = {}
    while isinstance(func, functools.partial):
        keywords = {**func.keywords, **keywords}
        func = func.func
    if func is not checkpoint and getattr(func, "__name__", "") != "checkpoint_func":
        return False  # a function of the user's: it says what it does
    use_reentrant = keywords.get("use_reentrant")
    return True if use_reentrant is None else bool(use_reentrant)  # torch's default when not passed


def refuse_reentrant_checkpointing(modules, where: str) -> None:
    """Raise ValueError if any of ``modules`` is checkpointed reentrantly (``where``: whose they are)."""
    for module in modules:
        func = checkpoint_func(module)
        if func is not None and _is_reentrant(func):
            raise ValueError(_REENTRANT_ERROR.format(where=where))


def refuse_paged(cache) -> None:
    if type(cache).__name__ == "PagedAttentionCache":
        no_continuous_batching(None)()


def no_continuous_batching(original):
    def refuse(*args, **kwargs):
        raise NotImplementedError(
            "PARA does not run under transformers' continuous batching (generate_batch / "
            "init_continuous_batching) yet: that engine packs every request's tokens into one row "
            "with a paged KV cache and does not tell the model which request each token belongs to, "
            "so PARA cannot give each request its own vectors. Use generate() with adapter_names "
            "(one per row) for mixed-adapter batches; docs/requests.md says what the engine would "
            "need to pass.")
    return refuse
