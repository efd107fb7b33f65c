"""Adapter files: safetensors weights plus a JSON config, nothing pickled. The weights'
checksum is kept in the safetensors header, so a corrupted file is refused, not loaded."""
from __future__ import annotations

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
FORMAT = "para_kernels.adapter.v1"


class AdapterFileError(ValueError):
    """An adapter folder that cannot be loaded: missing, truncated, corrupted or mismatched."""


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_adapter(folder: str, config: PARAConfig, tensors: dict[str, torch.Tensor], info: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    metadata = {"format": "pt", "para_format": FORMAT, "sha256": _digest(tensors)}
    save_file(tensors, os.path.join(folder, WEIGHTS_NAME), metadata=metadata)
    doc = {"format": FORMAT, "para_kernels_version": __version__, **info, "config": config.to_dict()}
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def adapter_folder(path: str, adapter_name: str) -> str:
    """``path`` itself when it holds an adapter, else its subfolder ``adapter_name``."""
    for folder in (path, os.path.join(path, adapter_name)):
        if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            return folder
    raise AdapterFileError(f"no PARA adapter in {path!r}: expected {CONFIG_NAME} there or in "
                           f"{os.path.join(path, adapter_name)!r}")


def read_adapter(folder: str) -> tuple[PARAConfig, dict, dict[str, torch.Tensor]]:
    """(config, info, tensors) of the adapter saved in ``folder``, checked for integrity."""
    config_path = os.path.join(folder, CONFIG_NAME)
    try:
        with open(config_path) as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"cannot read {config_path} (missing, truncated or corrupted?): {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("config"), dict):
        raise AdapterFileError(f"{config_path} is not a PARA adapter config (expected format {FORMAT!r})")
    try:
        config = PARAConfig.from_dict(doc["config"])
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{config_path} holds an invalid PARA config: {e}") from None
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
    info = {k: v for k, v in doc.items() if k not in ("format", "config")}
    return config, info, tensors
