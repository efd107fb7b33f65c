"""The adapters resident in one vLLM worker: PARAModel.save_pretrained folders, read with the same
checks as PARAModel.load_adapter (transformers/io.py: safetensors + JSON, checksums, nothing
unpickled), at most ``max_adapters`` at once, least recently used out.

Contract:
- ``ModelFacts`` are what an adapter must match: hidden size, layer count, the q / v / up widths
  of the whole (unsharded) model.
- ``validate(name, folder, facts)``: the checks of a read that need no tensor data (the front end
  runs it on every request's adapter; admission.py).
- ``AdapterRegistry.get(name, path=None)``: the adapter, loaded at its first use from ``path``,
  else from the folder registered for ``name`` (``known``: ``PARA_VLLM_ADAPTERS``), and marked
  most recently used; the same name with another folder is another adapter (it replaces it). An
  adapter that does not fit the model, or a folder that is not an adapter, raises
  ``io.AdapterFileError`` naming the folder and what is wrong; nothing is half-loaded.
- ``load(name, path)`` replaces a resident adapter of that name; ``unload(name)`` drops it;
  ``resident()`` lists them, least recently used first. Requests already prefilled keep their
  vectors (serving.py): the generators are needed only at prefill.
- What vLLM cannot serve is refused with the reason: ``modules_to_save`` (a copy of a backbone
  module per adapter), ``target_modules`` other than the q / v / up projections.
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections import OrderedDict

import torch

from ..config import PARAConfig
from ..transformers import io
from ..transformers.layer import weight_shapes

STACKS = 8  # stacked banks kept: combinations of adapters prefilled together

# vLLM's merged projections hold these HF modules (LlamaModel.hf_to_vllm_mapper): the only targets served
STANDARD_MODULES = {"q": "q_proj", "v": "v_proj", "up": "up_proj"}


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    hidden_size: int
    num_layers: int
    sizes: dict  # {"q": heads*head_dim, "v": kv_heads*head_dim, "up": intermediate}, whole model

    def n(self, config: PARAConfig) -> int:
        return sum(self.sizes[t] for t in config.targets)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: str) -> "ModelFacts":
        return cls(**json.loads(raw))


@dataclasses.dataclass
class LoadedAdapter:
    name: str
    folder: str
    config: PARAConfig
    layers: dict  # {layer index: {"w_down": [1,d,r], "b_down": [1,r], "w_up": [1,r,N], "b_up": [1,N], ...}}


def check_servable(config: PARAConfig, folder: str) -> None:
    """Refuse, with the reason, what the vLLM model classes cannot apply."""
    if config.modules_to_save:
        raise io.AdapterFileError(
            f"the adapter in {folder} keeps its own copy of {config.modules_to_save} (modules_to_save): vLLM serves "
            "one backbone for every request, so para_kernels.vllm cannot serve it; serve it with PARAModel.generate, "
            "or train without modules_to_save")
    for target, path in (config.target_modules or {}).items():
        if path.rsplit(".", 1)[-1] != STANDARD_MODULES.get(target):
            raise io.AdapterFileError(
                f"the adapter in {folder} scales {path!r} as {target!r}; vLLM's merged projections serve only "
                f"{STANDARD_MODULES} (target_modules=None finds them)")


def validate(name: str, folder: str, facts: ModelFacts | None) -> tuple[str, PARAConfig, dict, list]:
    """(the adapter's folder, config, {tensor: shape} expected, layers) of the adapter saved in
    ``folder`` (save_pretrained's layout; a named adapter's subfolder too), checked from its config
    and its weights' header alone (no tensor data): servable, and matching ``facts`` (the served
    model; None checks the files only). The front end runs this on every request's adapter, so that
    the worker, where an error would stop the engine, reads only checked files."""
    folder = io.resolve_adapter(folder, name)
    config, info = io.read_config(folder)
    check_servable(config, folder)
    header, _ = io.read_header(os.path.join(folder, io.WEIGHTS_NAME))
    if facts is None:
        return folder, config, {k: tuple(v["shape"]) for k, v in header.items()}, []
    if info.get("hidden_size") not in (None, facts.hidden_size) or info.get("num_layers") not in (None,
                                                                                                   facts.num_layers):
        raise io.AdapterFileError(f"the adapter in {folder} was saved for hidden size {info.get('hidden_size')} and "
                                  f"{info.get('num_layers')} layers; the served model has {facts.hidden_size} and "
                                  f"{facts.num_layers}")
    layers = config.layers_to_transform
    layers = list(range(facts.num_layers) if layers is None else layers)
    if any(not 0 <= i < facts.num_layers for i in layers):
        raise io.AdapterFileError(f"the adapter in {folder} transforms layers {layers}; the served model has "
                                  f"{facts.num_layers}")
    shapes = weight_shapes(config, facts.hidden_size, facts.n(config))
    expected = {f"layers.{i}.{k}": s for i in layers for k, s in shapes.items()}
    got = {k: tuple(v["shape"]) for k, v in header.items()}
    if got != expected:
        wrong = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
        raise io.AdapterFileError(f"the adapter in {folder} does not match the served model: tensors {wrong[:4]} "
                                  f"(expected {[expected.get(k) for k in wrong[:4]]}, found "
                                  f"{[got.get(k) for k in wrong[:4]]})")
    return folder, config, expected, layers


def read(name: str, folder: str, facts: ModelFacts, device, dtype) -> LoadedAdapter:
    """The adapter saved in ``folder``, checked as ``validate`` does before any tensor is read
    (then its checksum), on ``device`` in ``dtype``."""
    folder, config, expected, layers = validate(name, folder, facts)
    shapes = weight_shapes(config, facts.hidden_size, facts.n(config))
    tensors = io.read_weights(folder, expected, config)
    per_layer = {i: {k: tensors[f"layers.{i}.{k}"].to(device=device, dtype=dtype).unsqueeze(0) for k in shapes}
                 for i in layers}
    return LoadedAdapter(name, folder, config, per_layer)


class AdapterRegistry:
    def __init__(self, facts: ModelFacts, device, dtype: torch.dtype, max_adapters: int = 8,
                 known: dict | None = None):
        if not isinstance(max_adapters, int) or max_adapters < 1:
            raise ValueError(f"max_adapters (PARA_VLLM_MAX_ADAPTERS) must be a positive int, got {max_adapters!r}")
        self.facts, self.device, self.dtype, self.max_adapters = facts, device, dtype, max_adapters
        self.known = dict(known or {})  # name -> folder
        self._resident: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._stacks: OrderedDict[tuple, tuple] = OrderedDict()  # (id of each adapter) -> (adapters, {layer: bank})
        self._lock = threading.Lock()

    def get(self, name: str, path: str | None = None) -> LoadedAdapter:
        with self._lock:
            adapter = self._resident.get(name)
            if adapter is not None and (path is None or os.fspath(path) == self.known.get(name)):
                self._resident.move_to_end(name)
                return adapter
        if path is None:
            path = self.known.get(name)
            if path is None:
                raise io.AdapterFileError(f"unknown PARA adapter {name!r}: not in PARA_VLLM_ADAPTERS "
                                          f"({sorted(self.known)}) and the request gave no para_adapter_path")
        return self.load(name, path)

    def load(self, name: str, path: str) -> LoadedAdapter:
        adapter = read(name, os.fspath(path), self.facts, self.device, self.dtype)
        with self._lock:
            self.known[name] = os.fspath(path)
            self._resident[name] = adapter
            self._resident.move_to_end(name)
            while len(self._resident) > self.max_adapters:
                self._resident.popitem(last=False)
        return adapter

    def unload(self, name: str) -> bool:
        with self._lock:
            return self._resident.pop(name, None) is not None

    def stacked(self, adapters: list, layer: int) -> dict:
        """The generators of ``adapters`` (one generator signature) in ``layer`` stacked along a
        leading adapter axis, the bank of one ``para::pool_generate`` (a view for one adapter; a
        copy for several, kept for the last ``STACKS`` combinations)."""
        if len(adapters) == 1:
            return adapters[0].layers[layer]
        key = tuple(id(a) for a in adapters)
        with self._lock:
            entry = self._stacks.get(key)
            if entry is None or any(x is not y for x, y in zip(entry[0], adapters)):
                entry = self._stacks[key] = (list(adapters), {})
                while len(self._stacks) > STACKS:
                    self._stacks.popitem(last=False)
            self._stacks.move_to_end(key)
        banks = entry[1]
        if layer not in banks:
            first = adapters[0].layers[layer]
            banks[layer] = {k: torch.cat([a.layers[layer][k] for a in adapters]) for k in first}
        return banks[layer]

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._resident)
