"""Mixed precision: autocast (bf16, fp16) and 16-bit backbones train and generate with fp32
generator weights; the scale is applied in the projection's dtype."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainingArguments

import para_kernels.transformers.consumers as consumers
from para_kernels import PARAConfig, get_para_model
from para_kernels.transformers.trainer import PARATrainer

from kit.models import adapter_params, randomize_adapter, tiny_llama, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

# relative loss difference allowed between a 16-bit autocast step and the fp32 step
LOSS_RTOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _batch(seed=0, batch=3, length=10, prompt=4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(3, 128, (batch, length), generator=gen)
    labels = x.clone()
    labels[:, :prompt] = -100
    return x, labels


def _step(pm, x, labels, dtype=None):
    pm.zero_grad(set_to_none=True)
    if dtype is None:
        loss = pm(input_ids=x, labels=labels).loss
    else:
        with torch.autocast("cpu", dtype):
            loss = pm(input_ids=x, labels=labels).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.clone() for n, p in adapter_params(pm).items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # fused GLU / linear consumers, and the scale hook
def test_autocast_step_matches_fp32_and_reaches_the_fp32_generators(arch, dtype):
    model = tiny_llama() if arch == "llama" else tiny_model(arch)
    pm = get_para_model(model, PARAConfig(r=4, pooler="attn"))
    randomize_adapter(pm)  # eval mode (no dropout: GPT-2 has some), gradients on
    x, labels = _batch()
    loss32, grads32 = _step(pm, x, labels)
    loss16, grads16 = _step(pm, x, labels, dtype)
    assert torch.isfinite(loss16)
    assert abs(loss16 - loss32) <= LOSS_RTOL[dtype] * loss32, (float(loss16), float(loss32))
    for name, p in adapter_params(pm).items():
        assert p.dtype == torch.float32, name  # fp32 master weights
        g16, g32 = grads16[name], grads32[name]
        assert g16.dtype == torch.float32 and torch.isfinite(g16).all(), name
        if g32.abs().sum() > 0:
            cos = torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)
            assert cos > 0.98, (name, float(cos))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_backbone_trains_fp32_generators(dtype):
    pm = get_para_model(tiny_llama(dtype=dtype), PARAConfig(r=4))
    randomize_adapter(pm)
    pm.train()
    x, labels = _batch(1)
    loss, grads = _step(pm, x, labels)
    assert torch.isfinite(loss)
    for name, p in adapter_params(pm).items():
        assert p.dtype == torch.float32 and grads[name].dtype == torch.float32, name
        assert torch.isfinite(grads[name]).all(), name
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("w_up"))


def test_generation_under_autocast_keeps_the_prompt_vectors():
    pm = get_para_model(tiny_llama(), PARAConfig(r=4))
    randomize_adapter(pm)
    x = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        cached = pm.generate(x, max_new_tokens=5, do_sample=False)
        uncached = pm.generate(x, max_new_tokens=5, do_sample=False, use_cache=False)
        scores = pm(input_ids=cached).logits
    assert cached.shape == (2, 11) and torch.equal(cached, uncached)
    assert scores.dtype == torch.bfloat16 and torch.isfinite(scores).all()


def test_fused_linear_consumer_under_autocast_runs_in_the_autocast_dtype(monkeypatch):
    # on a GPU the q / v projections run as para::scaled_linear; force that path on the CPU
    pm = get_para_model(tiny_llama(), PARAConfig(r=4))
    randomize_adapter(pm)
    pm.train()
    x, labels = _batch(3)
    hooked, grads_hooked = _step(pm, x, labels, torch.bfloat16)
    monkeypatch.setattr(consumers, "kernels_run", lambda device: True)
    fused, grads_fused = _step(pm, x, labels, torch.bfloat16)
    torch.testing.assert_close(fused, hooked, rtol=2e-2, atol=0)
    for name in grads_hooked:
        cos = torch.nn.functional.cosine_similarity(grads_fused[name].flatten(), grads_hooked[name].flatten(), dim=0)
        assert grads_fused[name].abs().sum() == 0 or cos > 0.98, name


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_para_trainer_with_16bit_mixed_precision(tmp_path, precision):
    pm = get_para_model(tiny_llama(seed=0, initializer_range=0.3), PARAConfig(r=4))
    start = {n: p.detach().clone() for n, p in adapter_params(pm).items()}
    data = []
    for i in range(8):
        x, labels = _batch(10 + i, batch=1)
        data.append({"input_ids": x[0].tolist(), "labels": labels[0].tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], save_strategy="no", use_cpu=True, max_steps=3,
                             per_device_train_batch_size=2, learning_rate=1e-2, disable_tqdm=True,
                             dataloader_num_workers=0, **{precision: True})
    result = PARATrainer(model=pm, args=args, train_dataset=data).train()
    assert result.global_step == 3 and math.isfinite(result.training_loss)
    params = adapter_params(pm)
    assert all(p.dtype == torch.float32 for p in params.values())
    assert any(not torch.equal(p, start[n]) for n, p in params.items() if n.endswith("w_up"))
