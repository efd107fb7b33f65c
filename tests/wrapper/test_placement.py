"""PARA on a backbone dispatched by accelerate (``device_map``, offload to disk): each layer's
generators live on that layer's execution device (an offloaded layer's weights are on meta, its
hook's ``execution_device`` says where it computes), prompt ranges and adapter ids are moved to
it once per request, and the split model serves, trains, saves and loads as the whole one does.
A model split across GPUs takes the same code path (one execution device per layer)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from para_kernels import PARAConfig, PARAModel, get_para_model
from para_kernels.transformers.layer import execution_device
from para_kernels.transformers.state import AdapterGroup, RequestState
from para_kernels.transformers.trainer import PARATrainer

from kit.models import adapter_params, randomize_adapter, tiny_llama

pytest.importorskip("accelerate")
pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

LAYERS = 3
SPLIT = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
         "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(seed=0, layers=LAYERS).save_pretrained(folder)
    return str(folder)


def _whole(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.generation_config.eos_token_id = None
    return model.eval()


def _split(folder, tmp_path, **kwargs):
    kwargs = kwargs or {"device_map": SPLIT}
    model = AutoModelForCausalLM.from_pretrained(folder, offload_folder=str(tmp_path / "offload"), **kwargs)
    model.generation_config.eos_token_id = None
    return model.eval()


def _pair(folder, tmp_path, config=None, **kwargs):
    """(whole, split) PARA models with the same random adapter weights."""
    config = config or PARAConfig(r=4)
    whole = get_para_model(_whole(folder), config)
    randomize_adapter(whole)
    split = get_para_model(_split(folder, tmp_path, **kwargs), config)
    with torch.no_grad():
        for (name, p), (other, q) in zip(adapter_params(split).items(), adapter_params(whole).items()):
            assert name == other
            p.copy_(q)
    return whole, split


def _inputs():
    x = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    return x, mask


def test_offloaded_layers_get_their_generators_on_the_execution_device(saved_llama, tmp_path):
    model = _split(saved_llama, tmp_path)
    offloaded = model.model.layers[1]
    assert offloaded.self_attn.q_proj.weight.device.type == "meta"  # the weights live on disk
    assert execution_device(offloaded) == torch.device("cpu")
    pm = get_para_model(model, PARAConfig(r=4, pooler="attn", activation="rational"))
    for name, p in adapter_params(pm).items():
        assert p.device == torch.device("cpu"), name
    assert all(devices == ["cpu"] for devices in pm.get_model_status().devices.values())


@pytest.mark.parametrize("pooler", ["last", "attn"])
def test_split_model_equals_the_whole_one(saved_llama, tmp_path, pooler):
    whole, split = _pair(saved_llama, tmp_path, PARAConfig(r=4, pooler=pooler))
    x, mask = _inputs()
    with torch.no_grad():
        out = split(input_ids=x, attention_mask=mask).logits
        torch.testing.assert_close(out, whole(input_ids=x, attention_mask=mask).logits, rtol=0, atol=1e-6)
        with split.disable_adapter():
            assert (split(input_ids=x, attention_mask=mask).logits - out).abs().max() > 1e-2  # the adapter acts
    kwargs = dict(input_ids=x, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(split.generate(**kwargs), whole.generate(**kwargs))
    assert torch.equal(split.generate(**kwargs, use_cache=False), whole.generate(**kwargs))


def test_split_model_trains_as_the_whole_one(saved_llama, tmp_path):
    whole, split = _pair(saved_llama, tmp_path)
    x, mask = _inputs()
    labels = x.masked_fill(torch.arange(x.shape[1]) < 6, -100)
    grads = []
    for pm in (whole, split):
        pm.train()
        pm(input_ids=x, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in adapter_params(pm).items()})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4 * LAYERS
    for n in grads[0]:
        assert grads[1][n] is not None and grads[1][n].abs().sum() > 0, n
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_para_trainer_saves_and_loads_a_split_model(saved_llama, tmp_path):
    whole, split = _pair(saved_llama, tmp_path)
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": (ids := torch.randint(3, 128, (6,), generator=gen).tolist()),
             "labels": [-100, -100, -100] + ids[3:]} for _ in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], save_strategy="no", use_cpu=True,
                             max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, disable_tqdm=True)
    start = {n: p.detach().clone() for n, p in adapter_params(split).items()}
    trainer = PARATrainer(model=split, args=args, train_dataset=data)
    assert trainer.train().global_step == 2
    assert all(not torch.equal(p, start[n]) for n, p in adapter_params(split).items() if n.endswith("w_up"))
    trainer.save_model(str(tmp_path / "adapter"))
    x, mask = _inputs()
    split.eval()
    with torch.no_grad():
        ref = split(input_ids=x, attention_mask=mask).logits
        # loaded into the whole model and into another split one
        for base in (_whole(saved_llama), _split(saved_llama, tmp_path / "again")):
            loaded = PARAModel.from_pretrained(base, str(tmp_path / "adapter"))
            torch.testing.assert_close(loaded(input_ids=x, attention_mask=mask).logits, ref, rtol=0, atol=1e-6)
    # the backbone's own files stay the backbone's (no generator tensors)
    split.get_base_model().save_pretrained(str(tmp_path / "backbone"))
    reloaded = _whole(str(tmp_path / "backbone"))
    assert not any("para_generator" in n for n, _ in reloaded.named_parameters())


@pytest.mark.parametrize("budget", [120_000, 1_000])
def test_max_memory_forces_offload(saved_llama, tmp_path, budget):
    # a CPU budget below the model's size: accelerate sends the last layers (or everything) to disk
    whole, split = _pair(saved_llama, tmp_path, device_map="auto", max_memory={"cpu": budget})
    assert "disk" in set(split.get_base_model().hf_device_map.values())
    x, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(split(input_ids=x, attention_mask=mask).logits,
                                   whole(input_ids=x, attention_mask=mask).logits, rtol=0, atol=1e-6)


def test_ranges_and_ids_are_moved_once_per_device_per_request():
    ids = torch.tensor([0, -1])
    state = RequestState(2, None, [AdapterGroup(PARAConfig(r=2), ["a"], ids)], torch.tensor([0, 1]),
                         torch.tensor([3, 3]), None, [None], [None])
    start, end, group_ids = state.on(torch.device("cpu"))
    assert start is state.start and end is state.end and group_ids[0] is ids  # the input's device: no copy
    meta = torch.device("meta")
    first = state.on(meta)
    assert first[0].device == meta and first[2][0].device == meta
    second = state.on(meta)
    assert all(a is b for a, b in zip(first[:2], second[:2])) and second[2][0] is first[2][0]
    assert state.snapshot().on(meta)[0] is first[0]  # a checkpoint's recompute shares them
