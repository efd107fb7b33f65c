"""A tiny multi-tenant serving setup shared by test_long_runs.py and test_concurrency.py: one fp64
model with four adapters (three share a generator signature, so a mixed batch stacks their
banks), a fixed pool of prompts, references computed once per (prompt, adapter) by running that
row alone, and counters of everything a long run could leak."""
from __future__ import annotations

import gc
import weakref

import torch

from para_kernels import PARAConfig, get_para_model
from para_kernels.transformers.layer import GENERATOR_ATTR
from para_kernels.transformers.state import RequestState

from kit.models import randomize_adapter, tiny_llama

NEW = 4  # tokens per generate call
SAME = PARAConfig(r=4)  # a, b, d: one signature (one stacked bank of up to 3 adapters)
OTHER = PARAConfig(r=4, pooler="mean", activation="silu")  # c: a second group in a mixed batch
ADAPTERS = {"a": (SAME, 1), "b": (SAME, 2), "c": (OTHER, 3), "d": (SAME, 4)}  # name -> (config, seed)
ROUTES = ["a", "b", "c", "d", None]  # what a row may ask for (None: the bare backbone)


def served_model(layers: int = 2):
    """fp64 (greedy tokens of a padded mixed batch equal each row alone, bit for bit)."""
    model = tiny_llama(dtype=torch.float64, layers=layers)
    pm = get_para_model(model, SAME, adapter_name="a")
    for name, (config, seed) in ADAPTERS.items():
        if name != "a":
            pm.add_adapter(name, config)
        randomize_adapter(pm, name, seed=seed, std=0.5)
    return pm


def prompt_pool(n: int = 8, seed: int = 11) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen)
            for _ in range(n)]


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = row
        mask[b, width - len(row):] = 1
    return ids, mask


class References:
    """Each (prompt, adapter)'s greedy continuation, generated once with that row alone."""

    def __init__(self, pm, prompts: list[torch.Tensor]):
        self.pm, self.prompts, self.tokens = pm, prompts, {}

    def __call__(self, p: int, name) -> torch.Tensor:
        key = (p, name)
        if key not in self.tokens:
            with torch.no_grad():
                out = self.pm.generate(self.prompts[p][None], max_new_tokens=NEW, do_sample=False,
                                       adapter_names=[name])
            self.tokens[key] = out[0, -NEW:]
        return self.tokens[key]


def generate_mixed(pm, prompts, picks: list[int], names: list, use_cache: bool = True) -> torch.Tensor:
    """The new tokens [rows, NEW] of one left-padded mixed-adapter generate call."""
    ids, mask = left_padded([prompts[p] for p in picks])
    with torch.no_grad():
        out = pm.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, adapter_names=names,
                          use_cache=use_cache)
    return out[:, -NEW:]


def rss_kib() -> int:
    """Resident set size of this process (VmRSS, KiB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def live_request_states() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is RequestState)


def resources(pm) -> dict:
    """Everything per-call work could leave behind, counted (after gc.collect())."""
    gc.collect()
    modules = list(pm.modules())
    generators = [getattr(layer, GENERATOR_ATTR) for layer in pm._layers if hasattr(layer, GENERATOR_ATTR)]
    return {
        "hooks": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules),
        "handles": len(pm._handles),
        "hooked": len(pm._hooked),
        "module_index": len(pm._module_index),
        "modules": len(modules),
        "parameters": sum(1 for _ in pm.parameters()),
        "buffers": sum(1 for _ in pm.buffers()),
        "cache_states": len(pm._requests.cache_states),
        "finalizers": len(weakref.finalize._registry),
        "request_states": live_request_states(),
        "cached_banks": sum(g.cached_banks() for g in generators),
    }
