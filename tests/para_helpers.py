"""Shared helpers for the wrapper tests: tiny random Llama models (no hub downloads) and
adapters with nonzero weights (a fresh adapter is the identity: W_up = b_up = 0)."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tiny_models import PAD

VOCAB = 128
HIDDEN = 32
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 64


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models are all per-op overhead: extra intra-op threads only add contention
    (several times slower on a loaded 2-core machine). Import this into a test module to
    run its tests on one thread; the previous setting is restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed: int = 0, hidden: int = HIDDEN, layers: int = 2, dtype=torch.float32,
               intermediate: int = INTERMEDIATE, **overrides) -> LlamaForCausalLM:
    """A random LlamaForCausalLM (hidden 32, 2 layers, 4 heads, 2 kv heads, vocab 128) in
    eval mode; the same seed gives bitwise the same weights. EOS is switched off for
    generation so that every row generates exactly max_new_tokens tokens."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=256,
                      **overrides)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def n_outputs(targets=("q", "v", "up"), hidden: int = HIDDEN, intermediate: int = INTERMEDIATE) -> int:
    """N = n_q + n_v + n_u of the tiny model, for the chosen targets."""
    head_dim = hidden // HEADS
    sizes = {"q": HEADS * head_dim, "v": KV_HEADS * head_dim, "up": intermediate}
    return sum(sizes[t] for t in targets)


def adapter_params(pm, name: str = "default") -> dict[str, torch.nn.Parameter]:
    """{parameter name: parameter} of one adapter, across all layers."""
    key = f".para_generator.adapters.{name}."
    return {n: p for n, p in pm.named_parameters() if key in n}


def randomize_adapter(pm, name: str = "default", seed: int = 1, std: float = 0.3) -> None:
    """Give an adapter random nonzero weights (act_params of 'rational' are only nudged, so
    the activation stays close to its GELU start)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in adapter_params(pm, name).items():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            if n.endswith("act_params"):
                p.add_(0.01 * noise)
            else:
                p.copy_(std * noise)


def batch_inputs(batch: int, length: int, pads: list[int], seed: int = 1):
    """Random ids with left padding: row b has pads[b] pad tokens in front."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    ids[mask == 0] = PAD
    return ids, mask


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return float((out.double() - ref.double()).norm() / ref.double().norm())
