"""Tiny random-weight Hugging Face causal LMs, built from configs (nothing is downloaded).

``tiny_model(arch)`` returns a 2-layer model in eval mode with eager attention; ``ARCHITECTURES``
lists the supported ``arch`` names.
"""
from __future__ import annotations

import torch

VOCAB = 128
PAD = 0

# weights 10x HF's default init (0.02): sharper attention and logits, so that scaling the wrong
# features (keys, the gate) changes the output clearly
INIT_STD = 0.2
_COMMON = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
               initializer_range=INIT_STD)
_ROPE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)

CONFIGS = {
    "llama": ("LlamaConfig", dict(_ROPE)),
    "mistral": ("MistralConfig", dict(_ROPE, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(_ROPE)),
    "qwen3": ("Qwen3Config", dict(_ROPE, head_dim=16)),  # head_dim != hidden / heads
    "gemma": ("GemmaConfig", dict(_ROPE, head_dim=16, hidden_act="gelu_pytorch_tanh")),
    "gemma2": ("Gemma2Config", dict(_ROPE, head_dim=8, sliding_window=16, query_pre_attn_scalar=8)),
    "phi3": ("Phi3Config", dict(_ROPE)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=64)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.5)),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=64, word_embed_proj_dim=32, init_std=INIT_STD)),
}
ARCHITECTURES = list(CONFIGS)


def tiny_config(arch: str):
    import transformers

    cls_name, kwargs = CONFIGS[arch]
    config = getattr(transformers, cls_name)(**_COMMON, **kwargs)
    config._attn_implementation = "eager"
    return config


def tiny_model(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A tiny random-weight causal LM of ``arch`` in eval mode (weights from ``seed``)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
        # random (not default-zero) biases and norm weights, so that every path is exercised
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name or name.endswith("ln_1.weight") \
                        or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                    p.add_(0.1 * torch.randn_like(p))
    model.generation_config.pad_token_id = PAD
    return model.eval()
