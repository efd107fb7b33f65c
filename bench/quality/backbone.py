"""Backbones and their tokenizers, behind one small interface.

Contract:
- ``load(name)`` -> (model, tok): "smollm2" is SmolLM2-135M-Instruct (offline, fp32, its chat
  template); "tiny" is a random 2-layer Llama (built here, nothing downloaded) with a
  character-level tokenizer, for ``--quick`` and the tests.
- ``tok.prompt_ids(prompt)``: the chat-formatted prompt, ending where the answer starts;
  ``tok.answer_ids(answer)``: the answer and the end-of-turn token; ``tok.decode(ids)`` stops at
  the end-of-turn token and drops special tokens; ``tok.pad_id``, ``tok.eos_id``.
"""
from __future__ import annotations

import torch


class CharTok:
    """One id per printable ASCII character and one for anything else (decoded as a newline); 0 pad,
    1 bos, 2 end of turn; ids above those 99 decode to nothing."""
    pad_id, bos_id, eos_id, offset = 0, 1, 2, 3
    vocab_size = 128

    def _enc(self, text: str) -> list[int]:
        return [self.offset + ord(c) - 32 if 32 <= ord(c) < 127 else self.offset + 95 for c in text]

    def prompt_ids(self, prompt: str) -> list[int]:
        return [self.bos_id] + self._enc(f"Q: {prompt}\nA: ")

    def answer_ids(self, answer: str) -> list[int]:
        return self._enc(answer) + [self.eos_id]

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if self.offset <= i < self.offset + 95:
                out.append(chr(i - self.offset + 32))
            elif i == self.offset + 95:
                out.append("\n")
        return "".join(out)


class ChatTok:
    """A Hugging Face tokenizer with a chat template (SmolLM2's: the default system turn)."""

    def __init__(self, hf):
        self.hf = hf
        self.eos_id = hf.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = hf.pad_token_id if hf.pad_token_id is not None else self.eos_id

    def prompt_ids(self, prompt: str) -> list[int]:
        text = self.hf.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def answer_ids(self, answer: str) -> list[int]:
        return self.hf(answer, add_special_tokens=False)["input_ids"] + [self.eos_id]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.hf.decode(ids, skip_special_tokens=True)


def tiny(seed: int = 0):
    """A random Llama (hidden 64, 2 layers) over CharTok's vocabulary, eval mode, fp32; weights 10x HF's
    default init (0.2), so that its output depends on the activations the adapters rescale."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = CharTok()
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                         tie_word_embeddings=False, initializer_range=0.2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_id
    model.generation_config.eos_token_id = tok.eos_id
    return model.eval(), tok


def load(name: str):
    if name == "tiny":
        return tiny()
    if name == "smollm2":
        from bench.smollm2 import load as load_smollm2

        model, hf = load_smollm2(torch.float32)
        return model, ChatTok(hf)
    raise ValueError(f"unknown backbone {name!r} (tiny, smollm2)")
