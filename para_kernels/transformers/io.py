"""Adapter files: safetensors weights plus a JSON config, nothing pickled, laid out as PEFT lays
out its adapters.

Contract:
- ``save_pretrained(dir)`` writes the adapter named ``default`` at ``dir`` itself and every other
  adapter in ``dir/<name>/``; each folder holds ``adapter_model.safetensors`` and
  ``adapter_config.json``. The JSON is flat, as PEFT's: the PARAConfig fields beside
  ``peft_type: "PARA"``, ``task_type``, ``base_model_name_or_path``, ``revision``,
  ``inference_mode``, the model facts the loader checks (hidden size, layers) and the package
  version.
- The weights' checksum is kept in the safetensors header, so a corrupted file is refused, not
  loaded.
- The first layout (``dir/<name>/`` for every adapter, settings nested under ``"config"``) still
  loads.
- Wherever a folder is taken, a Hub repo id is too: it is fetched with
  ``huggingface_hub.snapshot_download`` (``HF_HUB_OFFLINE``, the local cache, ``revision``,
  ``token`` honoured), the adapter files only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .._version import __version__
from ..config import PARAConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "para_kernels.adapter.v1"  # the weights' checksum marker, and the first JSON layout
CONFIG_FORMAT = "para_kernels.adapter.v2"  # the flat, PEFT-style adapter_config.json
PEFT_TYPE = "PARA"
DEFAULT_ADAPTER = "default"  # saved at the folder root, as PEFT saves it
INFO_KEYS = ("model_type", "hidden_size", "num_layers", "generator_outputs")
# keys of a flat config that are neither PARAConfig fields nor model facts (PEFT writes the last two)
MARKER_KEYS = ("peft_type", "format", "para_kernels_version", "auto_mapping", "peft_version")


class AdapterFileError(ValueError):
    """An adapter folder that cannot be loaded: missing, truncated, corrupted or mismatched."""


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def adapter_subfolder(adapter_name: str) -> str:
    """Where save_pretrained puts ``adapter_name`` inside its folder ('' = the folder itself)."""
    return "" if adapter_name == DEFAULT_ADAPTER else adapter_name


def write_config(folder: str, config: PARAConfig, info: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    doc = {"peft_type": PEFT_TYPE, **config.to_dict(), **info, "format": CONFIG_FORMAT,
           "para_kernels_version": __version__}
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def save_adapter(folder: str, config: PARAConfig, tensors: dict[str, torch.Tensor], info: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    metadata = {"format": "pt", "para_format": FORMAT, "sha256": _digest(tensors)}
    save_file(tensors, os.path.join(folder, WEIGHTS_NAME), metadata=metadata)
    write_config(folder, config, info)


# ---------------------------------------------------------------- finding the folder
def _candidates(root: str, adapter_name: str | None, subfolder: str | None) -> list[str]:
    """Folders that may hold the adapter, most specific first: ``<subfolder>/<adapter_name>``
    (a named adapter saved beside the default one), then ``<subfolder>`` itself."""
    base = os.path.join(root, subfolder) if subfolder else root
    named = [os.path.join(base, adapter_name)] if adapter_name else []
    return named + [base]


def _fetch(repo_id: str, adapter_name, subfolder, revision=None, token=None, cache_dir=None,
           local_files_only: bool = False) -> str:
    """The local snapshot of Hub repo ``repo_id`` with the adapter files that may be asked for."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise AdapterFileError(f"no PARA adapter in {repo_id!r}: it is not a local folder, nor a Hub repo id "
                               "('org/name')") from None
    prefixes = [os.path.relpath(c, "/") for c in _candidates("/", adapter_name, subfolder)]
    patterns = [("" if p == "." else p + "/") + f for p in prefixes for f in (CONFIG_NAME, WEIGHTS_NAME)]
    try:
        return snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                 local_files_only=local_files_only, allow_patterns=patterns)
    except Exception as e:  # not found, gated, offline and not cached: all mean "no adapter here"
        raise AdapterFileError(f"no PARA adapter in {repo_id!r}: it is not a local folder, and the Hub repo "
                               f"could not be fetched ({type(e).__name__}: {e})") from None


def resolve_adapter(path: str, adapter_name: str | None = None, subfolder: str | None = None,
                    **hub_kwargs) -> str:
    """The local folder holding the adapter: ``path`` (a folder or a Hub repo id), in its
    ``subfolder`` if given, in ``adapter_name``'s subfolder when there is one (a named adapter
    save_pretrained wrote beside the default), else that folder itself.
    hub_kwargs: revision, token, cache_dir, local_files_only (Hub ids only)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder or a Hub repo id (str), got {type(path).__name__}")
    path = os.fspath(path)
    root = path if os.path.isdir(path) else _fetch(path, adapter_name, subfolder, **hub_kwargs)
    candidates = _candidates(root, adapter_name, subfolder)
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            return folder
    raise AdapterFileError(f"no PARA adapter in {path!r}: expected {CONFIG_NAME} in "
                           f"{' or '.join(repr(c) for c in reversed(candidates))}")


# ---------------------------------------------------------------- reading
def _split_doc(doc, config_path: str) -> tuple[dict, dict]:
    """(PARAConfig fields, model facts) of a flat (PEFT-style) or first-layout config document."""
    if not isinstance(doc, dict):
        raise AdapterFileError(f"{config_path} is not a PARA adapter config (expected a JSON object with "
                               f"peft_type {PEFT_TYPE!r})")
    if isinstance(doc.get("config"), dict) and doc.get("format") == FORMAT:  # the first layout
        return doc["config"], {k: v for k, v in doc.items() if k not in ("format", "config")}
    peft_type = doc.get("peft_type")
    if peft_type != PEFT_TYPE:
        what = f"a {peft_type} adapter (peft_type), load it with peft" if isinstance(peft_type, str) \
            else f"not a PARA adapter config (expected peft_type {PEFT_TYPE!r})"
        raise AdapterFileError(f"{config_path} is {what}")
    if doc.get("format", CONFIG_FORMAT) != CONFIG_FORMAT:
        raise AdapterFileError(f"{config_path} has format {doc['format']!r}; this version of para_kernels reads "
                               f"{CONFIG_FORMAT!r} (upgrade para_kernels?)")
    info = {k: doc[k] for k in INFO_KEYS if k in doc}
    info["para_kernels_version"] = doc.get("para_kernels_version")
    fields = {k: v for k, v in doc.items() if k not in INFO_KEYS and k not in MARKER_KEYS}
    return fields, info


def read_config(folder: str) -> tuple[PARAConfig, dict]:
    """(config, model facts) of the adapter saved in ``folder``."""
    config_path = os.path.join(folder, CONFIG_NAME)
    try:
        with open(config_path) as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"cannot read {config_path} (missing, truncated or corrupted?): {e}") from None
    fields, info = _split_doc(doc, config_path)
    try:
        config = PARAConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{config_path} holds an invalid PARA config: {e}") from None
    return config, info


def read_adapter(folder: str) -> tuple[PARAConfig, dict, dict[str, torch.Tensor]]:
    """(config, info, tensors) of the adapter saved in ``folder``, checked for integrity."""
    config, info = read_config(folder)
    weights_path = os.path.join(folder, WEIGHTS_NAME)
    try:
        with safe_open(weights_path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise AdapterFileError(f"cannot read {weights_path} (missing, truncated or corrupted?): {e}") from None
    if metadata.get("para_format") != FORMAT or "sha256" not in metadata:
        raise AdapterFileError(f"{weights_path} was not written by para_kernels (no {FORMAT} checksum)")
    if _digest(tensors) != metadata["sha256"]:
        raise AdapterFileError(f"{weights_path} is corrupted: its contents do not match the checksum saved with it")
    return config, info, tensors


def with_fields(config: PARAConfig, **changes) -> PARAConfig:
    """A copy of ``config`` with ``changes`` (the shared config object is never edited in place)."""
    return dataclasses.replace(config, **changes)
