"""The tiny-model factory: random-weight Hugging Face causal LMs built from configs (nothing is
downloaded), and helpers for PARA adapters on them.

``tiny_model(arch)`` returns a 2-layer model of any of ``ARCHITECTURES`` in eval mode with eager
attention; ``tiny_llama()`` is the Llama preset the wrapper tests were calibrated on (hidden 32,
intermediate 64, HF's default init, EOS off). Adapters start as the identity (W_up = b_up = 0):
``randomize_adapter`` gives one nonzero weights.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

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


# ------------------------------------------------------------------ the Llama preset and adapters
HIDDEN = 32
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 64


def tiny_llama(seed: int = 0, hidden: int = HIDDEN, layers: int = 2, dtype=torch.float32,
               intermediate: int = INTERMEDIATE, **overrides) -> LlamaForCausalLM:
    """A random LlamaForCausalLM (hidden 32, 2 layers, 4 heads, 2 kv heads, vocab 128) in
    eval mode; the same seed gives bitwise the same weights. EOS is switched off for
    generation so that every row generates exactly max_new_tokens tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

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


# the PEFT folder layout's file names (pinned here, not read from para_kernels: the layout is a contract)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def token_ids(seed: int = 3, batch: int = 2, length: int = 7) -> torch.Tensor:
    """Random token ids [batch, length] in the tiny models' vocabulary, no padding."""
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits_of(pm, **kwargs) -> torch.Tensor:
    """The model's logits on token_ids(), without gradients."""
    with torch.no_grad():
        return pm(input_ids=token_ids(), **kwargs).logits


def char_tokenizer():
    """A character-level fast tokenizer whose ids fit the tiny models' vocabulary (pad 0, bos 1,
    eos 2, then newline and printable ASCII), for tests that need real text (the README's)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<pad>")


def save_tiny_checkpoint(folder: str) -> str:
    """tiny_llama() and char_tokenizer() saved as a model folder (what a Hub id resolves to)."""
    tiny_llama().save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder
