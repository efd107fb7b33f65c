"""Training PARA: a toy task it must learn from the prompt, the Hugging Face Trainer with a
prompt_lengths column, and gradient checkpointing."""
from __future__ import annotations

import functools
import math

import pytest
import torch
from transformers import Trainer, TrainingArguments

import para_kernels.transformers.requests as para_model
from para_kernels import PARAConfig, PARAModel, get_para_model

from kit.models import adapter_params, randomize_adapter, tiny_llama

# the single_thread fixture: tests/wrapper/conftest.py
pytestmark = pytest.mark.usefixtures("single_thread")

K = 8  # number of keys / answers in the toy task


def _toy_batch(gen: torch.Generator, batch: int):
    """Prompt: 3 random tokens then a key token k in [10, 10+K); response: the token 100+k.
    The answer is a function of the prompt, so a prompt-blind predictor's best loss is ln K."""
    key = torch.randint(0, K, (batch,), generator=gen)
    noise = torch.randint(10, 128, (batch, 3), generator=gen)
    x = torch.cat([noise, (10 + key)[:, None], (100 + key)[:, None]], 1)
    labels = torch.full_like(x, -100)
    labels[:, -1] = x[:, -1]
    return x, labels


def test_para_learns_a_prompt_dependent_toy_task_with_a_frozen_backbone():
    # a larger init range than HF's 0.02 gives the random backbone logits that can be steered
    model = tiny_llama(seed=0, initializer_range=0.3)
    backbone = {n: p.detach().clone() for n, p in model.named_parameters()}
    pm = get_para_model(model, PARAConfig(r=8))
    gen = torch.Generator().manual_seed(0)
    eval_x, eval_labels = _toy_batch(gen, 256)

    def eval_loss():
        with torch.no_grad():
            return pm(input_ids=eval_x, labels=eval_labels).loss.item()

    before = eval_loss()
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert trainable and len(trainable) == len(adapter_params(pm))
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    pm.train()
    for _ in range(100):
        x, labels = _toy_batch(gen, 32)
        loss = pm(input_ids=x, labels=labels).loss  # prompt = the labels' -100 prefix
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()
    after = eval_loss()
    assert after < 0.5 * before, (before, after)
    assert after < 0.8 * math.log(K), (before, after)  # better than any prompt-blind answer
    for n, p in model.named_parameters():
        if n in backbone:
            assert torch.equal(p, backbone[n]), f"backbone weight {n} changed"
            assert p.grad is None, f"backbone weight {n} got a gradient"


def test_hf_trainer_passes_prompt_lengths_to_forward(tmp_path, monkeypatch):
    model = tiny_llama()
    backbone = {n: p.detach().clone() for n, p in model.named_parameters()}
    pm = get_para_model(model, PARAConfig(r=4))
    start = {n: p.detach().clone() for n, p in adapter_params(pm).items()}
    gen = torch.Generator().manual_seed(0)
    data = []
    for i in range(8):
        ids = torch.randint(3, 128, (8,), generator=gen).tolist()
        # labels supervise every token: without prompt_lengths the prompt would be empty (an error)
        data.append({"input_ids": ids, "labels": list(ids), "prompt_lengths": 2 + i % 4})

    forwards, ends = [], []
    real_call = PARAModel.__call__  # the call's pre-hook takes prompt_lengths out before forward runs

    @functools.wraps(real_call)
    def spy_call(self, *args, **kwargs):
        forwards.append(kwargs.get("prompt_lengths"))
        return real_call(self, *args, **kwargs)

    real_ranges = para_model.prompt_ranges

    def spy_ranges(*args, **kwargs):
        start_, end_ = real_ranges(*args, **kwargs)
        ends.append(end_.tolist())
        return start_, end_

    monkeypatch.setattr(PARAModel, "__call__", spy_call)
    monkeypatch.setattr(para_model, "prompt_ranges", spy_ranges)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], save_strategy="no", use_cpu=True,
                             max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=pm, args=args, train_dataset=data)
    result = trainer.train()
    assert result.global_step == 3 and math.isfinite(result.training_loss)
    assert len(forwards) == 3 and len(ends) == 3
    for lengths, end in zip(forwards, ends):
        assert torch.is_tensor(lengths) and lengths.shape == (2,)
        assert lengths.tolist() == end  # no padding: the prompt ends at its length
        assert set(end) <= {2, 3, 4, 5}
    changed = [n for n, p in adapter_params(pm).items() if not torch.equal(p, start[n])]
    assert any(n.endswith("w_up") for n in changed)
    for n, p in model.named_parameters():
        if n in backbone:
            assert torch.equal(p, backbone[n]), n


def _loss_and_grads(pm, x, labels):
    pm.zero_grad(set_to_none=True)
    loss = pm(input_ids=x, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in adapter_params(pm).items()}


def test_gradient_checkpointing_gives_the_same_loss_and_generator_gradients():
    model = tiny_llama(dtype=torch.float64)
    pm = get_para_model(model, PARAConfig(r=4, pooler="attn"))
    randomize_adapter(pm)
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(3, 128, (3, 10), generator=gen)
    labels = x.clone()
    labels[:, :4] = -100
    pm.train()
    loss, grads = _loss_and_grads(pm, x, labels)

    q_calls = []  # a pre-hook: the recompute may stop early, before a module's forward returns
    handle = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda *a: q_calls.append(1))
    pm.gradient_checkpointing_enable()
    pm.train()
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    loss_ckpt, grads_ckpt = _loss_and_grads(pm, x, labels)
    handle.remove()
    assert len(q_calls) == 2  # forward, then recomputed in backward: checkpointing is on
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-12, atol=0)
    assert grads.keys() == grads_ckpt.keys() and len(grads) == 2 * 5
    for n in grads:
        assert grads[n].abs().sum() > 0, n
        torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=1e-10, atol=1e-14, msg=n)


def test_reentrant_checkpointing_is_refused_with_a_clear_error():
    # a reentrant checkpoint backpropagates through the hook-supplied vectors a second time
    pm = get_para_model(tiny_llama(), PARAConfig(r=4))
    for enable in (pm.gradient_checkpointing_enable, pm.activation_checkpointing_enable):
        with pytest.raises(ValueError, match="use_reentrant"):
            enable({"use_reentrant": True})
    assert not any(layer.gradient_checkpointing for layer in pm.get_base_model().model.layers)


def test_trainer_with_gradient_checkpointing_trains(tmp_path):
    model = tiny_llama()
    pm = get_para_model(model, PARAConfig(r=4))
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": (ids := torch.randint(3, 128, (6,), generator=gen).tolist()),
             "labels": [-100, -100] + ids[2:]} for _ in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], save_strategy="no", use_cpu=True,
                             max_steps=2, per_device_train_batch_size=2, activation_checkpointing=True,
                             disable_tqdm=True)
    result = Trainer(model=pm, args=args, train_dataset=data).train()
    assert result.global_step == 2 and math.isfinite(result.training_loss)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)


# ----------------------------------------------------------------- PARATrainer: adapter checkpoints
def _trainer_run(tmp_path, max_steps, resume=None, **args):
    """A fresh tiny LLaMA + PARA adapter trained by PARATrainer on fixed data; returns
    (trainer, PARA model)."""
    import para_kernels as pk

    pm = get_para_model(tiny_llama(seed=0), PARAConfig(r=4))
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": (ids := torch.randint(3, 128, (6,), generator=gen).tolist()),
             "labels": [-100, -100] + ids[2:]} for _ in range(8)]
    targs = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=max_steps,
                              per_device_train_batch_size=2, learning_rate=1e-2, disable_tqdm=True,
                              save_strategy="steps", save_steps=2, seed=7, **args)
    trainer = pk.PARATrainer(model=pm, args=targs, train_dataset=data)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, pm


def test_para_trainer_checkpoints_hold_the_adapter_only_and_resume_exactly(tmp_path):
    from safetensors.torch import load_file

    _, full = _trainer_run(tmp_path / "a", max_steps=4)
    ckpt = tmp_path / "a" / "checkpoint-2"
    files = sorted(p.name for p in ckpt.iterdir())
    assert "adapter_config.json" in files and "training_args.json" in files  # default: at the root
    assert not any(f.startswith(("model", "pytorch_model")) for f in files), files  # no backbone
    assert not any(f.endswith(".bin") and f != "training_args.bin" for f in files)
    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    assert len(saved) == len(adapter_params(full)) and all(t.numel() < 10_000 for t in saved.values())
    # resuming at step 2 into a fresh model ends where the uninterrupted run ended
    trainer, resumed = _trainer_run(tmp_path / "b", max_steps=4, resume=str(ckpt))
    assert trainer.state.global_step == 4
    final, again = adapter_params(full), adapter_params(resumed)
    assert final.keys() == again.keys()
    for n in final:
        torch.testing.assert_close(again[n], final[n], rtol=1e-6, atol=1e-7, msg=n)
    start = adapter_params(get_para_model(tiny_llama(seed=0), PARAConfig(r=4)))
    assert any(not torch.equal(final[n], start[n]) for n in final)  # training moved the adapter


def test_para_trainer_save_model_and_reload(tmp_path):
    trainer, pm = _trainer_run(tmp_path / "run", max_steps=2)
    trainer.save_model(str(tmp_path / "final"))
    reloaded = PARAModel.from_pretrained(tiny_llama(seed=0), str(tmp_path / "final"))
    x = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(5))
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, pm(input_ids=x).logits, rtol=0, atol=0)


def test_para_trainer_refuses_a_checkpoint_without_the_adapter(tmp_path):
    from para_kernels import AdapterFileError

    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterFileError, match="default"):
        _trainer_run(tmp_path / "run", max_steps=2, resume=str(tmp_path / "empty"))
