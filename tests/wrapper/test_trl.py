"""TRL's SFTTrainer trains a PARA model (completion-only loss, packing, its default precision), and
a completion mask tells PARA where each row's prompt ends."""
from __future__ import annotations

import pytest
import torch

import para_kernels.transformers.requests as para_requests
from para_kernels import PARAConfig, get_para_model

from kit.models import randomize_adapter, tiny_llama

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

pytestmark = pytest.mark.usefixtures("single_thread")

K = 8  # keys: the prompt ends with key token 10+k, the answer is token 100+k; noise tokens are 20..89


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _examples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        k = int(torch.randint(0, K, (1,), generator=gen))
        noise = torch.randint(20, 90, (int(torch.randint(2, 5, (1,), generator=gen)),), generator=gen).tolist()
        rows.append((" ".join(f"w{t}" for t in noise + [10 + k]), f" w{100 + k}"))
    return rows


def _prompt_length(tokens: torch.Tensor) -> int:
    """The prompt of one example, read from its tokens alone: up to its key token."""
    keys = ((tokens >= 10) & (tokens < 10 + K)).nonzero()
    return int(keys[0, 0]) + 1


def _trainer(tmp_path, dataset, tokenizer=None, **config):
    from trl import SFTConfig, SFTTrainer

    pm = get_para_model(tiny_llama(seed=0, initializer_range=0.3), PARAConfig(r=8))
    args = SFTConfig(output_dir=str(tmp_path), report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
                     per_device_train_batch_size=8, learning_rate=1e-2, disable_tqdm=True, max_length=32,
                     dataloader_num_workers=0, **config)
    return pm, SFTTrainer(model=pm, args=args, train_dataset=dataset,
                          processing_class=tokenizer or _tokenizer())


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _prompt_completion(n: int = 64):
    return datasets.Dataset.from_list([{"prompt": p, "completion": c} for p, c in _examples(n)])


def test_sft_trainer_completion_only_loss_pools_the_prompt_and_learns(tmp_path, monkeypatch):
    seen = []
    real = para_requests.prompt_ranges

    def spy(batch, length, device, attention_mask=None, labels=None, prompt_lengths=None):
        start, end = real(batch, length, device, attention_mask, labels, prompt_lengths)
        seen.append((start, end))
        return start, end

    monkeypatch.setattr(para_requests, "prompt_ranges", spy)
    # TRL's default precision (bf16 where the machine has it) and its fused LM head: the trainer calls
    # pm.base_model (the decoder backbone) inside the PARAModel call
    pm, trainer = _trainer(tmp_path, _prompt_completion(), max_steps=12)
    ids = []
    real_call = type(pm).__call__

    def spy_call(self, *args, **kwargs):
        ids.append((kwargs["input_ids"], kwargs.get("attention_mask")))
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(type(pm), "__call__", spy_call)
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 12 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert len(seen) == len(ids) == 12
    for (start, end), (x, _mask) in zip(seen, ids):
        for b in range(x.shape[0]):
            row = x[b, int(start[b]):]
            assert int(end[b] - start[b]) == _prompt_length(row), (x[b], start[b], end[b])


def test_sft_trainer_bf16_loss_is_close_to_fp32(tmp_path):
    results = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        _, trainer = _trainer(tmp_path / str(bf16), _prompt_completion(32), max_steps=3, bf16=bf16)
        trainer.train()
        results[bf16] = _losses(trainer)
    for loss16, loss32 in zip(results[True], results[False]):
        assert abs(loss16 - loss32) <= 2e-2 * loss32, results


def test_sft_trainer_packing_gives_each_example_its_prompt(tmp_path, monkeypatch):
    seen = []
    real = para_requests.packed_prompts

    def spy(position_ids, batch, length, device, attention_mask=None, labels=None, prompt_lengths=None):
        out = real(position_ids, batch, length, device, attention_mask, labels, prompt_lengths)
        seen.append((position_ids.expand(batch, length).reshape(-1), out[0], out[1]))
        return out

    monkeypatch.setattr(para_requests, "packed_prompts", spy)
    tokens = []
    pm, trainer = _trainer(tmp_path, _prompt_completion(), max_steps=10, packing=True, padding_free=True,
                           bf16=False)
    # TRL's fused LM head calls the decoder backbone (pm.base_model), not the causal LM
    pm.base_model.register_forward_pre_hook(lambda m, a, kw: tokens.append(kw["input_ids"].reshape(-1)),
                                            with_kwargs=True)
    trainer.train()
    losses = _losses(trainer)
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert len(seen) == 10 and len(tokens) == 10
    for (positions, start, end), flat in zip(seen, tokens):
        assert len(start) > 8  # several examples per packed row
        for s, e in zip(start.tolist(), end.tolist()):
            assert positions[s] == 0
            assert e - s == _prompt_length(flat[s:]), (flat[s:e + 2], s, e)


def test_sft_trainer_on_plain_text_says_what_to_pass(tmp_path):
    text = datasets.Dataset.from_list([{"text": p + c} for p, c in _examples(16)])
    _, trainer = _trainer(tmp_path, text, max_steps=1, bf16=False)
    with pytest.raises(ValueError, match="every attended token is supervised.*prompt_lengths.*-100.*completion_mask"):
        trainer.train()


def test_peft_names_that_trl_and_transformers_read():
    model = tiny_llama()
    pm = get_para_model(model, PARAConfig(r=4))
    assert pm.get_base_model() is model
    assert pm.base_model is model.model  # transformers' base_model: the decoder backbone
    assert "base_model.model.layers.0.self_attn.q_proj.weight" in pm.state_dict()  # keys unchanged
    assert pm.config is model.config and pm.get_output_embeddings() is model.lm_head
    assert pm.get_input_embeddings() is model.model.embed_tokens
    assert pm.active_adapters == ["default"] and set(pm.peft_config) == {"default"}
    # transformers' "adapters are attached" flag: Trainer then trains a quantized (e.g. GGUF) backbone
    from transformers.trainer_utils import validate_quantization_for_training

    assert pm._hf_peft_config_loaded is True
    model.is_quantized = True
    validate_quantization_for_training(pm)  # raises for a quantized model with no adapters
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(model)


def _vectors(pm, x, **kwargs):
    cache = pm(input_ids=x, use_cache=True, **kwargs).past_key_values
    return pm.request_state(cache).vectors()


def _assert_same_vectors(a, b):
    assert [k for k, _ in a] == [k for k, _ in b] and a
    for (_, va), (_, vb) in zip(a, b):
        torch.testing.assert_close(va, vb, rtol=0, atol=0)


def test_completion_mask_marks_the_answer_before_labels():
    pm = get_para_model(tiny_llama(), PARAConfig(r=4))
    randomize_adapter(pm)
    x = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros_like(x)
    for b, p in enumerate((2, 5, 8)):
        mask[b, p:] = 1
    expected = _vectors(pm, x, prompt_lengths=[2, 5, 8])
    with torch.no_grad():
        _assert_same_vectors(_vectors(pm, x, completion_mask=mask), expected)
        _assert_same_vectors(_vectors(pm, x, assistant_masks=mask), expected)
        # fully supervised labels say nothing about the prompt: the mask decides
        _assert_same_vectors(_vectors(pm, x, completion_mask=mask, labels=x), expected)
        # prompt_lengths come first
        _assert_same_vectors(_vectors(pm, x, completion_mask=mask, prompt_lengths=[3, 3, 3]),
                             _vectors(pm, x, prompt_lengths=[3, 3, 3]))
        # a direct pm.forward(...) call goes through the same hooks
        direct = pm.forward(input_ids=x, completion_mask=mask, use_cache=True).past_key_values
        _assert_same_vectors(pm.request_state(direct).vectors(), expected)
    with pytest.raises(ValueError, match="every attended token is supervised.*prompt_lengths.*completion_mask"):
        pm(input_ids=x, labels=x)


def test_completion_mask_on_packed_rows():
    pm = get_para_model(tiny_llama(), PARAConfig(r=4))
    randomize_adapter(pm)
    x = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1]])
    labels = torch.where(mask.bool(), x, -100)
    seen = []
    real = para_requests.packed_prompts

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append((out[0].tolist(), out[1].tolist()))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(para_requests, "packed_prompts", spy)
        with_mask = pm(input_ids=x, position_ids=positions, completion_mask=mask, labels=x).logits
        with_labels = pm(input_ids=x, position_ids=positions, labels=labels).logits
    assert seen == [([0, 5], [2, 9])] * 2
    torch.testing.assert_close(with_mask, with_labels, rtol=0, atol=0)


def test_sft_trainer_assistant_only_loss_pools_the_user_turn(tmp_path, monkeypatch):
    seen = []
    real = para_requests.prompt_ranges

    def spy(batch, length, device, attention_mask=None, labels=None, prompt_lengths=None):
        start, end = real(batch, length, device, attention_mask, labels, prompt_lengths)
        seen.append((start, end, labels))
        return start, end

    monkeypatch.setattr(para_requests, "prompt_ranges", spy)
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c.strip()}]}
            for p, c in _examples(16)]
    tokenizer = _tokenizer()  # a chat template marking the assistant's tokens ({% generation %})
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}"
        "{% endgeneration %}{% else %}{{ m['content'] }} {% endif %}{% endfor %}")
    _, trainer = _trainer(tmp_path, datasets.Dataset.from_list(rows), tokenizer, max_steps=2,
                          assistant_only_loss=True)
    trainer.train()
    assert len(seen) == 2 and all(map(torch.isfinite, torch.tensor(_losses(trainer))))
    for start, end, labels in seen:
        for b in range(labels.shape[0]):
            assert (labels[b, :int(end[b])] == -100).all() and labels[b, int(end[b])] >= 100  # the answer
            assert 3 <= int(end[b] - start[b]) <= 5  # the whole user turn: 2 to 4 noise tokens and the key
