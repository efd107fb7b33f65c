"""PEFT parity (issue 16): PEFT's folder layout and flat adapter_config.json, Hub ids (offline,
against a cache folder the test fills), push_to_hub (intercepted: nothing is sent), the
PeftModel surface, add_weighted_adapter's exactness, and a wrapper that refuses calls after
unload()."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import para_kernels as pk
from para_kernels import AdapterFileError, PARAConfig, PARAModel, UnloadedError, get_para_model
from para_kernels.transformers import io as para_io

from kit.models import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_params,
    logits_of,
    randomize_adapter,
    tiny_llama,
    token_ids,
)

# the single_thread fixture: tests/wrapper/conftest.py
pytestmark = pytest.mark.usefixtures("single_thread")

def _default_and_extra(model=None):
    pm = get_para_model(model if model is not None else tiny_llama(), PARAConfig(r=4))
    pm.add_adapter("extra", PARAConfig(r=3, pooler="attn", activation="rational", targets=("q", "up")))
    randomize_adapter(pm, "default", seed=1)
    randomize_adapter(pm, "extra", seed=2)
    return pm


# ---------------------------------------------------------------- layout and config file
def test_default_adapter_at_the_root_others_in_subfolders(tmp_path):
    pm = _default_and_extra()
    pm.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, "extra"])
    assert sorted(os.listdir(tmp_path / "extra")) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]


def test_adapter_config_is_flat_with_peft_fields(tmp_path):
    pm = _default_and_extra()
    pm.save_pretrained(str(tmp_path))
    doc = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert "config" not in doc  # flat, not nested
    assert doc["peft_type"] == "PARA" and doc["task_type"] == "CAUSAL_LM"
    assert doc["inference_mode"] is True  # as PEFT writes it
    assert "revision" in doc and "base_model_name_or_path" in doc
    assert doc["para_kernels_version"] == pk.__version__
    assert doc["r"] == 4 and doc["pooler"] == "last" and doc["targets"] == ["q", "v", "up"]
    extra = json.loads((tmp_path / "extra" / ADAPTER_CONFIG).read_text())
    assert extra["pooler"] == "attn" and extra["r"] == 3
    # the saved config reads back equal; the live one is not changed by saving
    assert PARAConfig.from_pretrained(str(tmp_path)) == pm.peft_config["default"]
    assert PARAConfig.from_pretrained(str(tmp_path), adapter_name="extra") == pm.peft_config["extra"]
    assert pm.peft_config["default"].inference_mode is False


def test_peft_config_readers_parse_the_folder(tmp_path):
    """What PEFT's PeftConfig.from_pretrained reads first: the JSON and its peft_type; PEFT's base
    fields build a peft.PeftConfig."""
    peft = pytest.importorskip("peft")
    get_para_model(tiny_llama(), PARAConfig(r=4)).save_pretrained(str(tmp_path))
    assert peft.PeftConfig._get_peft_type(str(tmp_path)) == "PARA"
    doc = peft.PeftConfig.from_json_file(str(tmp_path / ADAPTER_CONFIG))
    base_fields = ("base_model_name_or_path", "revision", "task_type", "inference_mode")
    config = peft.PeftConfig(**{k: doc[k] for k in base_fields})
    assert config.task_type == "CAUSAL_LM" and config.inference_mode is True


def test_base_model_name_is_filled_from_the_model(tmp_path):
    tiny_llama().save_pretrained(str(tmp_path / "backbone"))
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "backbone"))
    get_para_model(model, PARAConfig(r=4), revision="v3").save_pretrained(str(tmp_path / "adapter"))
    doc = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert (doc["base_model_name_or_path"], doc["revision"]) == (str(tmp_path / "backbone"), "v3")
    # a model built from a config has no name: null (never ""), and an explicit name wins
    get_para_model(tiny_llama(), PARAConfig(r=4)).save_pretrained(str(tmp_path / "nameless"))
    assert json.loads((tmp_path / "nameless" / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] is None
    named = PARAConfig(r=4, base_model_name_or_path="org/base", revision="v1")
    get_para_model(tiny_llama(), named).save_pretrained(str(tmp_path / "named"))
    doc = json.loads((tmp_path / "named" / ADAPTER_CONFIG).read_text())
    assert (doc["base_model_name_or_path"], doc["revision"]) == ("org/base", "v1")


def test_loaded_adapter_reads_inference_mode_from_is_trainable(tmp_path):
    _default_and_extra().save_pretrained(str(tmp_path))
    frozen = PARAModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert frozen.peft_config["default"].inference_mode is True
    trainable = PARAModel.from_pretrained(tiny_llama(), str(tmp_path), is_trainable=True)
    assert trainable.peft_config["default"].inference_mode is False


def _write_first_layout(pm, folder, name):
    """The first layout by hand: folder/<name>/, settings nested under "config"."""
    from safetensors.torch import save_file
    target = folder / name
    target.mkdir(parents=True)
    tensors = {k: p.detach().clone().contiguous() for k, p in pm._adapter_tensors(name).items()}
    save_file(tensors, str(target / ADAPTER_WEIGHTS),
              metadata={"format": "pt", "para_format": para_io.FORMAT, "sha256": para_io._digest(tensors)})
    config = pm.peft_config[name].to_dict()
    for key in ("revision", "task_type", "inference_mode", "modules_to_save"):  # fields the first layout lacked
        config.pop(key)
    doc = {"format": para_io.FORMAT, "para_kernels_version": "0.1.0", "model_type": "llama", "hidden_size": 32,
           "num_layers": 2, "generator_outputs": 112, "base_model_name_or_path": None, "config": config}
    (target / ADAPTER_CONFIG).write_text(json.dumps(doc))


def test_first_layout_folders_still_load_exactly(tmp_path):
    pm = _default_and_extra()
    _write_first_layout(pm, tmp_path, "default")
    _write_first_layout(pm, tmp_path, "extra")
    want_default, want_extra = logits_of(pm), logits_of(pm, adapter_names=["extra", "extra"])
    loaded = PARAModel.from_pretrained(tiny_llama(), str(tmp_path))
    loaded.load_adapter(str(tmp_path), adapter_name="extra")
    assert loaded.peft_config["extra"] == pm.peft_config["extra"]
    assert torch.equal(logits_of(loaded), want_default)
    assert torch.equal(logits_of(loaded, adapter_names=["extra", "extra"]), want_extra)
    doc = json.loads((tmp_path / "default" / ADAPTER_CONFIG).read_text())
    doc["config"]["lora_alpha"] = 16  # the first layout is still checked field by field
    (tmp_path / "default" / ADAPTER_CONFIG).write_text(json.dumps(doc))
    with pytest.raises(AdapterFileError, match="lora_alpha"):
        PARAModel.from_pretrained(tiny_llama(), str(tmp_path))


def test_another_peft_type_is_refused_with_its_name(tmp_path):
    get_para_model(tiny_llama(), PARAConfig(r=4)).save_pretrained(str(tmp_path))
    doc = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({**doc, "peft_type": "LORA"}))
    with pytest.raises(AdapterFileError, match="LORA"):
        PARAModel.from_pretrained(tiny_llama(), str(tmp_path))


def test_subfolder_argument_as_in_peft(tmp_path):
    pm = _default_and_extra()
    pm.save_pretrained(str(tmp_path / "run"))
    loaded = PARAModel.from_pretrained(tiny_llama(), str(tmp_path), subfolder="run")
    assert torch.equal(logits_of(loaded), logits_of(pm))


# ---------------------------------------------------------------- save_pretrained arguments
def test_is_main_process_false_writes_nothing(tmp_path):
    get_para_model(tiny_llama(), PARAConfig(r=4)).save_pretrained(str(tmp_path / "out"), is_main_process=False)
    assert not (tmp_path / "out").exists()


def test_pickled_serialization_and_unknown_arguments_are_refused(tmp_path):
    pm = get_para_model(tiny_llama(), PARAConfig(r=4))
    with pytest.raises(ValueError, match="safetensors only"):
        pm.save_pretrained(str(tmp_path), safe_serialization=False)
    with pytest.raises(TypeError, match="save_embedding_layers"):
        pm.save_pretrained(str(tmp_path), save_embedding_layers=True)
    assert not os.listdir(tmp_path)
    pm.save_pretrained(str(tmp_path), safe_serialization=True)
    assert (tmp_path / ADAPTER_WEIGHTS).is_file()


# ---------------------------------------------------------------- Hub ids, offline
COMMIT_MAIN, COMMIT_V2 = "a" * 40, "b" * 40


def _fill_hub_cache(cache, repo_id, folder, commit=COMMIT_MAIN, ref="main"):
    """huggingface_hub's cache layout: models--org--name/{refs/<ref>, snapshots/<commit>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hub cache in tmp_path, offline (HF_HUB_OFFLINE), as huggingface_hub's default cache."""
    import huggingface_hub.constants as constants
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: patch the constants too
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_loads_from_the_offline_cache(tmp_path, offline_hub):
    pm = _default_and_extra()
    pm.save_pretrained(str(tmp_path / "src"))
    _fill_hub_cache(offline_hub, "org/para-adapter", tmp_path / "src")
    loaded = PARAModel.from_pretrained(tiny_llama(), "org/para-adapter")
    loaded.load_adapter("org/para-adapter", adapter_name="extra", cache_dir=str(offline_hub), local_files_only=True)
    assert torch.equal(logits_of(loaded), logits_of(pm))
    assert torch.equal(logits_of(loaded, adapter_names=["extra"] * 2), logits_of(pm, adapter_names=["extra"] * 2))
    assert PARAConfig.from_pretrained("org/para-adapter", adapter_name="extra") == pm.peft_config["extra"]


def test_hub_revision_selects_the_snapshot(tmp_path, offline_hub):
    first, second = _default_and_extra(), _default_and_extra()
    randomize_adapter(second, "default", seed=9)
    first.save_pretrained(str(tmp_path / "v1"))
    second.save_pretrained(str(tmp_path / "v2"))
    _fill_hub_cache(offline_hub, "org/para-adapter", tmp_path / "v1", COMMIT_MAIN, "main")
    _fill_hub_cache(offline_hub, "org/para-adapter", tmp_path / "v2", COMMIT_V2, "v2")
    main = PARAModel.from_pretrained(tiny_llama(), "org/para-adapter")
    v2 = PARAModel.from_pretrained(tiny_llama(), "org/para-adapter", revision="v2")
    assert torch.equal(logits_of(main), logits_of(first))
    assert torch.equal(logits_of(v2), logits_of(second))
    assert not torch.equal(logits_of(v2), logits_of(first))


def test_hub_id_not_in_the_offline_cache_raises_adapter_file_error(offline_hub):
    model = tiny_llama()
    with pytest.raises(AdapterFileError, match="org/missing"):
        PARAModel.from_pretrained(model, "org/missing")
    assert not any(hasattr(m, "para_generator") for m in model.modules())
    with pytest.raises(AdapterFileError, match="no PARA adapter"):
        PARAConfig.from_pretrained("not a repo id!")


def test_auto_model_loads_the_backbone_named_in_the_adapter(tmp_path, offline_hub):
    backbone = tiny_llama(seed=4)
    backbone.save_pretrained(str(tmp_path / "base_src"))
    _fill_hub_cache(offline_hub, "org/tiny-base", tmp_path / "base_src")
    pm = get_para_model(backbone, PARAConfig(r=4, base_model_name_or_path="org/tiny-base"))
    randomize_adapter(pm)
    want = logits_of(pm)
    pm.save_pretrained(str(tmp_path / "adapter_src"))
    _fill_hub_cache(offline_hub, "org/para-adapter", tmp_path / "adapter_src")
    loaded = pk.AutoPARAModelForCausalLM.from_pretrained("org/para-adapter", cache_dir=str(offline_hub))
    assert isinstance(loaded, PARAModel) and loaded is not pm
    torch.testing.assert_close(logits_of(loaded), want, rtol=0, atol=1e-6)


def test_auto_model_without_a_base_model_name_says_so(tmp_path):
    get_para_model(tiny_llama(), PARAConfig(r=4)).save_pretrained(str(tmp_path))
    with pytest.raises(AdapterFileError, match="base_model_name_or_path"):
        pk.AutoPARAModelForCausalLM.from_pretrained(str(tmp_path))


def test_push_to_hub_uploads_the_adapter_folder_only(monkeypatch):
    import huggingface_hub
    sent = {}

    def create_repo(self, repo_id, **kwargs):
        sent["create_repo"] = (repo_id, kwargs)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        sent["upload"] = (repo_id, kwargs)
        sent["files"] = sorted(os.path.relpath(os.path.join(d, f), folder_path)
                               for d, _, files in os.walk(folder_path) for f in files)
        sent["bytes"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder_path) for f in files)
        return "commit-info"
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = tiny_llama()
    pm = _default_and_extra(model)
    assert pm.push_to_hub("me/para-adapter", private=True) == "commit-info"
    assert sent["create_repo"][0] == "me/para-adapter" and sent["create_repo"][1]["private"] is True
    assert sent["upload"][0] == "me/para-adapter"
    assert sent["files"] == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS,
                                    f"extra/{ADAPTER_CONFIG}", f"extra/{ADAPTER_WEIGHTS}"])
    backbone_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    assert sent["bytes"] < backbone_bytes / 4  # the adapters, not the backbone
    sent.clear()
    pm.push_to_hub("me/para-adapter", selected_adapters=["extra"])
    assert sent["files"] == [f"extra/{ADAPTER_CONFIG}", f"extra/{ADAPTER_WEIGHTS}"]


# ---------------------------------------------------------------- the PeftModel surface
def test_get_base_model_and_active_adapters():
    model = tiny_llama()
    pm = get_para_model(model, PARAConfig(r=4))
    assert pm.get_base_model() is model
    assert pm.active_adapters == ["default"]
    pm.add_adapter("b", PARAConfig(r=2))
    pm.set_adapter("b")
    assert pm.active_adapters == ["b"]
    pm.delete_adapter("b")
    pm.delete_adapter("default")
    assert pm.active_adapters == []


def test_set_adapter_with_a_list():
    pm = get_para_model(tiny_llama(), PARAConfig(r=4))
    pm.add_adapter("b", PARAConfig(r=2))
    pm.set_adapter(["b"])  # one name in a list: that adapter
    assert pm.active_adapter == "b"
    with pytest.raises(ValueError, match="adapter_names") as info:
        pm.set_adapter(["default", "b"])
    assert "add_weighted_adapter" in str(info.value)
    assert pm.active_adapter == "b"


def test_set_adapter_inference_mode_freezes_it():
    pm = get_para_model(tiny_llama(), PARAConfig(r=4))
    pm.set_adapter("default", inference_mode=True)
    assert pm.get_nb_trainable_parameters()[0] == 0
    pm.set_adapter("default")
    assert all(p.requires_grad for p in adapter_params(pm).values())
    frozen = get_para_model(tiny_llama(), PARAConfig(r=4, inference_mode=True))
    assert frozen.get_nb_trainable_parameters()[0] == 0


def test_base_row_name_equals_none():
    pm = _default_and_extra()
    torch.testing.assert_close(logits_of(pm, adapter_names=["__base__", "extra"]),
                               logits_of(pm, adapter_names=[None, "extra"]), rtol=0, atol=0)
    with pm.disable_adapter():
        bare = logits_of(pm)
    assert torch.equal(logits_of(pm, adapter_names=["__base__", "__base__"]), bare)
    with pytest.raises(ValueError, match="reserved"):
        pm.add_adapter("__base__", PARAConfig(r=2))


def test_merge_and_unload_explains_why_not():
    pm = get_para_model(tiny_llama(), PARAConfig(r=4))
    for call in (pm.merge_and_unload, pm.merge_adapter):
        with pytest.raises(NotImplementedError) as info:
            call()
        message = str(info.value)
        assert "prompt" in message and "unload()" in message and "LlamaForCausalLM" not in message
    assert pm.active_adapter == "default"  # nothing happened


def test_layer_and_model_status():
    pm = get_para_model(tiny_llama(), PARAConfig(r=4, layers_to_transform=[1]))
    pm.add_adapter("b", PARAConfig(r=2, targets=("up",), layers_to_transform=[1]))
    layers = pm.get_layer_status()
    assert [s.name for s in layers] == ["model.layers.1"]  # only the transformed layer
    layer = layers[0]
    assert layer.active_adapters == ["default"] and layer.available_adapters == ["b", "default"]
    assert layer.requires_grad == {"b": False, "default": True} and layer.devices["default"] == ["cpu"]
    assert layer.merged_adapters == [] and layer.enabled
    assert layer.scaled_modules == ["mlp.up_proj", "self_attn.q_proj", "self_attn.v_proj"]
    status = pm.get_model_status()
    assert status.num_adapter_layers == 1 and status.peft_types == {"default": "PARA", "b": "PARA"}
    assert status.base_model_type == "LlamaForCausalLM" and status.active_adapters == ["default"]
    assert (status.trainable_params, status.total_params) == pm.get_nb_trainable_parameters()
    with pm.disable_adapter():
        assert not pm.get_model_status().enabled


# ---------------------------------------------------------------- unload and the backbone's own files
def test_unloaded_wrapper_refuses_every_call():
    model = tiny_llama()
    pm = get_para_model(model, PARAConfig(r=4))
    base = pm.unload()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for call in (lambda: pm.add_adapter("b", PARAConfig(r=2)), lambda: pm.set_adapter("default"),
                 lambda: pm(input_ids=token_ids()), lambda: pm.generate(input_ids=token_ids(), max_new_tokens=2),
                 lambda: pm.save_pretrained("never"), pm.unload, pm.get_base_model, pm.get_layer_status):
        with pytest.raises(UnloadedError, match="unloaded"):
            call()
    with pytest.raises(AttributeError, match="unloaded"):
        _ = pm.config  # no fall-through to the backbone
    assert not any(hasattr(m, "para_generator") for m in base.modules())
    assert base.state_dict().keys() == state.keys()
    get_para_model(base, PARAConfig(r=2))  # the backbone itself can be wrapped again


def test_backbone_save_pretrained_holds_no_generator_tensors(tmp_path):
    from transformers import AutoModelForCausalLM
    pm = _default_and_extra()
    pm.get_base_model().save_pretrained(str(tmp_path))
    reloaded, info = AutoModelForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    with torch.no_grad(), pm.disable_adapter():
        bare = pm(input_ids=token_ids()).logits
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=token_ids()).logits, bare)


# ---------------------------------------------------------------- add_weighted_adapter
def _vectors(pm, rows):
    """{module index: [rows, n] scale} of one forward with ``rows`` (an adapter per row)."""
    from transformers import DynamicCache
    ids = token_ids(batch=1).repeat(len(rows), 1)
    cache = DynamicCache()
    with torch.no_grad():
        pm(input_ids=ids, adapter_names=rows, cache=cache, use_cache=True)
    return dict(pm.request_state(cache).vectors())


def _generator_outputs(pm, name, hidden):
    """[layer] -> v [B, N] of adapter ``name``'s generator on the same ``hidden`` [B, T, d] in
    every layer (the forward's own call, pool_generate, with the whole row as the prompt)."""
    from para_kernels import ops
    config, batch, length = pm.peft_config[name], hidden.shape[0], hidden.shape[1]
    ids = torch.zeros(batch, dtype=torch.long)
    start, end = torch.zeros(batch, dtype=torch.long), torch.full((batch,), length, dtype=torch.long)
    out = []
    for layer in pm._layers:
        bank = layer.para_generator.bank([name])
        w_sa = bank["w_sa"][ids] if "w_sa" in bank else None
        out.append(ops.pool_generate(hidden, start, end, config.pooler, w_sa, bank["w_down"], bank["b_down"],
                                     bank["w_up"], bank["b_up"], ids, config.activation, bank.get("act_params")))
    return out


@pytest.mark.parametrize("pooler,activation", [("last", "gelu"), ("mean", "silu"), ("max", "tanh"),
                                               ("attn", "relu"), ("last", "rational")])
def test_weighted_adapter_is_exactly_the_weighted_sum_of_the_vectors(pooler, activation):
    pm = get_para_model(tiny_llama(dtype=torch.float64), PARAConfig(r=3, pooler=pooler, activation=activation))
    pm.add_adapter("b", PARAConfig(r=5, pooler=pooler, activation=activation))
    randomize_adapter(pm, "default", seed=1)
    randomize_adapter(pm, "b", seed=2)
    with torch.no_grad():  # the shared weights must be equal for exactness: make them so
        for (_, wa), (_, wb) in zip(pm._adapter_weights("default"), pm._adapter_weights("b")):
            for shared in ("w_sa", "act_params"):
                if hasattr(wa, shared):
                    getattr(wb, shared).copy_(getattr(wa, shared))
    weights = (0.7, -0.4)
    pm.add_weighted_adapter(["default", "b"], weights, "mix")
    assert pm.peft_config["mix"].r == 8 and pm.active_adapter == "default"
    # every layer's generator, on the same pooled input
    hidden = torch.randn(3, 6, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, mix = (_generator_outputs(pm, n, hidden) for n in ("default", "b", "mix"))
    for va, vb, vm in zip(a, b, mix):
        assert vm.dtype == torch.float64 and not torch.allclose(va, vb)  # the check can fail
        torch.testing.assert_close(vm, 1 + weights[0] * (va - 1) + weights[1] * (vb - 1), rtol=0, atol=1e-12)
    # and a real forward: the first layer's vectors (the later layers' inputs differ by row, as
    # the rows' earlier vectors differ)
    got = _vectors(pm, ["default", "b", "mix"])
    first_layer = [k for (i, _), k in pm._module_index.items() if i == 0]
    assert first_layer and all(k in got for k in first_layer)
    for k in first_layer:
        v = got[k]
        torch.testing.assert_close(v[2], 1 + weights[0] * (v[0] - 1) + weights[1] * (v[1] - 1), rtol=0, atol=1e-12)


def test_weighted_adapter_refuses_what_it_cannot_combine_exactly():
    pm = get_para_model(tiny_llama(), PARAConfig(r=3, pooler="attn"))
    pm.add_adapter("other_w_sa", PARAConfig(r=3, pooler="attn"))
    pm.add_adapter("mean", PARAConfig(r=3, pooler="mean"))
    randomize_adapter(pm, "default", seed=1)
    randomize_adapter(pm, "other_w_sa", seed=2)
    with pytest.raises(ValueError, match="w_sa"):
        pm.add_weighted_adapter(["default", "other_w_sa"], [0.5, 0.5], "mix")
    with pytest.raises(ValueError, match="differ in r alone"):
        pm.add_weighted_adapter(["default", "mean"], [0.5, 0.5], "mix")
    with pytest.raises(ValueError, match="combination_type"):
        pm.add_weighted_adapter(["default", "default"], [0.5, 0.5], "mix", combination_type="svd")
    with pytest.raises(ValueError, match="equal length"):
        pm.add_weighted_adapter(["default"], [0.5, 0.5], "mix")
    assert "mix" not in pm.peft_config and not adapter_params(pm, "mix")


def test_weighted_adapter_saves_and_loads(tmp_path):
    pm = get_para_model(tiny_llama(), PARAConfig(r=3))
    pm.add_adapter("b", PARAConfig(r=2))
    randomize_adapter(pm, "default", seed=1)
    randomize_adapter(pm, "b", seed=2)
    pm.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix")
    pm.save_pretrained(str(tmp_path), selected_adapters=["mix"])
    loaded = PARAModel.from_pretrained(tiny_llama(), str(tmp_path), adapter_name="mix")
    assert torch.equal(logits_of(loaded), logits_of(pm, adapter_names=["mix", "mix"]))


def test_trainer_restores_checkpoints_of_both_layouts(tmp_path):
    from para_kernels.transformers.trainer import restore_adapters
    pm = _default_and_extra()
    pm.save_pretrained(str(tmp_path / "new"))
    first = tmp_path / "old" / "default"  # the first layout: every adapter in its subfolder
    first.mkdir(parents=True)
    for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copy(tmp_path / "new" / f, first / f)
    shutil.copytree(tmp_path / "new" / "extra", tmp_path / "old" / "extra")
    for layout in ("new", "old"):
        target = get_para_model(tiny_llama(), PARAConfig(r=4))
        target.add_adapter("extra", PARAConfig(r=3, pooler="attn", activation="rational", targets=("q", "up")))
        assert sorted(restore_adapters(target, str(tmp_path / layout))) == ["default", "extra"]
        for name in ("default", "extra"):
            assert torch.equal(logits_of(target, adapter_names=[name] * 2), logits_of(pm, adapter_names=[name] * 2))


# ---------------------------------------------------------------- modules_to_save
def _train_step(pm, lr=0.5):
    ids = token_ids()
    labels = ids.clone()
    labels[:, :3] = -100  # the prompt
    out = pm(input_ids=ids, labels=labels)
    out.loss.backward()
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad and p.grad is not None:
                p.sub_(lr * p.grad)
                p.grad = None


def test_modules_to_save_trains_a_copy_saved_and_loaded_with_the_adapter(tmp_path):
    from safetensors.torch import load_file
    model = tiny_llama()
    head = model.lm_head.weight.detach().clone()
    with torch.no_grad():
        bare = model(input_ids=token_ids()).logits
        bare_generated = model.generate(input_ids=token_ids(), max_new_tokens=3, do_sample=False)
    pm = get_para_model(model, PARAConfig(r=4, modules_to_save=["lm_head"]))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert "saved_modules.default.lm_head.weight" in trainable and not model.lm_head.weight.requires_grad
    assert pm.get_nb_trainable_parameters()[0] == sum(p.numel() for n, p in pm.named_parameters() if n in trainable)
    _train_step(pm)
    assert torch.equal(model.lm_head.weight, head)  # the original stays as it was
    copy = pm.saved_modules["default"]["lm_head"].weight
    assert not torch.equal(copy, head)
    trained = logits_of(pm)
    assert not torch.allclose(trained, bare, atol=1e-3)
    # a bare row uses the original head, an adapter row the copy; disable_adapter: all original
    mixed = logits_of(pm, adapter_names=[None, "default"])
    torch.testing.assert_close(mixed[0], bare[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], trained[1], rtol=0, atol=1e-5)
    with pm.disable_adapter():
        torch.testing.assert_close(logits_of(pm), bare, rtol=0, atol=0)
    with torch.no_grad():
        generated = pm.generate(input_ids=token_ids(), max_new_tokens=3, do_sample=False,
                                adapter_names=[None, "default"])
    assert torch.equal(generated[0], bare_generated[0])
    pm.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / ADAPTER_CONFIG).read_text())["modules_to_save"] == ["lm_head"]
    assert torch.equal(load_file(str(tmp_path / ADAPTER_WEIGHTS))["modules_to_save.lm_head.weight"], copy.detach())
    fresh = tiny_llama()
    loaded = PARAModel.from_pretrained(fresh, str(tmp_path))
    assert torch.equal(logits_of(loaded), trained)
    assert torch.equal(fresh.lm_head.weight, head)
    base = loaded.unload()
    assert "forward" not in base.lm_head.__dict__  # the router is gone
    with torch.no_grad():
        assert torch.equal(base(input_ids=token_ids()).logits, bare)


def test_modules_to_save_follow_their_adapter():
    pm = get_para_model(tiny_llama(), PARAConfig(r=4, modules_to_save=["lm_head"]))
    pm.add_adapter("plain", PARAConfig(r=4))
    _train_step(pm)
    with pm.disable_adapter():
        bare = logits_of(pm)
    # "plain" has no copy: its rows use the original head (and its untrained generator: v = 1)
    torch.testing.assert_close(logits_of(pm, adapter_names=["plain", "plain"]), bare, rtol=0, atol=1e-6)
    pm.set_adapter("plain")
    assert not pm.saved_modules["default"]["lm_head"].weight.requires_grad  # only the active adapter trains
    pm.delete_adapter("default")
    assert "default" not in pm.saved_modules
    torch.testing.assert_close(logits_of(pm), bare, rtol=0, atol=1e-6)


@pytest.mark.parametrize("names,match", [(["no_such_head"], "no module"), (["q_proj"], "inside the decoder layers")])
def test_modules_to_save_that_cannot_be_kept_are_refused(names, match):
    from para_kernels import MappingError
    model = tiny_llama()
    with pytest.raises(MappingError, match=match):
        get_para_model(model, PARAConfig(r=4, modules_to_save=names))
    assert not any(hasattr(m, "para_generator") for m in model.modules())


def test_weighted_adapter_refuses_modules_to_save():
    pm = get_para_model(tiny_llama(), PARAConfig(r=4, modules_to_save=["lm_head"]))
    pm.add_adapter("b", PARAConfig(r=2, modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        pm.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix")
