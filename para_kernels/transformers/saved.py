"""modules_to_save: each adapter's own copy of a backbone module outside the decoder layers.

Contract: the paths a config names are matched as PEFT matches them (the module itself or any
path ending in ``.<name>``) and must lie outside the decoder layers (whose projections PARA
rescales). The copies are registered on the PARAModel (``saved_modules[adapter][escape(path)]``),
never in the backbone, so the backbone's state dict stays the backbone's; in adapter files they
are the tensors ``modules_to_save.<path>.<param>``. Each original module gets, once, a forward
that sends every row through the copy of that row's adapter (the running request's
adapter_names, else the active adapter) or through the original (a row without adapter, a
copy-less adapter, disable_adapter()); a mixed batch is split by adapter and put back in row order.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .mapping import MappingError
from .requests import per_row
from .state import ACTIVE, DISABLED

SAVED_PREFIX = "modules_to_save"  # tensor names of an adapter's module copies: modules_to_save.<path>.<param>


def escape(path: str) -> str:
    """A module path as a ModuleDict key (no dots)."""
    return path.replace(".", "__")


def find(base_model: nn.Module, config, layers) -> list[str]:
    """The backbone module paths config.modules_to_save names (PEFT's suffix match)."""
    inside = {id(m) for layer in layers for m in layer.modules()}
    found = []
    for key in config.modules_to_save or ():
        paths = [n for n, m in base_model.named_modules() if n and (n == key or n.endswith("." + key))]
        if not paths:
            raise MappingError(f"modules_to_save names {key!r}, but the model has no module of that name "
                               "(e.g. 'lm_head')")
        in_layers = [n for n in paths if id(base_model.get_submodule(n)) in inside]
        if in_layers:
            raise MappingError(f"modules_to_save {key!r} matches {in_layers}, inside the decoder layers, whose "
                               "projections PARA rescales; name modules outside them (a head, the embeddings, "
                               "the final norm)")
        found += paths
    return sorted(set(found))


def frozen_copy(module: nn.Module) -> nn.Module:
    """An adapter's copy of ``module`` (frozen until set_adapter): the module's own forward, not
    the router installed on the original."""
    duplicate = copy.deepcopy(module).requires_grad_(False)
    if getattr(duplicate.__dict__.get("forward"), "para_routing", False):
        del duplicate.forward  # the copy runs itself, not the router copied with it
    return duplicate


def rows_of(active_adapter: str | None, batch: int) -> list | None:
    """The adapter of each row for modules_to_save (None: all rows use the original): the
    running request's routing, else the active adapter."""
    state = ACTIVE.get()
    if DISABLED.get() or (state is not None and state.disabled):
        return None
    requested = None if state is None else state.requested
    if requested is None or batch % len(requested):
        return [active_adapter] * batch
    return per_row(requested, batch)


def routed_forward(model, path: str):
    """The forward override of the original module at ``path`` (``model``: the PARAModel, read
    for its saved_modules and active adapter at each call)."""
    key = escape(path)

    def make(original):
        def forward(*args, **kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            rows = rows_of(model.active_adapter, x.shape[0])
            copies = {} if rows is None else {
                n: model.saved_modules[n][key] for n in set(rows)
                if n is not None and n in model.saved_modules and key in model.saved_modules[n]}
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
