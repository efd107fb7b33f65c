"""The methods of the serving comparison, by name, and what each name means.

    bare, bare_again           the backbone alone (bare_again: the A/A control)
    para, para_none            PARA (para_none: every row routed to no adapter)
    para@<backend>             PARA with para_kernels backend <backend> forced around its calls
    peft_lora[_r<k>]           PEFT LoRA (at rank k; plain name: the headline rank)
    bgmv_lora[_r<k>]           the same LoRA weights served by per-row gathers (lora_baselines.py)
    ia3                        (IA)3-style per-tenant vectors (lora_baselines.py)
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from para_kernels import ops as para_ops

if TYPE_CHECKING:
    from .serving_setup import ServingConfig

METHOD_LABELS = {
    "bare": "bare backbone",
    "para": "PARA (q, v, up; r=12)",
    "para_none": "PARA model, all rows None",
    "peft_lora": "PEFT LoRA r={r} (q, v), mixed batch",
    "bgmv_lora": "BGMV-style LoRA r={r} (q, v), per-row gather",
    "ia3": "(IA)3 per-row vectors (k, v, up)",
    "bare_again": "bare backbone again (A/A control)",
}


_LORA_METHOD = re.compile(r"^(peft_lora|bgmv_lora)(?:_r(\d+))?$")


def lora_method(method: str, cfg: "ServingConfig") -> tuple[str, int] | None:
    """'peft_lora' -> ('peft_lora', lora_r); 'bgmv_lora_r16' -> ('bgmv_lora', 16); else None."""
    m = _LORA_METHOD.match(method)
    if m is None:
        return None
    return m.group(1), int(m.group(2)) if m.group(2) else cfg.lora_r


def para_backend(method: str) -> str | None:
    """'para@triton' -> 'triton'; 'para' (default dispatch) and other methods -> None."""
    head, _, backend = method.partition("@")
    return backend if head == "para" and backend else None


def is_para(method: str) -> bool:
    """Methods served by the PARA model: para, para_none and every para@<backend>."""
    return method in ("para", "para_none") or para_backend(method) is not None


def backend_methods(device: torch.device) -> tuple:
    """'para@<backend>' for every para_kernels backend available on ``device`` when there are
    several (a GPU: reference / triton / cuda); none on the CPU, where only the default PARA
    (reference) is measured (the Triton interpreter is not a serving backend)."""
    if device.type != "cuda":
        return ()
    found = para_ops.available_backends(device)
    return tuple(f"para@{b}" for b in found) if len(found) > 1 else ()


@contextmanager
def forced_backend(name: str):
    """para_kernels.ops.set_backend(name) inside the block; the previous choice afterwards."""
    previous = para_ops.get_backend()
    para_ops.set_backend(name)
    try:
        yield
    finally:
        para_ops.set_backend(previous)


def method_label(method: str, cfg: "ServingConfig") -> str:
    backend = para_backend(method)
    if backend is not None:
        return f"PARA, {backend} backend forced"
    lora = lora_method(method, cfg)
    if lora is not None:
        return METHOD_LABELS[lora[0]].format(r=lora[1])
    return METHOD_LABELS[method]


def popularity_methods(cfg: "ServingConfig") -> list[str]:
    """The methods of the popularity table: the headline's (but para_none and para@<backend>,
    which share the PARA model with para and so cannot decode in lockstep with it) plus each
    LoRA method at every other rank of ``lora_ranks``."""
    out = []
    for m in cfg.methods:
        if is_para(m) and m != "para":
            continue
        out.append(m)
        if m in ("peft_lora", "bgmv_lora"):
            out += [f"{m}_r{r}" for r in cfg.lora_ranks if r != cfg.lora_r]
    return out
