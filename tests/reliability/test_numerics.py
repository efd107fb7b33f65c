"""Numerics (the reliability campaign, category "numerics").

1. NaN / Inf in one row's prompt hidden states (``inputs_embeds`` poisoned at one attended
   position of one row): only that row's outputs change; every other row is bitwise equal to the
   same batch with the poisoned row clean (same shapes, so the same kernels), and equal within
   rounding to the batch without that row. Rows are independent in attention, so any leak is
   PARA's (pooling, the stacked banks, the scale).
2. An adapter whose weights went NaN / Inf (a diverged step, simulated) is refused by
   ``save_pretrained`` with an error naming the adapter and the tensor, nothing written; the
   ``allow_non_finite=True`` opt-out saves it.
"""
from __future__ import annotations

import math
import os
import random

import pytest
import torch

from para_kernels import PARAConfig
from para_kernels.transformers import get_para_model

from kit import rel_err
from kit.models import PAD, VOCAB, adapter_params, randomize_adapter, tiny_model

ARCHS = ("llama", "gpt2", "qwen3", "opt")
POOLERS = ("last", "mean", "max", "attn")
POISONS = (math.nan, math.inf, -math.inf)


def _case(k: int):
    rng = random.Random(2000 + k)
    arch = ARCHS[k % len(ARCHS)]
    pooler = POOLERS[(k // len(ARCHS)) % len(POOLERS)]
    poison = POISONS[k % len(POISONS)]
    model = tiny_model(arch, seed=k)
    pm = get_para_model(model, PARAConfig(r=3, pooler=pooler, pool_input=rng.choice(("residual", "normed"))),
                        adapter_name="a")
    pm.add_adapter("b", PARAConfig(r=5, pooler=pooler))  # same signature but r: stacked with "a"
    pm.add_adapter("c", PARAConfig(r=2, pooler=rng.choice(POOLERS), activation="rational"))
    for j, name in enumerate("abc"):
        randomize_adapter(pm, name, seed=50 * k + j, std=0.5)
    batch, length = 4, rng.choice((1, 3, 6))
    g = torch.Generator().manual_seed(k)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    left = rng.random() < 0.5
    for b in range(1, batch):  # row 0 full, the others padded on one side
        n = rng.randint(1, length)
        mask[b] = 0
        if left:
            mask[b, length - n:] = 1
        else:
            mask[b, :n] = 1
    ids[mask == 0] = PAD
    rows = [rng.choice(["a", "b", "c", None]) for _ in range(batch)]
    bad = rng.randrange(batch)
    position = rng.choice(mask[bad].nonzero()[:, 0].tolist())  # an attended token of the bad row's prompt
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        poisoned = embeds.clone()
        poisoned[bad, position, rng.randrange(embeds.shape[-1])] = poison
        out = pm(inputs_embeds=poisoned, attention_mask=mask, adapter_names=rows).logits
        clean = pm(inputs_embeds=embeds, attention_mask=mask, adapter_names=rows).logits
        keep = [b for b in range(batch) if b != bad]
        without = pm(inputs_embeds=embeds[keep], attention_mask=mask[keep],
                     adapter_names=[rows[b] for b in keep]).logits
    for j, b in enumerate(keep):
        attended = mask[b].bool()
        assert torch.equal(out[b], clean[b]), (k, arch, pooler, poison, rows, bad, b)
        assert rel_err(out[b, attended], without[j, attended]) < 1e-5, (k, arch, pooler, rows, bad, b)
    return not bool(torch.isfinite(out[bad]).all())


def test_non_finite_row_stays_in_its_row(campaign):
    n = campaign.cases(32)
    reached = sum(_case(k) for k in range(n))
    campaign.tried("numerics", n)
    assert reached > 0  # the poison did reach its own row's outputs (it is not silently dropped)


@pytest.mark.parametrize("poison", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["w_up", "b_down", "saved"])
def test_diverged_adapter_is_not_saved(poison, where, tmp_path, campaign):
    campaign.tried("numerics")
    model = tiny_model("llama")
    saved = ["lm_head"] if where == "saved" else None
    pm = get_para_model(model, PARAConfig(r=3, modules_to_save=saved), adapter_name="default")
    pm.add_adapter("diverged", PARAConfig(r=3, modules_to_save=saved))
    randomize_adapter(pm, "diverged", seed=3)
    with torch.no_grad():
        if where == "saved":
            pm.saved_modules["diverged"]["lm_head"].weight[1, 2] = poison
            tensor = "lm_head.weight"
        else:
            name, p = next((n, p) for n, p in adapter_params(pm, "diverged").items() if n.endswith(where))
            p.view(-1)[0] = poison
            tensor = f"layers.{name.split('.layers.')[1].split('.')[0]}.{where}"
    folder = tmp_path / "out"
    with pytest.raises(ValueError) as info:
        pm.save_pretrained(str(folder))
    assert "'diverged'" in str(info.value) and tensor in str(info.value), str(info.value)
    assert not folder.exists()  # nothing written, not even the healthy adapter
    with pytest.raises(ValueError, match="diverged"):
        pm.save_pretrained(str(folder), selected_adapters=["diverged"])
    pm.save_pretrained(str(folder), selected_adapters=["default"])  # the healthy one alone saves
    assert os.path.exists(folder / "adapter_model.safetensors")
    pm.save_pretrained(str(tmp_path / "anyway"), allow_non_finite=True)
    assert os.path.exists(tmp_path / "anyway" / "diverged" / "adapter_model.safetensors")
