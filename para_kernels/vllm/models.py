"""PARA model classes for vLLM: the backbone's own class with PARA attached to each decoder layer.

Contract:
- ``PARA<Arch>`` for every ``<Arch>`` in ``ARCHITECTURES`` (vLLM's LLaMA layout: a decoder layer
  with ``input_layernorm``, ``self_attn.qkv_proj`` ([q | k | v] columns) and
  ``mlp.gate_up_proj`` ([gate | up]): LLaMA, Mistral, Qwen2, Qwen3). The weights load exactly as
  the backbone's; PARA adds no parameter to the model.
- ``attach(model, vllm_config)`` wraps three modules per layer: the input norm (its output pair
  gives the residual stream entering the layer and its normed input: the prompts completing in
  this step are pooled there), ``qkv_proj`` and ``gate_up_proj`` (their outputs are scaled by
  the step's slot rows with ``para::scale``). Outside a PARA step (``serving.STEP`` unset: warm-up,
  profiling, dummy runs) and in steps where no token has an adapter, each wrapper calls the
  original module alone: the bare model's computation, bit for bit.
"""
from __future__ import annotations

import importlib

import torch

from .. import ops
from .adapters import ModelFacts
from .serving import STEP, ServingState, shard_of

# vLLM class name -> module under vllm.model_executor.models
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3"}


def para_name(arch: str) -> str:
    return f"PARA{arch}"


def _wrap_norm(norm, layer: int):
    original = norm.forward

    def forward(x, residual=None):
        step = STEP.get()
        out = original(x) if residual is None else original(x, residual)
        if step is not None:
            step.layers_seen += 1
            if step.prefills:
                normed, stream = (out, x) if residual is None else out
                step.prefill(layer, stream, normed)
        return out

    norm.forward = forward


# On the CPU (where para::scale runs its PyTorch reference) the product is taken in place, without
# the packed op's fresh [tokens, n] output: a step whose tokens come in runs of one request averaging
# RUN_TOKENS or more (a prefill) run by run, with no gather at all (the gather cost 1.2 ms per projection
# for an 800-token prefill), other steps (decode: one token per request) with one gather of the slots'
# rows. On a GPU every step goes through para::scale with token_rows (the Triton / CUDA kernels). All
# compute the same fp32 products; IN_PLACE_ON_CPU = False runs the GPU path on the CPU (tests).
RUN_TOKENS = 8
IN_PLACE_ON_CPU = True


def _wrap_scaled(proj, banks: dict, layer: int):
    original = proj.forward

    def forward(x):
        out = original(x)
        step = STEP.get()
        if step is None:
            return out
        y, bias = out if isinstance(out, tuple) else (out, None)
        bank, rows = banks[layer], step.token_rows[:y.shape[0]]
        if IN_PLACE_ON_CPU and y.device.type == "cpu" and not y.requires_grad:
            if len(step.runs) * RUN_TOKENS <= y.shape[0]:
                for start, end, slot in step.runs:
                    y[start:end].mul_(bank[slot])
            else:
                y.mul_(bank.index_select(0, rows))
        else:
            y = ops.scale(y, bank, rows)
        return (y, bias) if isinstance(out, tuple) else y

    proj.forward = forward


def model_facts(hf_config) -> ModelFacts:
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return ModelFacts(hf_config.hidden_size, hf_config.num_hidden_layers,
                      {"q": heads * head_dim, "v": kv_heads * head_dim, "up": hf_config.intermediate_size})


def attach(model: torch.nn.Module, vllm_config) -> ServingState:
    """PARA on every decoder layer this rank holds; the state is ``model.para_serving``."""
    backbone = model.model
    start = getattr(backbone, "start_layer", 0)
    end = getattr(backbone, "end_layer", len(backbone.layers))
    layers = {i: backbone.layers[i] for i in range(start, end)}
    shards = {i: shard_of(layer.self_attn.qkv_proj, layer.mlp.gate_up_proj) for i, layer in layers.items()}
    param = next(model.parameters())
    state = ServingState(model_facts(vllm_config.model_config.hf_config), shards,
                         vllm_config.scheduler_config.max_num_seqs, param.device, vllm_config.model_config.dtype)
    for i, layer in layers.items():
        _wrap_norm(layer.input_layernorm, i)
        _wrap_scaled(layer.self_attn.qkv_proj, state.qkv, i)
        _wrap_scaled(layer.mlp.gate_up_proj, state.gate_up, i)
    model.para_serving = state
    return state


def _para_class(arch: str, module: str):
    base = getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), arch)

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        base.__init__(self, vllm_config=vllm_config, prefix=prefix, **kwargs)
        attach(self, vllm_config)

    return type(para_name(arch), (base,), {"__init__": __init__, "__module__": __name__,
                                           "__doc__": f"vLLM's {arch} with PARA adapters per request."})


def __getattr__(name: str):  # PARA<Arch> classes are built on first use (importing vLLM's model modules)
    for arch, module in ARCHITECTURES.items():
        if name == para_name(arch):
            cls = globals()[name] = _para_class(arch, module)
            return cls
    raise AttributeError(name)
