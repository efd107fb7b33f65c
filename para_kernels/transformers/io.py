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
- Untrusted files: every way a folder can be wrong raises ``AdapterFileError`` (a ``ValueError``)
  before the model changes, nothing is unpickled, and nothing larger than the model's own adapter
  is allocated: the config is read only if it is a regular file of at most ``MAX_CONFIG_BYTES``,
  strict JSON (no duplicate keys, no NaN / Infinity) with every field of its JSON type; the
  weights' safetensors header is read alone first (duplicate keys refused) and its tensor names,
  shapes and dtypes checked against what the model expects before any tensor is read.
- Paths: ``adapter_name`` and ``subfolder`` never leave the folder (no absolute paths, no ``..``).
  Symlinks are followed (the Hub cache is made of them: ``snapshots/<rev>/file -> blobs/<hash>``)
  but must end at a regular file: directories, devices and pipes are refused.
- Writes are atomic per file: each file is written under a temporary name in its folder, then
  ``os.replace``-d over the old one (a symlink there is replaced, never written through); a failed
  save leaves the old files intact and no temporary file behind.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import stat
import struct
import uuid

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
MAX_CONFIG_BYTES = 1 << 20  # an adapter_config.json is a few hundred bytes; a bigger one is not read
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on its JSON header
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_TMP_PREFIX = ".para_tmp."


class AdapterFileError(ValueError):
    """An adapter folder that cannot be loaded: missing, truncated, corrupted or mismatched."""


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def config_digest(config: PARAConfig) -> str:
    """The checksum of the config fields that decide what the weights compute, kept in the weights'
    header: a config and weights from different saves (a save that died between its two renames, a
    config edited or bit-flipped to another valid value) are refused. Where the modules are found
    (layers_path, target_modules), init_scale and the recorded names may be edited."""
    doc = config.to_dict()
    keep = ("r", "pooler", "activation", "targets", "pool_input", "layers_to_transform", "modules_to_save")
    return hashlib.sha256(json.dumps({k: doc[k] for k in keep}, sort_keys=True).encode()).hexdigest()


def adapter_subfolder(adapter_name: str) -> str:
    """Where save_pretrained puts ``adapter_name`` inside its folder ('' = the folder itself)."""
    return "" if adapter_name == DEFAULT_ADAPTER else adapter_name


def _temporary(folder: str, name: str) -> str:
    """A fresh name in ``folder`` to write ``name`` under before it is os.replace-d into place."""
    return os.path.join(folder, f"{_TMP_PREFIX}{uuid.uuid4().hex}.{name}")


def _write_config_file(path: str, config: PARAConfig, info: dict) -> None:
    doc = {"peft_type": PEFT_TYPE, **config.to_dict(), **info, "format": CONFIG_FORMAT,
           "para_kernels_version": __version__}
    text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    with open(path, "x") as f:
        f.write(text)


def _replace_all(folder: str, writers: dict) -> None:
    """Write every file ``name`` of ``writers`` ({name: write(path)}) under a temporary name in
    ``folder``, then os.replace them into place; on any failure remove the temporaries (the old
    files stay as they were)."""
    os.makedirs(folder, exist_ok=True)
    temporaries = {name: _temporary(folder, name) for name in writers}
    try:
        for name, write in writers.items():
            write(temporaries[name])
        for name, tmp in temporaries.items():
            os.replace(tmp, os.path.join(folder, name))
    finally:
        for tmp in temporaries.values():
            if os.path.lexists(tmp):
                os.remove(tmp)


def write_config(folder: str, config: PARAConfig, info: dict) -> None:
    _replace_all(folder, {CONFIG_NAME: lambda path: _write_config_file(path, config, info)})


def save_adapter(folder: str, config: PARAConfig, tensors: dict[str, torch.Tensor], info: dict) -> None:
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    metadata = {"format": "pt", "para_format": FORMAT, "sha256": _digest(tensors),
                "config_sha256": config_digest(config)}
    _replace_all(folder, {WEIGHTS_NAME: lambda path: save_file(tensors, path, metadata=metadata),
                          CONFIG_NAME: lambda path: _write_config_file(path, config, info)})


# ---------------------------------------------------------------- finding the folder
def _inside(value, what: str, nested: bool) -> None:
    """Refuse ``value`` (adapter_name / subfolder) unless it is a relative path that stays inside
    the folder: no absolute path, no '..', no separator at all unless ``nested``."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    value = os.fspath(value)
    parts = value.replace("\\", "/").split("/")
    if not value or os.path.isabs(value) or value.startswith(("/", "\\")) or ".." in parts \
            or (not nested and len(parts) > 1) or os.path.splitdrive(value)[0]:
        raise ValueError(f"{what} must name a folder inside the adapter folder (relative, no '..'"
                         f"{'' if nested else ', no separator'}), got {value!r}")


def _candidates(root: str, adapter_name: str | None, subfolder: str | None) -> list[str]:
    """Folders that may hold the adapter, most specific first: ``<subfolder>/<adapter_name>``
    (a named adapter saved beside the default one), then ``<subfolder>`` itself."""
    if subfolder:
        _inside(subfolder, "subfolder", nested=True)
    if adapter_name:
        _inside(adapter_name, "adapter_name", nested=False)
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


def _open_regular(path: str, what: str):
    """``path`` opened for binary reading, if it is (or links to) a regular file; a directory,
    device or pipe is refused without blocking on it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise AdapterFileError(f"cannot read {path} (missing?): {e.strerror or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AdapterFileError(f"{path} is not a regular file (a directory, device or pipe): not an adapter {what}")
    return os.fdopen(fd, "rb")


def _no_duplicates(pairs: list) -> dict:
    doc = {}
    for key, value in pairs:
        if key in doc:
            raise ValueError(f"duplicate key {key!r}")
        doc[key] = value
    return doc


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _strict_json(raw: bytes):
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _str_list(v) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))


def _optional(check):
    return lambda v: v is None or check(v)


# the JSON type each field of a saved config must have (the values are then checked by PARAConfig)
FIELD_TYPES = {
    "r": ("an integer", _is_int),
    "pooler": ("a string", lambda v: isinstance(v, str)),
    "activation": ("a string", lambda v: isinstance(v, str)),
    "targets": ("a list of strings", _str_list),
    "target_modules": ("null or an object of strings", _optional(
        lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()))),
    "pool_input": ("a string", lambda v: isinstance(v, str)),
    "layers_to_transform": ("null or a list of integers", _optional(
        lambda v: _is_int(v) or (isinstance(v, list) and all(_is_int(x) for x in v)))),
    "layers_path": ("null or a string", _optional(lambda v: isinstance(v, str))),
    "init_scale": ("a finite number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v)),
    "modules_to_save": ("null or a list of strings", _optional(_str_list)),
    "base_model_name_or_path": ("null or a string", _optional(lambda v: isinstance(v, str))),
    "revision": ("null or a string", _optional(lambda v: isinstance(v, str))),
    "task_type": ("null or a string", _optional(lambda v: isinstance(v, str))),
    "inference_mode": ("true or false", lambda v: isinstance(v, bool)),
    "model_type": ("null or a string", _optional(lambda v: isinstance(v, str))),
    "hidden_size": ("null or an integer", _optional(_is_int)),
    "num_layers": ("null or an integer", _optional(_is_int)),
    "generator_outputs": ("null or an integer", _optional(_is_int)),
    "para_kernels_version": ("null or a string", _optional(lambda v: isinstance(v, str))),
}


def _check_types(values: dict, config_path: str) -> None:
    for key, value in values.items():
        if key in FIELD_TYPES and not FIELD_TYPES[key][1](value):
            raise AdapterFileError(f"{config_path}: field {key!r} must be {FIELD_TYPES[key][0]}, got {value!r:.80} "
                                   f"({type(value).__name__})")


def read_config(folder: str) -> tuple[PARAConfig, dict]:
    """(config, model facts) of the adapter saved in ``folder``."""
    config_path = os.path.join(folder, CONFIG_NAME)
    with _open_regular(config_path, "config") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterFileError(f"{config_path} is larger than {MAX_CONFIG_BYTES} bytes: not an adapter config")
    try:
        doc = _strict_json(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise AdapterFileError(f"cannot read {config_path} (truncated or corrupted?): {e}") from None
    fields, info = _split_doc(doc, config_path)
    _check_types({**fields, **info}, config_path)
    try:
        config = PARAConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{config_path} holds an invalid PARA config: {e}") from None
    return config, info


def read_header(weights_path: str) -> tuple[dict, dict]:
    """({tensor name: {dtype, shape, data_offsets}}, metadata) of a safetensors file, read from
    its header alone (no tensor data), with duplicate keys refused."""
    with _open_regular(weights_path, "weights file") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise AdapterFileError(f"{weights_path} is truncated: {size} bytes, no safetensors header")
        n = struct.unpack("<Q", head)[0]
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise AdapterFileError(f"{weights_path} is truncated or corrupted: its header declares {n} bytes, "
                                   f"the file holds {size - 8} after the length")
        raw = f.read(n)
    try:
        doc = _strict_json(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise AdapterFileError(f"{weights_path} has a corrupted safetensors header: {e}") from None
    if not isinstance(doc, dict):
        raise AdapterFileError(f"{weights_path} has a corrupted safetensors header: not a JSON object")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFileError(f"{weights_path} has a corrupted safetensors header: __metadata__ is not strings")
    for key, entry in doc.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str) \
                or not isinstance(entry.get("shape"), list) or not all(_is_int(d) and d >= 0 for d in entry["shape"]):
            raise AdapterFileError(f"{weights_path} has a corrupted safetensors header: entry {key!r:.80} is "
                                   f"{entry!r:.120}")
    return doc, metadata


def read_weights(folder: str, expected: dict[str, tuple], config: PARAConfig | None = None) -> dict[str, torch.Tensor]:
    """The tensors saved in ``folder``, which must be exactly ``expected`` ({name: shape}, float
    dtypes): the header is checked against it (and against ``config``'s checksum, for files that
    carry one) before any tensor is read, then the tensors' checksum."""
    weights_path = os.path.join(folder, WEIGHTS_NAME)
    header, metadata = read_header(weights_path)
    if metadata.get("para_format") != FORMAT or "sha256" not in metadata:
        raise AdapterFileError(f"{weights_path} was not written by para_kernels (no {FORMAT} checksum)")
    if config is not None and metadata.get("config_sha256", config_digest(config)) != config_digest(config):
        raise AdapterFileError(f"{weights_path} was saved with another config than {CONFIG_NAME} in {folder} (the two "
                               "files come from different saves, or the config was edited)")
    missing, extra = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or extra:
        raise AdapterFileError(f"the adapter in {folder} does not match this model: missing tensors "
                               f"{missing[:4]}, unexpected tensors {[k[:80] for k in extra[:4]]}")
    for key, shape in expected.items():
        entry = header[key]
        if tuple(entry["shape"]) != tuple(shape) or entry["dtype"] not in FLOAT_DTYPES:
            raise AdapterFileError(f"tensor {key} in {folder} has shape {entry['shape']!s:.80} "
                                   f"({entry['dtype']!r:.20}); this model needs {list(shape)} floats "
                                   f"({', '.join(FLOAT_DTYPES)})")
    try:
        with safe_open(weights_path, framework="pt") as f:  # validates the offsets against the file
            if any(tuple(f.get_slice(k).get_shape()) != tuple(shape) for k, shape in expected.items()):
                raise AdapterFileError(f"{weights_path} changed while it was read")  # replaced since read_header
            tensors = {k: f.get_tensor(k) for k in expected}
    except (OSError, SafetensorError) as e:
        raise AdapterFileError(f"cannot read {weights_path} (truncated or corrupted?): {e}") from None
    if _digest(tensors) != metadata["sha256"]:
        raise AdapterFileError(f"{weights_path} is corrupted: its contents do not match the checksum saved with it")
    return tensors


def read_adapter(folder: str) -> tuple[PARAConfig, dict, dict[str, torch.Tensor]]:
    """(config, info, tensors) of the adapter saved in ``folder``, checked for integrity (the
    tensors the header declares, whatever they are: PARAModel.load_adapter uses read_weights,
    which first checks them against the model)."""
    config, info = read_config(folder)
    header, _ = read_header(os.path.join(folder, WEIGHTS_NAME))
    return config, info, read_weights(folder, {k: tuple(v["shape"]) for k, v in header.items()}, config)


def with_fields(config: PARAConfig, **changes) -> PARAConfig:
    """A copy of ``config`` with ``changes`` (the shared config object is never edited in place)."""
    return dataclasses.replace(config, **changes)
