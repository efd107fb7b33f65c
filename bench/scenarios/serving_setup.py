"""The models of one serving comparison, built once from one backbone (:class:`Setup`), and the
comparison's settings (:class:`ServingConfig`).

One prompt batch of ``batch`` rows from ``tenants`` tenants (row b belongs to tenant b mod
tenants). Every method holds adapters for max(tenants, batch) tenants when the popularity
table runs, so any row may have its own; ``Setup.forward`` / ``Setup.generate`` run one
method (a name of methods.py) on the batch, routing each row to its tenant's adapter.
"""
from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from para_kernels import PARAConfig, get_para_model
from para_kernels import ops as para_ops

from . import models
from .lora_baselines import IA3, BGMVLoRA
from .methods import (
    forced_backend,
    is_para,
    lora_method,
    para_backend,
    popularity_methods,
)

PROMPT_TEXT = (
    "The history of computing is a story of abstraction. Early machines were programmed by "
    "rewiring panels and flipping switches; later, stored programs let the same hardware run "
    "many tasks. Assemblers named instructions, compilers translated formulas, and operating "
    "systems shared one machine among many users. Each layer hid the one below it while "
    "exposing new possibilities. Today, large language models are trained on text from the "
    "web, books and code, then adapted to many tasks with small sets of extra parameters, so "
    "one server can answer requests for many customers, each with an adapter of its own. "
    "Serving them efficiently means batching requests from different tenants together and "
    "applying each request's adapter to its own row without slowing the shared backbone."
)


@dataclass
class ServingConfig:
    model: str = models.SMOLLM2  # or a random-weight spec of models.RANDOM_MODELS
    batch: int = 8
    tenants: int = 4
    prompt_len: int = 64
    new_tokens: int = 32
    rounds: int = 5  # alternated runs per method
    prefill_rounds: int = 7
    interleaved_steps: int = 8  # lockstep decode steps per run (0: no lockstep measurement)
    warmup_tokens: int = 8
    methods: tuple = ("para", "peft_lora", "bgmv_lora", "ia3")
    # tenant popularity: row layouts, lockstep runs of each, LoRA ranks measured (headline: lora_r)
    popularity: tuple = ("distinct", "uniform", "zipf", "identical")
    popularity_rounds: int = 2
    zipf_s: float = 1.1
    lora_ranks: tuple = (8, 16)
    para_r: int = 12
    para_w_up_std: float = 0.005
    para_b_up_std: float = 0.005
    lora_r: int = 8
    lora_alpha: int = 16
    lora_b_std: float = 0.02
    ia3_std: float = 0.1
    check_tokens: int = 8
    check_positions: int = 4
    seed: int = 0
    dtype: str = "float32"
    # CUDA-graph replay of one decode step (CUDA only; 0 rounds: skipped)
    graph_rounds: int = 0
    graph_methods: tuple = ("para", "bgmv_lora")
    # tenant-count sweep (empty: skipped): batch sweep_batch, row b -> tenant b mod K
    sweep_tenants: tuple = ()
    sweep_batch: int = 64
    sweep_steps: int = 16
    sweep_rounds: int = 2
    # shared machines: a timed run during which other processes used more than this share of
    # the CPUs is run again (at most retry_share x the planned runs), after waiting (at most
    # max_wait_s in all) for a quiet moment; runs kept despite it are flagged
    max_other_cpu: float = 0.1
    retry_share: float = 0.5
    max_wait_s: float = 240.0
    notes: list = field(default_factory=list)


def prompt_batch(tokenizer, cfg: ServingConfig, device, vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [batch, prompt_len] (no padding). With a tokenizer: windows of
    one text at different offsets, so rows differ; without (random-weight models): seeded random
    token ids below ``vocab``."""
    if tokenizer is None:
        input_ids = models.random_prompts(vocab, cfg.batch, cfg.prompt_len, cfg.seed, device)
        return input_ids, torch.ones_like(input_ids)
    ids = tokenizer(PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    while len(ids) < cfg.prompt_len + cfg.batch * 7:
        ids = ids + ids
    rows = [ids[7 * b: 7 * b + cfg.prompt_len] for b in range(cfg.batch)]
    input_ids = torch.tensor(rows, dtype=torch.long, device=device)
    return input_ids, torch.ones_like(input_ids)


def tenant_pool(cfg: ServingConfig) -> int:
    """Adapters every method holds: enough for each row to have its own when the popularity
    table runs (its 'distinct' layout)."""
    return max(cfg.tenants, cfg.batch) if cfg.popularity and cfg.interleaved_steps else cfg.tenants


def tenant_names(n: int) -> list[str]:
    return [f"tenant{k}" for k in range(n)]


def lora_adapter_name(tenant: str, rank: int, cfg: ServingConfig) -> str:
    """PEFT adapter of ``tenant`` at ``rank`` (the headline rank keeps the plain name)."""
    return tenant if rank == cfg.lora_r else f"{tenant}_r{rank}"


def row_tenants(cfg: ServingConfig) -> list[int]:
    """Row b -> tenant b mod tenants (each tenant gets batch / tenants rows, interleaved)."""
    return [b % cfg.tenants for b in range(cfg.batch)]


def build_para(model, cfg: ServingConfig, gen: torch.Generator, names: list[str]):
    para = get_para_model(model, PARAConfig(r=cfg.para_r), adapter_name=names[0])
    for name in names[1:]:
        para.add_adapter(name, PARAConfig(r=cfg.para_r))
    with torch.no_grad():
        for name in names:
            for _, w in para._adapter_weights(name):
                w.w_up.copy_(torch.randn(w.w_up.shape, generator=gen) * cfg.para_w_up_std)
                w.b_up.copy_(torch.randn(w.b_up.shape, generator=gen) * cfg.para_b_up_std)
    return para.eval()


def build_peft(model, cfg: ServingConfig, gen: torch.Generator, names: list[str], ranks):
    """One PEFT model holding every tenant's adapter at every rank (a mixed batch runs only the
    adapters its rows name, so the others cost nothing)."""
    from peft import LoraConfig, get_peft_model

    def config(r):
        return LoraConfig(r=r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                          target_modules=["q_proj", "v_proj"], bias="none", task_type="CAUSAL_LM")

    adapters = [(lora_adapter_name(n, r, cfg), r) for r in ranks for n in names]
    peft_model = get_peft_model(model, config(adapters[0][1]), adapter_name=adapters[0][0])
    for name, r in adapters[1:]:
        peft_model.add_adapter(name, config(r))
    with torch.no_grad():
        for module in peft_model.modules():
            lora_b = getattr(module, "lora_B", None)
            if isinstance(lora_b, torch.nn.ModuleDict):
                for name, _ in adapters:
                    w = lora_b[name].weight
                    w.copy_(torch.randn(w.shape, generator=gen) * cfg.lora_b_std)
    return peft_model.eval()


class Setup:
    """The models of one comparison, built from one loaded backbone.

    Every method runs on its own copy of the backbone's module tree, so no method pays for
    attaching or removing another's hooks. SmolLM2's copies are deep (the same fresh, contiguous
    weights for all, as the CPU reports have always measured); a random-weight model's copies
    share the weight tensors (models.shared_copy: LLaMA-2-7B exists once on the device).
    ``backbone``: (model, tokenizer) already loaded (the tenant sweep reuses the headline's)."""

    def __init__(self, cfg: ServingConfig, device: torch.device, log=print, backbone=None):
        self.cfg, self.device = cfg, device
        self.shared = models.is_random(cfg.model)
        t0 = time.perf_counter()
        if backbone is None:
            model, self.tokenizer = models.load(cfg.model, getattr(torch, cfg.dtype), device, cfg.seed)
            log(f"loaded {models.full_name(cfg.model)} in {time.perf_counter() - t0:.1f} s")
        else:
            model, self.tokenizer = backbone
        self.load_s = time.perf_counter() - t0
        self.bare = model.to(device).eval() if self.shared else copy.deepcopy(model.to(device).eval())
        del model
        vocab = self.bare.config.vocab_size
        self.input_ids, self.attention_mask = prompt_batch(self.tokenizer, cfg, device, vocab)
        gen = torch.Generator().manual_seed(cfg.seed)
        self.names = tenant_names(tenant_pool(cfg))
        self._index = {n: k for k, n in enumerate(self.names)}
        self.row_ids = row_tenants(cfg)
        self.row_names = [self.names[i] for i in self.row_ids]
        need = set(cfg.methods) | set(popularity_methods(cfg) if cfg.popularity else ())
        ranks = sorted({lora_method(m, cfg)[1] for m in need if lora_method(m, cfg)})
        peft_ranks = sorted({lora_method(m, cfg)[1] for m in need if lora_method(m, cfg)
                             and lora_method(m, cfg)[0] == "peft_lora"})
        # one PARA model serves para, para_none and every para@<backend> (never in lockstep together)
        self.para = build_para(self._copy(), cfg, gen, self.names) if any(is_para(m) for m in need) else None
        # BGMV copies PEFT's weights when PEFT LoRA is measured too (and is checked against it);
        # alone (the tenant sweep) it draws its own
        self.peft = build_peft(self._copy(), cfg, gen, self.names, ranks) if peft_ranks else None
        # one BGMV model per rank: its hooks stay attached, so ranks cannot share a model
        self.bgmv = {r: self._bgmv(r) for r in ranks if any(lora_method(m, cfg) == ("bgmv_lora", r) for m in need)}
        self.ia3 = IA3.random(self._copy(), len(self.names), cfg.ia3_std, gen).attach() \
            if "ia3" in need else None
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer is not None else self.bare.config.pad_token_id

    def _copy(self) -> torch.nn.Module:
        """A copy of the bare model for one method (deep, or sharing the weights; see the class)."""
        return models.shared_copy(self.bare) if self.shared else copy.deepcopy(self.bare)

    def _bgmv(self, rank: int) -> BGMVLoRA:
        if self.peft is not None:
            return BGMVLoRA.from_peft(self._copy(), self.peft,
                                      [lora_adapter_name(n, rank, self.cfg) for n in self.names]).attach()
        cfg = self.cfg
        return BGMVLoRA.random(self._copy(), len(self.names), rank, cfg.lora_b_std, cfg.lora_alpha / rank,
                               seed=cfg.seed + rank).attach()

    def backends_used(self, method: str) -> dict:
        """{op: backend that runs it} for the PARA ops, as ``method``'s route dispatches them."""
        ops = ("pool_generate", "scale", "scaled_linear", "scaled_glu")
        backend = para_backend(method)
        with forced_backend(backend) if backend else nullcontext():
            return {op: para_ops.backend_for(op, self.device) for op in ops}

    # one call per method: (context manager, callable model, extra kwargs)
    def _route(self, method: str, row_names=None):
        names = self.row_names if row_names is None else row_names
        if method in ("bare", "bare_again"):
            return nullcontext(), self.bare, {}
        if method == "para":
            return nullcontext(), self.para, {"adapter_names": list(names)}
        if para_backend(method) is not None:
            return forced_backend(para_backend(method)), self.para, {"adapter_names": list(names)}
        if method == "para_none":
            return nullcontext(), self.para, {"adapter_names": [None] * len(names)}
        ids = [-1 if n is None else self._index[n] for n in names]
        if method == "ia3":
            return self.ia3.rows(ids), self.ia3.model, {}
        lora = lora_method(method, self.cfg)
        if lora is None:
            raise ValueError(f"unknown method {method!r}")
        kind, rank = lora
        if kind == "peft_lora":
            peft_names = ["__base__" if n is None else lora_adapter_name(n, rank, self.cfg) for n in names]
            return nullcontext(), self.peft, {"adapter_names": peft_names}
        bgmv = self.bgmv[rank]
        return bgmv.rows(ids), bgmv.model, {}

    def forward(self, method: str, input_ids=None, attention_mask=None, row_names=None, **kw):
        input_ids = self.input_ids if input_ids is None else input_ids
        attention_mask = self.attention_mask if attention_mask is None else attention_mask
        ctx, model, extra = self._route(method, row_names)
        with torch.no_grad(), ctx:
            return model(input_ids=input_ids, attention_mask=attention_mask, **extra, **kw)

    def generate(self, method: str, new_tokens: int, logits_processor=None, row_names=None):
        ctx, model, extra = self._route(method, row_names)
        kwargs = dict(input_ids=self.input_ids, attention_mask=self.attention_mask, do_sample=False,
                      max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=1,
                      pad_token_id=self.pad_id, temperature=None, top_p=None, top_k=None)
        if logits_processor is not None:
            from transformers import LogitsProcessorList
            kwargs["logits_processor"] = LogitsProcessorList([logits_processor])
        with torch.no_grad(), ctx:
            out = model.generate(**kwargs, **extra)
        if out.shape[1] != self.input_ids.shape[1] + new_tokens:
            raise RuntimeError(f"{method}: generated {out.shape[1] - self.input_ids.shape[1]} tokens, "
                               f"expected {new_tokens}")
        return out
