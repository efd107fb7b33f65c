"""Helpers of the vLLM plugin tests (tests/vllm_plugin): a tiny LLaMA vLLM's CPU build can serve, PARA
adapters on it, an in-process engine, greedy tokens per request."""
from __future__ import annotations

import json
import os

import torch

MAX_TOKENS = 12
PROMPTS = ["hello world", "the cat sat on", "abc def ghi jkl mno", "hello world", "zz"]


def build_model(folder: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from .models import char_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)


def load_hf(folder: str):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def save_adapter(model_folder: str, out: str, seed: int | None, config=None) -> str:
    """A PARA adapter on the model: random W_up / b_up from ``seed`` (None: PARAModel's zeros)."""
    import para_kernels as pk

    pm = pk.PARAModel(load_hf(model_folder), config or pk.PARAConfig(r=4))
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if name.rsplit(".", 1)[-1] in ("w_up", "b_up", "w_sa", "act_params"):
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(out)
    return out


def engine(served, max_adapters: int = 8, **kwargs):
    """An in-process LLM serving the PARA model with adapters a, b, zero, attn known by name."""
    from vllm import LLM

    known = {k: v for k, v in served["adapters"].items() if k != "c"}  # c: loaded at run time only
    os.environ["PARA_VLLM_ADAPTERS"] = json.dumps(known)
    os.environ["PARA_VLLM_MAX_ADAPTERS"] = str(max_adapters)
    args = dict(hf_overrides={"architectures": ["PARALlamaForCausalLM"]}, max_model_len=256, dtype="float32",
                seed=0, max_num_seqs=8)
    args.update(kwargs)
    return LLM(served["model"], **args)


def params(name=None, path=None, max_tokens=MAX_TOKENS):
    from vllm import SamplingParams

    extra = {k: v for k, v in (("para_adapter", name), ("para_adapter_path", path)) if v is not None}
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra or None)


def tokens(llm, prompts, names, **kw):
    """Greedy token ids of ``prompts``, request i served with adapter ``names[i]`` (None: bare)."""
    outs = llm.generate(list(prompts), [params(n, **kw) for n in names], use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]
