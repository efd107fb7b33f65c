"""The state of one request: its PARA vectors, and how a forward finds the state it belongs to.

A forward of the wrapped model either *prefills* (no KV cache, or an empty one) and computes
fresh vectors from its own prompt, or *continues* a request and reuses that request's vectors:
a forward given a non-empty KV cache uses the vectors that cache was prefilled with, and inside
one ``generate`` call every forward after the first uses the first one's (uncached steps, beams
and assisted candidates see the prompt's vectors, never the text generated so far).

Nothing of a request is kept on the shared modules, so several threads can serve one model:

- the running forward's state is in the context variable ``ACTIVE`` (each thread and asyncio
  task has its own), pushed by the model's pre-hook and popped by its post-hook (``TOKENS``);
- a KV cache's state is found through the cache object (:class:`CacheStates`, weakly keyed:
  it lives as long as the cache);
- a ``generate`` call's state is in its own :class:`GenerateSession` (context variable
  ``SESSION``), and the call's routing (adapter per row, prompt lengths) in ``CALL``.

docs/requests.md has the rules (multi-turn, re-prefill, packed rows, threads).
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field

from torch import Tensor

from ..config import PARAConfig


class RequestStateError(RuntimeError):
    """A forward PARA cannot give the right vectors to (e.g. it continues a KV cache that PARA
    never prefilled): raised instead of reusing another request's vectors."""


@dataclass
class AdapterGroup:
    """The adapters of one generator signature in a request, stacked into one bank."""
    config: PARAConfig
    names: list  # bank order
    ids: Tensor  # [rows] index into names; -1 for rows of other groups or with no adapter


@dataclass(eq=False)
class RequestState:
    """One request's vectors (a batch of rows prefilled together).

    rows: vector rows (= batch rows, or the examples of packed rows); start / end [rows]: each
    vector row's prompt range (packed: indices into the flattened [batch * length] tokens);
    token_rows [batch * length]: packed rows only, the vector row of every token; scales[k]:
    the [rows, n] scale of the k-th scaled module (None: not scaled), scales3[k] the same
    viewed as [rows, 1, n] for the in-place decode multiply. ``ready``: every layer's vectors
    are in (the prefill forward has ended)."""
    batch: int
    requested: tuple | None  # adapter_names as the caller gave them (None: the default routing)
    groups: list
    start: Tensor | None
    end: Tensor | None
    token_rows: Tensor | None
    scales: list
    scales3: list
    disabled: bool = False  # prefilled under disable_adapter(): continued under it only
    ready: bool = False
    plain: bool = False  # this forward is eager inference on the reference backend
    moved: dict = field(default_factory=dict)  # device -> (start, end, [ids per group]) there

    def on(self, device) -> tuple:
        """(start, end, [each group's ids]) on ``device``, where a layer of a model split across
        devices (device_map) computes; copied once per device per request, at its prefill."""
        if self.start is None or self.start.device == device:
            return self.start, self.end, [g.ids for g in self.groups]
        moved = self.moved.get(device)
        if moved is None:
            moved = self.moved[device] = (self.start.to(device), self.end.to(device),
                                          [g.ids.to(device) for g in self.groups])
        return moved

    def put(self, k: int, s: Tensor) -> None:
        """Multiply s into module k's scale (adapter groups of other signatures multiply in)."""
        if self.scales[k] is not None:
            s = self.scales[k] * s
        self.scales[k], self.scales3[k] = s, s.unsqueeze(1)

    def fit(self, n_modules: int) -> None:
        """Make room for modules whose consumers were installed after this state was made."""
        missing = n_modules - len(self.scales)
        if missing > 0:
            self.scales.extend([None] * missing)
            self.scales3.extend([None] * missing)

    def snapshot(self) -> RequestState:
        """A copy holding the scales computed so far, not ready: what a gradient checkpoint's
        recompute runs under. Whether transformers checkpoints a layer's ``__call__`` (its PARA
        pre-hook inside, so the recompute computes that layer's vectors again, into the entries
        still empty in the snapshot) or only its ``forward`` (the hook outside, so the recompute
        reads the forward's own scale tensors), the recompute repeats the forward exactly."""
        return RequestState(self.batch, self.requested, self.groups, self.start, self.end, self.token_rows,
                            list(self.scales), list(self.scales3), self.disabled, ready=False, plain=False,
                            moved=self.moved)

    def vectors(self):
        """(module index, scale [rows, n]) of every scaled module: for inspection."""
        return [(k, s) for k, s in enumerate(self.scales) if s is not None]


ACTIVE: ContextVar[RequestState | None] = ContextVar("para_active_request", default=None)
# The tokens to restore ACTIVE with, innermost last: the model's pre-hook pushes, its post-hook
# pops (written out in those hooks, which run at every decode step).
TOKENS: ContextVar[tuple] = ContextVar("para_active_tokens", default=())


@contextmanager
def active(state: RequestState | None):
    """Run the block as part of ``state``'s forward (for tools that call a layer or module
    directly, e.g. a benchmark's attribution of the per-token cost)."""
    token = ACTIVE.set(state)
    try:
        yield state
    finally:
        ACTIVE.reset(token)


def checkpoint_context_fn(user_context_fn=None):
    """``context_fn`` for torch.utils.checkpoint (non-reentrant). It is called when the forward
    reaches the checkpoint and returns the context the recompute runs in: the recompute runs in
    backward, after the forward's state was popped (on a GPU in autograd's own thread), so it
    gets the state as it was at this point of the forward (:meth:`RequestState.snapshot`)."""
    def context_fn():
        outer_forward, outer_recompute = user_context_fn() if user_context_fn else (nullcontext(), nullcontext())
        state = ACTIVE.get()
        snapshot = None if state is None else state.snapshot()

        @contextmanager
        def recompute():
            with outer_recompute, active(None if snapshot is None else snapshot.snapshot()):
                yield

        return outer_forward, recompute()
    context_fn.para_checkpoint = True
    return context_fn


@dataclass(frozen=True)
class CallOptions:
    """What one call of PARAModel.forward / generate asked for (never changed once made: the
    default below is shared by every context)."""
    adapter_names: list | None = None  # one per row (None entries: the bare backbone)
    prompt_lengths: object = None


NO_CALL = CallOptions()  # outside any PARAModel.forward / generate call: the default routing
CALL: ContextVar[CallOptions] = ContextVar("para_call", default=NO_CALL)
DISABLED: ContextVar[bool] = ContextVar("para_disabled", default=False)


@dataclass(eq=False)
class GenerateSession:
    """One generate() call of one model: the state its first forward made (or continued)."""
    owner: object
    state: RequestState | None = None


SESSION: ContextVar[GenerateSession | None] = ContextVar("para_generate", default=None)


@dataclass(eq=False)
class CacheStates:
    """KV cache object -> the state it was prefilled with. Weak: an entry goes with its cache."""
    by_id: dict = field(default_factory=dict)  # id(cache) -> (weak reference to the cache, state)

    def get(self, cache) -> RequestState | None:
        entry = self.by_id.get(id(cache))
        return entry[1] if entry is not None and entry[0]() is cache else None

    def put(self, cache, state: RequestState) -> None:
        key = id(cache)
        entry = self.by_id.get(key)
        if entry is not None and entry[0]() is cache:
            self.by_id[key] = (entry[0], state)
            return
        try:
            ref = weakref.ref(cache)
        except TypeError:
            raise RequestStateError(
                f"PARA keeps a request's vectors with its KV cache object, and a {type(cache).__name__} cannot "
                "be referenced weakly; pass a transformers Cache (e.g. DynamicCache) as past_key_values") from None
        weakref.finalize(cache, self.by_id.pop, key, None)
        self.by_id[key] = (ref, state)

    def __len__(self) -> int:
        return len(self.by_id)


__all__ = ["RequestState", "RequestStateError", "AdapterGroup", "CacheStates", "GenerateSession", "CallOptions",
           "ACTIVE", "TOKENS", "CALL", "DISABLED", "SESSION", "active", "checkpoint_context_fn"]
