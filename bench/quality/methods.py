"""The compared methods, each built on a fresh copy of the backbone.

Contract:
- ``Method(name, kind, params)``: kind "bare" (zero-shot, nothing trains), "para"
  (``pk.get_para_model`` with ``PARAConfig(**params)``), "lora" (PEFT's ``get_peft_model`` with
  ``LoraConfig(r, lora_alpha=2r, q_proj and v_proj, no dropout)``) or "ia3" (PEFT's
  ``get_peft_model`` with ``IA3Config`` on k_proj, v_proj, down_proj: PEFT's Llama default).
- ``build(method, backbone, seed)``: a deep copy of the backbone (never the backbone itself),
  adapter weights drawn under ``torch.manual_seed(seed)``, the backbone frozen.
- ``trainable(model)``: parameters with requires_grad. ``lora_count(backbone, r)``: LoRA's
  trainable parameters on q, v at rank r, r * (in + out) per module, counted from the modules.
- ``matched_lora_rank(backbone, target)``: the rank whose count is closest to ``target``
  (ties: the smaller rank).
- ``default_methods(backbone, full)``: bare, PARA r=12 (q, v, up; last; gelu), LoRA at the
  matched rank, LoRA r=8, (IA)3; with ``full`` the PARA ablations (pooler, r, targets, activation).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

import para_kernels as pk

LORA_TARGETS = ("q_proj", "v_proj")
IA3_TARGETS, IA3_FEEDFORWARD = ("k_proj", "v_proj", "down_proj"), ("down_proj",)
PARA_DEFAULT = dict(r=12, pooler="last", activation="gelu", targets=("q", "v", "up"))
ABLATIONS = {"pooler": [("mean", dict(pooler="mean")), ("max", dict(pooler="max")), ("attn", dict(pooler="attn"))],
             "r": [("4", dict(r=4)), ("32", dict(r=32))],
             "targets": [("qv", dict(targets=("q", "v"))), ("up", dict(targets=("up",)))],
             "activation": [("rational", dict(activation="rational")), ("relu", dict(activation="relu")),
                            ("identity", dict(activation="identity"))]}


@dataclass
class Method:
    name: str
    kind: str
    params: dict = field(default_factory=dict)
    ablation: str | None = None


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _linears(backbone, suffixes):
    return [m for n, m in backbone.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in suffixes]


def lora_count(backbone, r: int) -> int:
    return sum(r * (m.in_features + m.out_features) for m in _linears(backbone, LORA_TARGETS))


def matched_lora_rank(backbone, target: int, max_rank: int = 512) -> int:
    return min(range(1, max_rank + 1), key=lambda r: (abs(lora_count(backbone, r) - target), r))


def build(method: Method, backbone, seed: int):
    from peft import IA3Config, LoraConfig, get_peft_model

    model = copy.deepcopy(backbone)
    torch.manual_seed(seed)
    if method.kind == "bare":
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    if method.kind == "para":
        return pk.get_para_model(model, pk.PARAConfig(**method.params))
    if method.kind == "lora":
        r = method.params["r"]
        cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                         task_type="CAUSAL_LM")
        return get_peft_model(model, cfg)
    if method.kind == "ia3":
        cfg = IA3Config(target_modules=list(IA3_TARGETS), feedforward_modules=list(IA3_FEEDFORWARD),
                        task_type="CAUSAL_LM")
        return get_peft_model(model, cfg)
    raise ValueError(f"unknown method kind {method.kind!r}")


def para_count(backbone, params: dict) -> int:
    return trainable(build(Method("para", "para", params), backbone, 0))


def default_methods(backbone, full: bool = False) -> list[Method]:
    r = matched_lora_rank(backbone, para_count(backbone, PARA_DEFAULT))
    methods = [Method("bare", "bare"), Method("para", "para", dict(PARA_DEFAULT)),
               Method(f"lora-r{r} (matched)", "lora", dict(r=r))]
    methods += [Method("lora-r8", "lora", dict(r=8))] if r != 8 else []
    methods.append(Method("ia3", "ia3"))
    if full:
        for axis, variants in ABLATIONS.items():
            for tag, change in variants:
                methods.append(Method(f"para {axis}={tag}", "para", {**PARA_DEFAULT, **change}, ablation=axis))
    return methods
