"""The PEFT-style API of PARAModel: freezing, parameter counts, adapter management,
disable_adapter, attribute proxying, config validation and every pooler / activation."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import para_kernels
from para_kernels import MappingError, PARAConfig, get_para_model
from para_kernels.ops.activations import RATIONAL_NUM_PARAMS

from kit.models import HIDDEN, adapter_params, n_outputs, randomize_adapter, tiny_llama

# the single_thread fixture: tests/wrapper/conftest.py
pytestmark = pytest.mark.usefixtures("single_thread")

POOLERS = ("last", "mean", "max", "attn")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "identity", "rational")


def _batch(seed: int = 5, batch: int = 2, length: int = 7):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=gen)


def expected_count(r: int, pooler: str = "last", activation: str = "gelu", targets=("q", "v", "up"),
                   layers: int = 2, d: int = HIDDEN) -> int:
    n = n_outputs(targets)
    per_layer = d * r + r + r * n + n
    per_layer += d if pooler == "attn" else 0
    per_layer += RATIONAL_NUM_PARAMS if activation == "rational" else 0
    return layers * per_layer


# ---------------------------------------------------------------- freezing and counting
def test_get_para_model_freezes_backbone_and_trains_only_the_generator():
    model = tiny_llama()
    base_names = {n for n, _ in model.named_parameters()}
    pm = get_para_model(model, PARAConfig(r=4))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_params(pm, "default"))
    assert trainable and all(".para_generator." in n for n in trainable)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in base_names)


@pytest.mark.parametrize("pooler,activation", [("last", "gelu"), ("attn", "gelu"), ("mean", "rational"),
                                               ("attn", "rational")])
def test_print_trainable_parameters_counts_generator_weights(capsys, pooler, activation):
    model = tiny_llama()
    total_base = sum(p.numel() for p in model.parameters())
    pm = get_para_model(model, PARAConfig(r=5, pooler=pooler, activation=activation))
    want = expected_count(5, pooler, activation)
    assert RATIONAL_NUM_PARAMS == 10
    assert pm.get_nb_trainable_parameters() == (want, total_base + want)
    pm.print_trainable_parameters()
    out = capsys.readouterr().out
    assert f"trainable params: {want:,} " in out
    assert f"all params: {total_base + want:,} " in out


def test_parameter_count_with_q_v_targets_and_one_layer():
    pm = get_para_model(tiny_llama(), PARAConfig(r=3, targets=("v", "q"), layers_to_transform=[1]))
    assert pm.peft_config["default"].targets == ("q", "v")  # normalised to the generator's order
    assert pm.get_nb_trainable_parameters()[0] == expected_count(3, targets=("q", "v"), layers=1)


# ---------------------------------------------------------------- adapters
def _requires_grad(pm, name):
    flags = {p.requires_grad for p in adapter_params(pm, name).values()}
    assert len(flags) == 1, f"adapter {name} is partly trainable"
    return flags.pop()


def test_add_adapter_is_resident_but_inactive_and_frozen():
    pm = get_para_model(tiny_llama(), PARAConfig(r=4))
    pm.add_adapter("other", PARAConfig(r=2, pooler="mean"))
    assert set(pm.peft_config) == {"default", "other"}
    assert pm.active_adapter == "default"
    assert _requires_grad(pm, "default") and not _requires_grad(pm, "other")
    assert adapter_params(pm, "other")  # its weights exist in the generators
    with pytest.raises(ValueError, match="other"):
        pm.add_adapter("other", PARAConfig(r=2))


def test_set_adapter_moves_trainability_and_routing():
    model = tiny_llama()
    x = _batch()
    pm = get_para_model(model, PARAConfig(r=4))
    pm.add_adapter("other", PARAConfig(r=4))
    randomize_adapter(pm, "default", seed=1)
    randomize_adapter(pm, "other", seed=2)
    with torch.no_grad():
        out_default = pm(input_ids=x).logits
        pm.set_adapter("other")
        out_other = pm(input_ids=x).logits
        routed = pm(input_ids=x, adapter_names=["default", "default"]).logits
    assert pm.active_adapter == "other"
    assert _requires_grad(pm, "other") and not _requires_grad(pm, "default")
    assert not torch.allclose(out_default, out_other)
    torch.testing.assert_close(routed, out_default, rtol=0, atol=1e-6)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_params(pm, "other"))


def test_delete_active_adapter_falls_back_and_removes_weights():
    model = tiny_llama()
    x = _batch()
    with torch.no_grad():
        base = model(input_ids=x).logits
    pm = get_para_model(model, PARAConfig(r=4))
    pm.add_adapter("second", PARAConfig(r=4))
    randomize_adapter(pm, "default")
    pm.delete_adapter("default")
    assert "default" not in pm.peft_config and not adapter_params(pm, "default")
    assert pm.active_adapter == "second" and _requires_grad(pm, "second")
    pm.delete_adapter("second")
    assert pm.active_adapter is None and pm.peft_config == {}
    assert not any(p.requires_grad for p in pm.parameters())
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=x).logits, base, rtol=0, atol=0)


@pytest.mark.parametrize("call", ["set_adapter", "delete_adapter", "forward", "save_pretrained"])
def test_unknown_adapter_name_raises_value_error_naming_it(call, tmp_path):
    pm = get_para_model(tiny_llama(), PARAConfig(r=4))
    with pytest.raises(ValueError, match="no_such_adapter"):
        if call == "set_adapter":
            pm.set_adapter("no_such_adapter")
        elif call == "delete_adapter":
            pm.delete_adapter("no_such_adapter")
        elif call == "forward":
            pm(input_ids=_batch(), adapter_names=["default", "no_such_adapter"])
        else:
            pm.save_pretrained(str(tmp_path), selected_adapters=["no_such_adapter"])
    assert pm.active_adapter == "default" and set(pm.peft_config) == {"default"}


@pytest.mark.parametrize("name", ["", "a.b", "a/b", 3])
def test_bad_adapter_name_is_refused(name):
    pm = get_para_model(tiny_llama(), PARAConfig(r=4))
    with pytest.raises(ValueError):
        pm.add_adapter(name, PARAConfig(r=4))
    assert set(pm.peft_config) == {"default"}


def test_disable_adapter_gives_the_backbone():
    model = tiny_llama()
    x = _batch()
    with torch.no_grad():
        base = model(input_ids=x).logits
    pm = get_para_model(model, PARAConfig(r=4))
    randomize_adapter(pm)
    with torch.no_grad():
        adjusted = pm(input_ids=x).logits
        with pm.disable_adapter():
            disabled = pm(input_ids=x).logits
        again = pm(input_ids=x).logits
    assert not torch.allclose(adjusted, base, atol=1e-4)
    torch.testing.assert_close(disabled, base, rtol=0, atol=0)
    torch.testing.assert_close(again, adjusted, rtol=0, atol=0)


def test_untrained_adapter_equals_backbone():
    model = tiny_llama()
    x = _batch()
    with torch.no_grad():
        base = model(input_ids=x).logits
        pm = get_para_model(model, PARAConfig(r=4))
        torch.testing.assert_close(pm(input_ids=x).logits, base, rtol=0, atol=0)


def test_getattr_proxies_to_the_wrapped_model():
    model = tiny_llama()
    pm = get_para_model(model, PARAConfig(r=4))
    assert pm.config is model.config
    assert pm.config.hidden_size == HIDDEN
    assert pm.generation_config is model.generation_config
    assert pm.get_input_embeddings() is model.get_input_embeddings()
    with pytest.raises(AttributeError):
        _ = pm.this_attribute_does_not_exist


def test_wrapping_twice_is_refused():
    model = tiny_llama()
    get_para_model(model, PARAConfig(r=4))
    with pytest.raises(ValueError, match="already"):
        get_para_model(model, PARAConfig(r=4))


# ---------------------------------------------------------------- config validation
@pytest.mark.parametrize("kwargs,field", [
    ({"r": 0}, "r"), ({"r": -3}, "r"), ({"r": 2.5}, "r"), ({"r": True}, "r"),
    ({"pooler": "sum"}, "pooler"), ({"activation": "softplus"}, "activation"),
    ({"targets": ("k",)}, "targets"), ({"targets": ()}, "targets"), ({"targets": ("q", "q")}, "targets"),
    ({"targets": ("gate", "up")}, "targets"),
    ({"target_modules": {"q": "self_attn.q_proj"}}, "target_modules"),
    ({"targets": ("q",), "target_modules": {"q": "self_attn.q_proj", "v": "self_attn.v_proj"}}, "target_modules"),
    ({"target_modules": ["self_attn.q_proj"]}, "target_modules"),
    ({"pool_input": "output"}, "pool_input"),
    ({"layers_to_transform": [-1]}, "layers_to_transform"), ({"layers_to_transform": []}, "layers_to_transform"),
    ({"init_scale": 0.0}, "init_scale"),
])
def test_para_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PARAConfig(**kwargs)


def test_para_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="lora_alpha"):
        PARAConfig.from_dict({"r": 4, "lora_alpha": 16})
    assert PARAConfig.from_dict(PARAConfig(r=4, pooler="attn").to_dict()) == PARAConfig(r=4, pooler="attn")


@pytest.mark.parametrize("kwargs", [
    {"layers_to_transform": [2]},
    {"target_modules": {"q": "self_attn.no_such_proj", "v": "self_attn.v_proj", "up": "mlp.up_proj"}},
    {"target_modules": {"q": "self_attn", "v": "self_attn.v_proj", "up": "mlp.up_proj"}},
    {"layers_path": "model.norm"},
])
def test_configs_that_do_not_fit_the_model_raise_mapping_error(kwargs):
    model = tiny_llama()
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    with pytest.raises(MappingError):
        get_para_model(model, PARAConfig(r=4, **kwargs))
    # a failed wrap leaves the model as it was: trainable, no hooks, no generators
    assert all(p.requires_grad for p in model.parameters())
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks
    assert not any(hasattr(m, "para_generator") for m in model.modules())
    get_para_model(model, PARAConfig(r=4))


# ---------------------------------------------------------------- where the scales land
def _capture_linear_io(model, paths):
    """Record (input, output) of each named Linear; hooks registered after PARA's see the scaled output."""
    seen, handles = {}, []
    for path in paths:
        module = model.get_submodule(path)

        def hook(mod, args, output, path=path):
            seen[path] = (args[0].detach(), output.detach())
        handles.append(module.register_forward_hook(hook))
    return seen, handles


def _is_scaled(seen, model, path):
    x, y = seen[path]
    plain = F.linear(x, model.get_submodule(path).weight)
    if not torch.allclose(y, plain, atol=1e-6):
        return True
    if path.endswith("mlp.up_proj"):  # a fused consumer scales up inside the FFN's product
        mlp = model.get_submodule(path.rsplit(".", 1)[0])
        gate, product = seen[path.replace("up_proj", "gate_proj")][1], seen[path.replace("up_proj", "down_proj")][0]
        return not torch.allclose(product, mlp.act_fn(gate) * y, atol=1e-6)
    return False


PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj", "self_attn.o_proj")


@pytest.mark.parametrize("targets,layers", [(("q", "v", "up"), None), (("q", "v"), None), (("up",), [1])])
def test_only_targeted_projections_of_transformed_layers_are_rescaled(targets, layers):
    model = tiny_llama()
    pm = get_para_model(model, PARAConfig(r=4, targets=targets, layers_to_transform=layers))
    randomize_adapter(pm)
    names = {"q": "self_attn.q_proj", "v": "self_attn.v_proj", "up": "mlp.up_proj"}
    paths = [f"model.layers.{i}.{p}" for i in range(2) for p in PROJ]
    seen, handles = _capture_linear_io(model, paths)
    with torch.no_grad():
        pm(input_ids=_batch())
    for h in handles:
        h.remove()
    for i in range(2):
        active = layers is None or i in layers
        for p in PROJ:
            want = active and p in {names[t] for t in targets}
            assert _is_scaled(seen, model, f"model.layers.{i}.{p}") == want, (i, p)


def test_explicit_target_modules_equal_the_found_ones():
    x = _batch()
    outs = []
    for target_modules in (None, {"q": "self_attn.q_proj", "v": "self_attn.v_proj", "up": "mlp.up_proj"}):
        pm = get_para_model(tiny_llama(), PARAConfig(r=4, target_modules=target_modules))
        randomize_adapter(pm)
        with torch.no_grad():
            outs.append(pm(input_ids=x).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize("pool_input", ["residual", "normed"])
def test_pool_input_selects_residual_or_normed_stream(monkeypatch, pool_input):
    model = tiny_llama()
    pm = get_para_model(model, PARAConfig(r=4, pooler="mean", pool_input=pool_input))
    randomize_adapter(pm)
    pooled_inputs = []
    real_pool = para_kernels.ops.pool_generate

    def spy(hidden, *args, **kwargs):
        pooled_inputs.append(hidden.detach().clone())
        return real_pool(hidden, *args, **kwargs)
    monkeypatch.setattr(para_kernels.ops, "pool_generate", spy)
    streams = {"residual": [], "normed": []}
    handles = []
    for layer in model.model.layers:
        handles.append(layer.register_forward_pre_hook(
            lambda m, args, kwargs: streams["residual"].append(
                (args[0] if args else kwargs["hidden_states"]).detach().clone()), with_kwargs=True))
        handles.append(layer.input_layernorm.register_forward_hook(
            lambda m, args, out: streams["normed"].append(out.detach().clone())))
    with torch.no_grad():
        pm(input_ids=_batch())
    for h in handles:
        h.remove()
    assert len(pooled_inputs) == 2
    other = "normed" if pool_input == "residual" else "residual"
    for got, want, wrong in zip(pooled_inputs, streams[pool_input], streams[other]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert not torch.allclose(got, wrong)


# ---------------------------------------------------------------- every pooler and activation
@pytest.mark.parametrize("pooler,activation", list(itertools.product(POOLERS, ACTIVATIONS)))
def test_every_pooler_and_activation_trains_end_to_end(pooler, activation):
    model = tiny_llama()
    pm = get_para_model(model, PARAConfig(r=4, pooler=pooler, activation=activation))
    randomize_adapter(pm, seed=3)
    with torch.no_grad():  # keep relu units alive: the pooled states are small next to b_down
        for n, p in adapter_params(pm).items():
            if n.endswith("b_down"):
                p.abs_()
    x = _batch(length=9)
    labels = x.clone()
    labels[:, :4] = -100
    out = pm(input_ids=x, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    params = adapter_params(pm)
    names = ["w_down", "b_down", "w_up", "b_up"] + (["w_sa"] if pooler == "attn" else []) \
        + (["act_params"] if activation == "rational" else [])
    kinds = {n.rsplit(".", 1)[-1] for n in params}
    assert kinds == set(names)
    for n, p in params.items():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
        if n.endswith(("w_down", "w_up", "w_sa", "act_params")):
            assert p.grad.abs().sum() > 0, n
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_backbone_gets_fp32_generators_with_finite_grads(dtype):
    model = tiny_llama(dtype=dtype)
    pm = get_para_model(model, PARAConfig(r=4, pooler="attn"))
    randomize_adapter(pm)
    x = _batch()
    labels = x.clone()
    labels[:, :3] = -100
    out = pm(input_ids=x, labels=labels)
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    out.loss.backward()
    for n, p in adapter_params(pm).items():
        assert p.dtype == torch.float32, n
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
