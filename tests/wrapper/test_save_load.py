"""Adapter files: safetensors + JSON, exact round trips, and every kind of bad file refused
with AdapterFileError before the model changes."""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from para_kernels import AdapterFileError, PARAConfig, PARAModel, get_para_model
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

def _saved(tmp_path, **config):
    """A model with adapters 'default' (config) and 'extra' (attn pooler, rational), saved."""
    pm = get_para_model(tiny_llama(), PARAConfig(r=4, **config))
    pm.add_adapter("extra", PARAConfig(r=3, pooler="attn", activation="rational", targets=("q", "up")))
    randomize_adapter(pm, "default", seed=1)
    randomize_adapter(pm, "extra", seed=2)
    pm.save_pretrained(str(tmp_path))
    return pm


def _values(pm, name):
    prefix = f".adapters.{name}."
    return {n.replace(prefix, "."): p.detach().clone()
            for n, p in adapter_params(pm, name).items()}


# ---------------------------------------------------------------- layout
def test_save_pretrained_writes_peft_layout_without_pickles(tmp_path):
    """As PEFT: the default adapter at the folder root, every other one in its subfolder."""
    pm = _saved(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, "extra"])
    for name, folder in (("default", tmp_path), ("extra", tmp_path / "extra")):
        assert sorted(f for f in os.listdir(folder) if f != "extra") == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
        doc = json.loads((folder / ADAPTER_CONFIG).read_text())
        assert PARAConfig.from_pretrained(str(folder)) == pm.peft_config[name]
        assert doc["peft_type"] == "PARA" and doc["hidden_size"] == 32 and doc["num_layers"] == 2
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
        assert len(tensors) == len(adapter_params(pm, name))
        for n, p in adapter_params(pm, name).items():
            layer = n.split("model.layers.")[1].split(".")[0]
            assert torch.equal(tensors[f"layers.{layer}.{n.rsplit('.', 1)[1]}"], p.detach())
    pickles = [f for _, _, files in os.walk(tmp_path) for f in files
               if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    assert not pickles


def test_selected_adapters_are_the_only_ones_saved(tmp_path):
    pm = get_para_model(tiny_llama(), PARAConfig(r=4))
    pm.add_adapter("extra", PARAConfig(r=2))
    pm.save_pretrained(str(tmp_path), selected_adapters=["extra"])
    assert os.listdir(tmp_path) == ["extra"]


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("name,config", [
    ("default", {}), ("extra", {}),
    ("default", {"layers_to_transform": [1], "pool_input": "normed", "targets": ("v", "up"), "pooler": "max"}),
])
def test_from_pretrained_round_trips_exactly(tmp_path, name, config):
    pm = _saved(tmp_path, **config)
    pm.set_adapter(name)
    want_logits = logits_of(pm)
    want = _values(pm, name)
    loaded = PARAModel.from_pretrained(tiny_llama(), str(tmp_path), adapter_name=name)
    assert loaded.active_adapter == name and list(loaded.peft_config) == [name]
    assert loaded.peft_config[name] == pm.peft_config[name]
    got = _values(loaded, name)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert torch.equal(logits_of(loaded), want_logits)
    # the adapter's own folder works as the path too (default: the root, others: their subfolder)
    folder = tmp_path if name == "default" else tmp_path / name
    direct = PARAModel.from_pretrained(tiny_llama(), str(folder), adapter_name=name)
    assert torch.equal(logits_of(direct), want_logits)


def test_load_adapter_adds_a_second_adapter_exactly(tmp_path):
    pm = _saved(tmp_path)
    want_extra = logits_of(pm, adapter_names=["extra", "extra"])
    want_default = logits_of(pm)
    other = PARAModel.from_pretrained(tiny_llama(), str(tmp_path), adapter_name="default")
    other.load_adapter(str(tmp_path), adapter_name="extra")
    assert other.active_adapter == "default"
    assert torch.equal(logits_of(other), want_default)
    assert torch.equal(logits_of(other, adapter_names=["extra", "extra"]), want_extra)
    with pytest.raises(ValueError, match="already exists"):
        other.load_adapter(str(tmp_path), adapter_name="extra")


def test_is_trainable_flag_is_respected(tmp_path):
    _saved(tmp_path)
    frozen = PARAModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert frozen.get_nb_trainable_parameters()[0] == 0
    trainable = PARAModel.from_pretrained(tiny_llama(), str(tmp_path), is_trainable=True)
    params = adapter_params(trainable, "default")
    assert params and all(p.requires_grad for p in params.values())
    assert trainable.get_nb_trainable_parameters()[0] == sum(p.numel() for p in params.values())
    # a frozen adapter stays frozen when made active; a trainable one trains when made active
    trainable.load_adapter(str(tmp_path), adapter_name="extra", is_trainable=False)
    trainable.set_adapter("extra")
    assert not any(p.requires_grad for p in trainable.parameters())
    trainable.load_adapter(str(tmp_path / "extra"), adapter_name="extra2", is_trainable=True)
    trainable.set_adapter("extra2")
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == set(adapter_params(trainable, "extra2"))


def test_unload_after_load_gives_back_the_exact_original(tmp_path):
    _saved(tmp_path)
    model = tiny_llama()
    for p in list(model.parameters())[:3]:
        p.requires_grad_(False)  # unload restores these flags, not just "all True"
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    with torch.no_grad():
        base = model(input_ids=token_ids()).logits
    pm = PARAModel.from_pretrained(model, str(tmp_path))
    assert not torch.equal(logits_of(pm), base)
    back = pm.unload()
    assert back is model
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert not any(hasattr(m, "para_generator") for m in model.modules())
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.model.layers.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=token_ids()).logits, base)
    get_para_model(model, PARAConfig(r=2))  # it can be wrapped again


# ---------------------------------------------------------------- mismatches and bad files
@pytest.mark.parametrize("kwargs,match", [({"hidden": 64}, "hidden size 32"), ({"layers": 3}, "2 layers")])
def test_loading_into_another_architecture_raises(tmp_path, kwargs, match):
    _saved(tmp_path)
    model = tiny_llama(**kwargs)
    with pytest.raises(AdapterFileError, match=match):
        PARAModel.from_pretrained(model, str(tmp_path))
    assert not any(hasattr(m, "para_generator") for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # from_pretrained unloaded its wrapper
    pm = get_para_model(tiny_llama(**kwargs), PARAConfig(r=4))
    with pytest.raises(AdapterFileError, match=match):
        pm.load_adapter(str(tmp_path), adapter_name="extra")
    assert list(pm.peft_config) == ["default"] and not adapter_params(pm, "extra")


def test_adapter_for_layers_the_model_lacks_raises(tmp_path):
    pm = get_para_model(tiny_llama(layers=3), PARAConfig(r=4, layers_to_transform=[2]))
    pm.save_pretrained(str(tmp_path))
    with pytest.raises(AdapterFileError, match="does not fit"):
        PARAModel.from_pretrained(tiny_llama(layers=2), str(tmp_path))


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _flip_tensor_byte(path):
    data = bytearray(path.read_bytes())
    header = struct.unpack("<Q", bytes(data[:8]))[0]
    start = 8 + header
    middle = start + (len(data) - start) // 2
    data[middle] ^= 0x5A
    path.write_bytes(bytes(data))


def _edit_config(path, edit):
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _rewrite_tensors(path, edit, checksum=True):
    """Write the weights again by hand with safetensors (a valid file with a valid checksum),
    after ``edit`` changed the tensor dict."""
    tensors = load_file(str(path))
    edit(tensors)
    metadata = {"format": "pt"}
    if checksum:
        metadata.update(para_format=para_io.FORMAT, sha256=para_io._digest(tensors))
    save_file(tensors, str(path), metadata=metadata)


def _wrong_shape(tensors):
    tensors["layers.1.w_up"] = torch.randn(4, 113)


def _wrong_dtype(tensors):
    tensors["layers.0.b_down"] = torch.ones(4, dtype=torch.int32)


CORRUPTIONS = {
    "truncated weights": lambda f: _truncate(f / ADAPTER_WEIGHTS),
    "empty weights": lambda f: _truncate(f / ADAPTER_WEIGHTS, 0),
    "flipped tensor byte": lambda f: _flip_tensor_byte(f / ADAPTER_WEIGHTS),
    "missing weights": lambda f: os.remove(f / ADAPTER_WEIGHTS),
    "truncated config": lambda f: _truncate(f / ADAPTER_CONFIG),
    "invalid json": lambda f: (f / ADAPTER_CONFIG).write_text("{not json"),
    "json list": lambda f: (f / ADAPTER_CONFIG).write_text("[1, 2]"),
    "unknown config field": lambda f: _edit_config(f / ADAPTER_CONFIG, lambda d: d.update(lora_alpha=16)),
    "invalid config value": lambda f: _edit_config(f / ADAPTER_CONFIG, lambda d: d.update(pooler="sum")),
    "no peft_type marker": lambda f: _edit_config(f / ADAPTER_CONFIG, lambda d: d.pop("peft_type")),
    "unknown format version": lambda f: _edit_config(f / ADAPTER_CONFIG,
                                                     lambda d: d.update(format="para_kernels.adapter.v9")),
    "config r disagrees": lambda f: _edit_config(f / ADAPTER_CONFIG, lambda d: d.update(r=5)),
    "wrong tensor shape": lambda f: _rewrite_tensors(f / ADAPTER_WEIGHTS, _wrong_shape),
    "integer tensor": lambda f: _rewrite_tensors(f / ADAPTER_WEIGHTS, _wrong_dtype),
    "missing tensor": lambda f: _rewrite_tensors(f / ADAPTER_WEIGHTS, lambda t: t.pop("layers.0.w_down")),
    "extra tensor": lambda f: _rewrite_tensors(f / ADAPTER_WEIGHTS,
                                               lambda t: t.update({"layers.0.w_extra": torch.ones(2)})),
    "no checksum": lambda f: _rewrite_tensors(f / ADAPTER_WEIGHTS, lambda t: None, checksum=False),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_bad_files_raise_adapter_file_error_before_anything_changes(tmp_path, corruption):
    _saved(tmp_path / "default")  # the default adapter at the root of .../default
    CORRUPTIONS[corruption](tmp_path / "default")
    pm = get_para_model(tiny_llama(), PARAConfig(r=4))
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    with pytest.raises(AdapterFileError) as info:
        pm.load_adapter(str(tmp_path / "default"), adapter_name="new")
    assert "default" in str(info.value)  # the message names the file's folder
    assert list(pm.peft_config) == ["default"] and pm.active_adapter == "default"
    assert not adapter_params(pm, "new")
    after = dict(pm.named_parameters())
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    model = tiny_llama()
    with pytest.raises(AdapterFileError):
        PARAModel.from_pretrained(model, str(tmp_path / "default"))
    assert not any(hasattr(m, "para_generator") for m in model.modules())


def test_missing_folder_raises_adapter_file_error(tmp_path):
    pm = get_para_model(tiny_llama(), PARAConfig(r=4))
    with pytest.raises(AdapterFileError, match="no PARA adapter"):
        pm.load_adapter(str(tmp_path / "nowhere"), adapter_name="new")
    assert list(pm.peft_config) == ["default"]


def test_adapter_file_error_is_a_value_error():
    assert issubclass(AdapterFileError, ValueError)
