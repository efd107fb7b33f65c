"""Fused consumers: q / v as scaled_linear and the gated FFN as scaled_glu give the same model
as projection-then-scale hooks, in training and at decode, and unload restores the forwards."""
import pytest
import torch

import para_kernels
from para_kernels import PARAConfig, get_para_model
from para_kernels.transformers import consumers

from kit.models import randomize_adapter, tiny_llama, tiny_model

# the single_thread fixture: tests/wrapper/conftest.py
pytestmark = pytest.mark.usefixtures("single_thread")


def _spy(monkeypatch, names):
    calls = {n: 0 for n in names}
    for name in names:
        real = getattr(para_kernels.ops, name)

        def spy(*args, _name=name, _real=real, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(para_kernels.ops, name, spy)
    return calls


def _run(pm, ids, mask, labels):
    out = pm(input_ids=ids, attention_mask=mask, labels=labels, prompt_lengths=[3, 2, 4])
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    pm.zero_grad()
    return out.logits.detach(), grads


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3"])
def test_fused_consumers_equal_scale_hooks(monkeypatch, arch):
    model = tiny_model(arch)
    pm = get_para_model(model, PARAConfig(r=4))
    randomize_adapter(pm)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (3, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    labels = ids.masked_fill(mask == 0, -100)
    plain_logits, plain_grads = _run(pm, ids, mask, labels)

    monkeypatch.setattr(consumers, "kernels_run", lambda device: True)  # as on a GPU with kernels
    calls = _spy(monkeypatch, ["scaled_linear", "scaled_glu", "scale"])
    fused_logits, fused_grads = _run(pm, ids, mask, labels)
    n_layers = model.config.num_hidden_layers
    assert calls["scaled_linear"] == 2 * n_layers and calls["scaled_glu"] == n_layers
    assert calls["scale"] == 0, "no separate pass over q, v or up"
    torch.testing.assert_close(fused_logits, plain_logits, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6)


def test_fused_consumers_at_decode(monkeypatch):
    pm = get_para_model(tiny_llama(), PARAConfig(r=4))
    randomize_adapter(pm)
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = pm.generate(ids, max_new_tokens=4, do_sample=False, adapter_names=["default", None])
        monkeypatch.setattr(consumers, "kernels_run", lambda device: True)
        got = pm.generate(ids, max_new_tokens=4, do_sample=False, adapter_names=["default", None])
    assert torch.equal(got, want)


def test_eager_inference_rescales_in_place(monkeypatch):
    """Under no_grad on the reference backend each rescale is one in-place multiply, with no op
    call (the per-token decode path); with autograd on, the checked ops run. Same logits."""
    model = tiny_llama()
    pm = get_para_model(model, PARAConfig(r=4))
    randomize_adapter(pm)
    ids = torch.randint(3, 100, (3, 6), generator=torch.Generator().manual_seed(4))
    names = ["default", None, "default"]
    calls = _spy(monkeypatch, ["scale", "scaled_linear", "scaled_glu"])
    with torch.no_grad():
        fast = pm(input_ids=ids, adapter_names=names).logits
        assert calls == {"scale": 0, "scaled_linear": 0, "scaled_glu": 0}
    checked = pm(input_ids=ids, adapter_names=names).logits
    assert calls["scale"] == 3 * model.config.num_hidden_layers
    torch.testing.assert_close(fast, checked.detach(), rtol=1e-6, atol=1e-6)


def test_unfusable_modules_keep_hooks():
    """GPT-2's fused c_attn and Phi-3's gate_up_proj are rescaled by hooks, not overridden."""
    for arch in ("gpt2", "phi3"):
        model = tiny_model(arch)
        get_para_model(model, PARAConfig(r=4))
        assert not any("forward" in m.__dict__ for m in model.modules()), arch


def test_unload_removes_forward_overrides():
    model = tiny_llama()
    pm = get_para_model(model, PARAConfig(r=4))
    overridden = [m for m in model.modules() if "forward" in m.__dict__]
    assert len(overridden) == 3 * model.config.num_hidden_layers  # q, v, and the gated FFN
    pm.unload()
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.skipif("triton" not in para_kernels.available_backends("cpu") and not torch.cuda.is_available(),
                    reason="Triton can run neither on a GPU nor in its interpreter here")
def test_whole_model_on_the_triton_backend():
    """A mixed batch through every Triton kernel (pool_generate, scaled_linear, scaled_glu) —
    forward and backward — equals the reference backend."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pm = get_para_model(tiny_llama().to(device), PARAConfig(r=4, pooler="attn"))
    pm.add_adapter("b", PARAConfig(r=4, pooler="attn"))
    randomize_adapter(pm)
    randomize_adapter(pm, "b", seed=2)
    ids = torch.randint(3, 100, (3, 6), generator=torch.Generator().manual_seed(3)).to(device)
    results = []
    for backend in ("reference", "triton"):
        para_kernels.set_backend(backend)
        try:
            out = pm(input_ids=ids, labels=ids, prompt_lengths=[2, 3, 4], adapter_names=["default", None, "b"])
            out.loss.backward()
        finally:
            para_kernels.set_backend(None)
        grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
        pm.zero_grad()
        results.append((out.logits.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-3, atol=1e-6)
