"""The headline comparison (PARA_SPEC §5): multi-tenant greedy decoding of one backbone —
SmolLM2-135M with its real weights, or LLaMA shapes with random weights (bench/models.py).

One process, one prompt batch of ``batch`` rows from ``tenants`` tenants (row b belongs to
tenant b mod tenants), every method decoding exactly ``new_tokens`` tokens:

    bare       the backbone alone
    para       PARA, random nonzero W_up (PARAModel.generate(adapter_names=...)), default dispatch
    para@X     the same PARA model with para_kernels backend X forced (set_backend) for its calls
    peft_lora  PEFT LoRA r=8 on q_proj, v_proj, random nonzero lora_B, mixed batch
    bgmv_lora  the same LoRA weights served per row by batched gathers (bench.lora.BGMVLoRA)
    ia3        (IA)³-style per-tenant vectors on k, v, up (bench.lora.IA3)

Every method holds adapters for max(tenants, batch) tenants, so any row may have its own.

Runs alternate with the bare model in one sequence  bare, m1, bare, m2, ..., bare  (the method
order rotates each round); each method run is divided by the mean of the bare runs on either
side of it (so a slow drift of the machine cancels), and the reported ratio is the median of
those per-run ratios. A run's time per token is the median of its decode-step intervals,
stamped by a logits processor (each interval is one forward of one token per row plus
greedy selection); the mean interval, the prefill and the generate() throughput (rows x
new tokens / wall time of the whole call) are recorded too.

Tenant popularity (:func:`run_popularity`): the same batch with its rows assigned to tenants
four ways — distinct (row b -> tenant b), uniform (b mod tenants, the headline's layout), zipf
(tenant k drawn with probability ∝ 1/k^zipf_s, seeded) and identical (every row tenant 0) — and
LoRA at every rank of ``lora_ranks`` as well. For each layout, the bare model and every method
decode in lockstep (:func:`_lockstep`: one forward each per step, the order rotating every
step), so each per-step ratio to the bare forward of the same step cancels the machine's drift.
The prefill forward that starts each lockstep run is timed too (prefill ratio per layout).

On a GPU also: the decode step under CUDA-graph replay (bench/graphs.py) and, when
``sweep_tenants`` is set, a tenant-count sweep (:func:`run_sweep`): a batch of ``sweep_batch``
rows, row b -> tenant b mod K for each K, PARA and BGMV LoRA against the bare model in lockstep
(and under graph replay).
"""
from __future__ import annotations

import copy
import gc
import re
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace

import torch

from . import graphs, models
from .common import NO_DEADLINE, CpuShare, summary, sync
from .lora import IA3, BGMVLoRA

METHOD_LABELS = {
    "bare": "bare backbone",
    "para": "PARA (q, v, up; r=12)",
    "para_none": "PARA model, all rows None",
    "peft_lora": "PEFT LoRA r={r} (q, v), mixed batch",
    "bgmv_lora": "BGMV-style LoRA r={r} (q, v), per-row gather",
    "ia3": "(IA)3 per-row vectors (k, v, up)",
    "bare_again": "bare backbone again (A/A control)",
}

_LORA_METHOD = re.compile(r"^(peft_lora|bgmv_lora)(?:_r(\d+))?$")


def lora_method(method: str, cfg: "ServingConfig") -> tuple[str, int] | None:
    """'peft_lora' -> ('peft_lora', lora_r); 'bgmv_lora_r16' -> ('bgmv_lora', 16); else None."""
    m = _LORA_METHOD.match(method)
    if m is None:
        return None
    return m.group(1), int(m.group(2)) if m.group(2) else cfg.lora_r


def para_backend(method: str) -> str | None:
    """'para@triton' -> 'triton'; 'para' (default dispatch) and other methods -> None."""
    head, _, backend = method.partition("@")
    return backend if head == "para" and backend else None


def is_para(method: str) -> bool:
    """Methods served by the PARA model: para, para_none and every para@<backend>."""
    return method in ("para", "para_none") or para_backend(method) is not None


def backend_methods(device: torch.device) -> tuple:
    """'para@<backend>' for every para_kernels backend available on ``device`` when there are
    several (a GPU: reference / triton / cuda); none on the CPU, where only the default PARA
    (reference) is measured (the Triton interpreter is not a serving backend)."""
    if device.type != "cuda":
        return ()
    from para_kernels import ops as para_ops

    found = para_ops.available_backends(device)
    return tuple(f"para@{b}" for b in found) if len(found) > 1 else ()


@contextmanager
def forced_backend(name: str):
    """para_kernels.ops.set_backend(name) inside the block; the previous choice afterwards."""
    from para_kernels import ops as para_ops

    previous = para_ops.get_backend()
    para_ops.set_backend(name)
    try:
        yield
    finally:
        para_ops.set_backend(previous)


def method_label(method: str, cfg: "ServingConfig") -> str:
    backend = para_backend(method)
    if backend is not None:
        return f"PARA, {backend} backend forced"
    lora = lora_method(method, cfg)
    if lora is not None:
        return METHOD_LABELS[lora[0]].format(r=lora[1])
    return METHOD_LABELS[method]


def popularity_methods(cfg: "ServingConfig") -> list[str]:
    """The methods of the popularity table: the headline's (but para_none and para@<backend>,
    which share the PARA model with para and so cannot decode in lockstep with it) plus each
    LoRA method at every other rank of ``lora_ranks``."""
    out = []
    for m in cfg.methods:
        if is_para(m) and m != "para":
            continue
        out.append(m)
        if m in ("peft_lora", "bgmv_lora"):
            out += [f"{m}_r{r}" for r in cfg.lora_ranks if r != cfg.lora_r]
    return out


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


# ----------------------------------------------------------------- set-up
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


def popularity_rows(kind: str, cfg: ServingConfig, pool: int) -> list[int]:
    """Tenant of each row under one popularity layout."""
    B = cfg.batch
    if kind == "distinct":
        return list(range(B))
    if kind == "uniform":
        return row_tenants(cfg)
    if kind == "identical":
        return [0] * B
    if kind == "zipf":
        k = torch.arange(1, pool + 1, dtype=torch.float64)
        p = k ** -cfg.zipf_s
        g = torch.Generator().manual_seed(cfg.seed)
        return torch.multinomial(p / p.sum(), B, replacement=True, generator=g).tolist()
    raise ValueError(f"unknown popularity layout {kind!r}")


def row_tenants(cfg: ServingConfig) -> list[int]:
    """Row b -> tenant b mod tenants (each tenant gets batch / tenants rows, interleaved)."""
    return [b % cfg.tenants for b in range(cfg.batch)]


def build_para(model, cfg: ServingConfig, gen: torch.Generator, names: list[str]):
    from para_kernels import PARAConfig, get_para_model

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
        from para_kernels import ops as para_ops

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


# ----------------------------------------------------------------- checks
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_checks(s: Setup, log=print, results: dict | None = None) -> dict:
    """Correctness before timing. Each entry: measured value, bar and pass flag. ``results``:
    the dict to fill (returned), check by check."""
    cfg = s.cfg
    results = {} if results is None else results
    tol = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 2e-2}[cfg.dtype]  # PARA_SPEC §4 bars

    def record(name, value, bar, ok, what):
        results[name] = {"value": value, "bar": bar, "ok": bool(ok), "what": what}
        log(f"  check {name}: {value:.3g} (bar {bar}) {'ok' if ok else 'FAILED'}")

    def close(name, err, effect, what):
        """err (relative) within the bar: float32, the spec's tolerance; 16-bit, rounding
        differences grow through the layers (two equal computations in another order differ by
        more than the per-op tolerance at the logits), so the bar is the larger of the tolerance
        and a quarter of the method's own effect on the logits (``effect``, relative change vs
        bare): a row routed to the wrong adapter, or to none, moves by about the whole effect."""
        bar = tol if cfg.dtype == "float32" else max(tol, 0.25 * effect)
        record(name, err, f"<= {bar:.3g}", err <= bar,
               what + ("" if cfg.dtype == "float32" else f" (bar: max({tol:g}, effect {effect:.3g} / 4))"))

    keep = {"logits_to_keep": cfg.check_positions}  # every layer sees every token; lm_head on the last few
    bare_logits = s.forward("bare", **keep).logits
    if s.para is not None:
        # mixed batch: tenants on even rows, None (bare backbone) on odd rows
        mixed = [s.names[(b // 2) % cfg.tenants] if b % 2 == 0 else None for b in range(cfg.batch)]
        none_rows = [b for b, n in enumerate(mixed) if n is None]
        ad_rows = [b for b, n in enumerate(mixed) if n is not None]
        para_logits = s.forward("para", row_names=mixed, **keep).logits
        effect = _rel(para_logits[ad_rows], bare_logits[ad_rows])
        # on the reference backend a None row's projections are the bare ones times exactly 1;
        # a kernel backend's fused matmul (scaled_linear) sums in another order than the bare
        # model's GEMM, so there the bar is a tolerance instead of bit equality
        exact = all(b == "reference" for b in s.backends_used("para").values())
        if exact:
            diff = float((para_logits[none_rows] - bare_logits[none_rows]).abs().max())
            record("para_none_rows_equal_bare_logits", diff, "== 0", diff == 0.0,
                   "max |PARA logits - bare logits| over the rows routed to None in a mixed batch")
        else:
            close("para_none_rows_equal_bare_logits", _rel(para_logits[none_rows], bare_logits[none_rows]), effect,
                  "||PARA - bare logits|| / ||bare logits|| over the rows routed to None in a mixed batch "
                  "(kernel backends: fused matmuls, not bit-identical to the bare GEMM)")
        record("para_adapter_rows_differ", effect, "> 1e-3", effect > 1e-3,
               "relative change of the adapter rows' logits vs bare (the random W_up really rescales)")
        # the vectors the adapters produce, for the record: v - 1 at layer 0 for the prefill
        try:  # reads the request state of a prefill: informative only, skipped if the internals change
            results["para_vector_stats"] = _para_vectors(s, mixed)
        except Exception:  # noqa: BLE001
            pass
        bare_tok = s.generate("bare", cfg.check_tokens)
        para_tok = s.generate("para", cfg.check_tokens, row_names=mixed)
        same = bool(torch.equal(para_tok[none_rows], bare_tok[none_rows]))
        if exact:
            record("para_none_rows_equal_bare_tokens", 0.0 if same else 1.0, "== 0", same,
                   f"greedy tokens ({cfg.check_tokens} new, through the KV cache) of the None rows differ (1) or not (0)")
        else:
            frac = float((para_tok[none_rows] != bare_tok[none_rows]).float().mean())
            record("para_none_rows_bare_tokens_differ", frac, "recorded", True,
                   f"share of the None rows' greedy tokens ({cfg.check_tokens} new) that differ from bare "
                   "(kernel backends are not bit-identical, so a near-tie may flip; the logits check is the bar)")
        for m in [m for m in cfg.methods if para_backend(m) is not None]:
            err = _rel(s.forward(m, row_names=mixed, **keep).logits, para_logits)
            close(f"{m}_equals_para_logits", err, _rel(para_logits, bare_logits),
                  f"||PARA logits with the {para_backend(m)} backend forced - default dispatch|| / ||default||, "
                  "mixed batch")
    if s.peft is not None:
        peft_logits = s.forward("peft_lora", **keep).logits
        effect = _rel(peft_logits, bare_logits)
        record("peft_lora_differs", effect, "> 1e-3", effect > 1e-3,
               "relative change of PEFT LoRA logits vs bare (random nonzero lora_B)")
        if cfg.lora_r in s.bgmv:
            bgmv_logits = s.forward("bgmv_lora", **keep).logits
            err = _rel(bgmv_logits, peft_logits)
            close("bgmv_lora_equals_peft_logits", err, effect,
                  "||BGMV logits - PEFT logits|| / ||PEFT logits|| for the same weights, mixed batch")
            half = [s.row_names[b] if b % 2 == 0 else None for b in range(cfg.batch)]
            err_b = _rel(s.forward("bgmv_lora", row_names=half, **keep).logits,
                         s.forward("peft_lora", row_names=half, **keep).logits)
            close("bgmv_lora_equals_peft_logits_with_base_rows", err_b, effect,
                  "as above with every other row on the bare model (PEFT '__base__', BGMV id -1)")
        distinct = [s.names[b % len(s.names)] for b in range(cfg.batch)]
        for r in sorted(set(s.bgmv) - {cfg.lora_r}):
            peft_r = s.forward(f"peft_lora_r{r}", row_names=distinct, **keep).logits
            err_r = _rel(s.forward(f"bgmv_lora_r{r}", row_names=distinct, **keep).logits, peft_r)
            close(f"bgmv_lora_r{r}_equals_peft_logits", err_r, _rel(peft_r, bare_logits),
                  f"BGMV vs PEFT logits at rank {r}, every row its own tenant")
    if s.ia3 is not None:
        ia3_logits = s.forward("ia3", **keep).logits
        effect = _rel(ia3_logits, bare_logits)
        record("ia3_differs", effect, "> 1e-3", effect > 1e-3, "relative change of (IA)3 logits vs bare")
        folded = copy.deepcopy(s.bare)
        s.ia3.scaled_copy(folded, 0)
        rows = [b for b, t in enumerate(s.row_ids) if t == 0]
        with torch.no_grad():
            ref = folded(input_ids=s.input_ids, attention_mask=s.attention_mask, **keep).logits
        err = _rel(ia3_logits[rows], ref[rows])
        close("ia3_rows_equal_folded_weights", err, _rel(ia3_logits[rows], bare_logits[rows]),
              "tenant 0's rows vs a copy of the model with tenant 0's vectors folded into its weights")
        del folded
        gc.collect()
    return results


def _para_vectors(s: Setup, row_names) -> dict:
    """Summary of v - 1 over all layers and adapter rows of a prefill of the batch (measured)."""
    vals = []
    with torch.no_grad():
        cache = s.para(input_ids=s.input_ids, attention_mask=s.attention_mask, adapter_names=list(row_names),
                       use_cache=True, logits_to_keep=1).past_key_values
    for _, t in s.para.request_state(cache).vectors():
        vals.append((t.float() - 1.0).flatten())
    if not vals:
        return {}
    x = torch.cat(vals)
    x = x[x != 0]
    return {"abs_mean": float(x.abs().mean()), "std": float(x.std()), "min": float(x.min()),
            "max": float(x.max()), "what": "v - 1 over layers, modules and adapter rows of a prefill"}


# ----------------------------------------------------------------- timing
class StepStamps:
    """Logits processor that stamps the time at every generation step (after its forward)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.t: list[float] = []

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.t.append(time.perf_counter())
        return scores


def _time_generate(s: Setup, method: str) -> dict:
    stamps = StepStamps(s.device)
    share = CpuShare()
    sync(s.device)
    share.start()
    t0 = time.perf_counter()
    s.generate(method, s.cfg.new_tokens, logits_processor=stamps)
    sync(s.device)
    t1 = time.perf_counter()
    others = share.stop()
    steps = [b - a for a, b in zip(stamps.t, stamps.t[1:])]
    rows = s.input_ids.shape[0]
    return {"total_s": t1 - t0, "tokens_per_s": rows * s.cfg.new_tokens / (t1 - t0),
            "first_step_s": stamps.t[0] - t0,
            "step_median_s": statistics.median(steps) if steps else float("nan"),
            "step_mean_s": sum(steps) / len(steps) if steps else float("nan"), "steps": len(steps),
            "others_cpu": others}


def _time_prefill(s: Setup, method: str) -> dict:
    share = CpuShare()
    sync(s.device)
    share.start()
    t0 = time.perf_counter()
    s.forward(method, use_cache=True, logits_to_keep=1)
    sync(s.device)
    t1 = time.perf_counter()
    return {"total_s": t1 - t0, "others_cpu": share.stop()}


class _Quiet:
    """Waits for other processes to leave the CPUs alone (bounded by a total budget)."""

    def __init__(self, max_share: float, budget_s: float):
        self.max_share, self.budget_s, self.waited_s = max_share, budget_s, 0.0

    def wait(self, progress=None) -> None:
        while self.waited_s < self.budget_s:
            share = CpuShare()
            share.start()
            time.sleep(1.0)
            self.waited_s += 1.0
            busy = share.stop()
            if busy is None or busy <= self.max_share:
                return
            if progress is not None:
                progress.set_postfix_str(f"waiting for other processes ({busy:.0%} of the CPUs)")


def _sequence(methods, rounds: int) -> list[str]:
    """bare, m1, bare, m2, ..., bare: the method order rotates every round."""
    seq = ["bare"]
    for r in range(rounds):
        k = r % len(methods)
        for m in methods[k:] + methods[:k]:
            seq += [m, "bare"]
    return seq


def _alternated(s: Setup, methods, rounds: int, timer, keys: dict, progress) -> dict:
    """Time the alternated sequence; for each method and each ``keys`` entry {name: run field},
    the per-run ratios to the mean of the neighbouring bare runs and their summary."""
    seq = _sequence(list(methods), rounds)
    cfg = s.cfg
    budget = int(cfg.retry_share * len(seq))
    quiet = _Quiet(cfg.max_other_cpu, cfg.max_wait_s)
    runs, retried = [], 0
    for m in seq:
        while True:
            r = timer(s, m)
            busy = r.get("others_cpu")
            contended = busy is not None and busy > cfg.max_other_cpu
            if not contended or retried >= budget:
                break
            retried += 1
            progress.set_postfix_str(f"run again: others used {busy:.0%} of the CPUs")
            quiet.wait(progress)
        r["contended"] = contended
        runs.append((m, r))
        if retried:
            progress.set_postfix_str(f"{retried} run(s) repeated (other processes were busy)")
        progress.update(1)
    primary = next(iter(keys.values()))
    shares = [r["others_cpu"] for _, r in runs if r.get("others_cpu") is not None]
    out = {"sequence": seq, "retried_runs": retried, "waited_s": quiet.waited_s,
           "contended_runs_kept": sum(r["contended"] for _, r in runs),
           "others_cpu": summary(shares) if shares else None,
           "bare": {"runs": [r for m, r in runs if m == "bare"],
                    "time": summary([r[primary] for m, r in runs if m == "bare"])}}
    for m in methods:
        idx = [i for i, (name, _) in enumerate(runs) if name == m]
        entry = {"runs": [runs[i][1] for i in idx], "time": summary([runs[i][1][primary] for i in idx])}
        for label, key in keys.items():
            ratios = [runs[i][1][key] / (0.5 * (runs[i - 1][1][key] + runs[i + 1][1][key])) for i in idx]
            entry[label] = summary(ratios)
            entry[label + "_runs"] = ratios
        out[m] = entry
    return out


def _lockstep(s: Setup, methods, steps: int, row_names=None, start: int = 0) -> dict:
    """Greedy decode of the bare model and of every method in ``methods`` in lockstep: each from
    its own prefill and KV cache, one forward each per step, the order rotating every step (for
    one method: bare, m / m, bare / ...). The per-step ratio to that step's bare forward cancels
    the machine's drift at the scale of one step. The first step after the prefills is run
    untimed (first-call allocations). Each prefill (input_ids [B, T] -> cache, logits of the
    last position) is timed too, synchronised, in an order rotated by ``start``. Returns each
    model's step times and prefill time."""
    order = ["bare", *methods]
    B, T = s.input_ids.shape
    times = {m: [] for m in order}
    prefill = {}
    share = CpuShare()
    share.start()
    with torch.no_grad():
        state = {}
        k = start % len(order)
        for m in order[k:] + order[:k]:
            sync(s.device)
            t0 = time.perf_counter()
            out = s.forward(m, use_cache=True, logits_to_keep=1, row_names=row_names)
            nxt = out.logits[:, -1:].argmax(-1)
            sync(s.device)
            prefill[m] = time.perf_counter() - t0
            state[m] = (out.past_key_values, nxt)
        for i in range(steps + 1):
            mask = torch.ones(B, T + i + 1, dtype=torch.long, device=s.device)
            k = i % len(order)
            for m in order[k:] + order[:k]:
                cache, tok = state[m]
                sync(s.device)
                t0 = time.perf_counter()
                out = s.forward(m, input_ids=tok, attention_mask=mask, past_key_values=cache, use_cache=True,
                                logits_to_keep=1, row_names=row_names)
                nxt = out.logits[:, -1:].argmax(-1)
                sync(s.device)
                if i > 0:
                    times[m].append(time.perf_counter() - t0)
                state[m] = (out.past_key_values, nxt)
    return {"times": times, "prefill": prefill, "others_cpu": share.stop()}


def _lockstep_quiet(s: Setup, methods, steps: int, row_names, quiet: "_Quiet", bar, start: int = 0) -> dict:
    """:func:`_lockstep`, run once more (after waiting for a quiet moment) if other processes
    used more than ``max_other_cpu`` of the CPUs during it."""
    r = _lockstep(s, methods, steps, row_names, start)
    if r["others_cpu"] is not None and r["others_cpu"] > s.cfg.max_other_cpu:
        bar.set_postfix_str(f"run again: others used {r['others_cpu']:.0%} of the CPUs")
        quiet.wait(bar)
        r = _lockstep(s, methods, steps, row_names, start)
        r["repeated"] = True
    return r


def _prefill_ratios(prefills: list[dict], methods) -> dict:
    """``prefills``: one {model: seconds} per lockstep run. Per method: the summary of its
    per-run ratio to that run's bare prefill, and of its times."""
    out = {"bare": {"time": summary([p["bare"] for p in prefills])}}
    for m in methods:
        out[m] = {"time": summary([p[m] for p in prefills]),
                  "ratio": summary([p[m] / p["bare"] for p in prefills])}
    return out


def _step_summary(times: dict, method: str, others, steps: int) -> dict:
    ratios = [a / b for a, b in zip(times[method], times["bare"])]
    return {"ratio": summary(ratios), "time": summary(times[method]), "bare_time": summary(times["bare"]),
            "steps": steps, "others_cpu": others}


def _interleaved(s: Setup, method: str, steps: int) -> dict:
    """``method`` and the bare model alone in lockstep (see :func:`_lockstep`), as ratio summaries."""
    r = _lockstep(s, [method], steps)
    return _step_summary(r["times"], method, r["others_cpu"], steps)


def _warm_lockstep(s: Setup, methods, row_names) -> None:
    """One untimed lockstep step of every model first: the first calls of a model the headline
    did not warm up (LoRA at its other rank) or at new shapes (a GPU's cuBLAS heuristics and
    Triton autotuning at this batch) must not land in the first run's timed prefill."""
    _lockstep(s, methods, 1, row_names)


def run_popularity(s: Setup, progress_factory) -> dict:
    """Decode-step ratios to the bare model of every popularity method under every row layout.
    Each round runs every layout once (the layout order rotating each round); each run is one
    :func:`_lockstep` of all methods, so all methods of a layout are measured side by side."""
    cfg = s.cfg
    methods = popularity_methods(cfg)
    kinds = list(cfg.popularity)
    layouts = {k: popularity_rows(k, cfg, len(s.names)) for k in kinds}
    times = {k: {m: [] for m in ["bare", *methods]} for k in kinds}
    prefills = {k: [] for k in kinds}
    rounds = {k: [] for k in kinds}
    quiet = _Quiet(cfg.max_other_cpu, cfg.max_wait_s / 4)
    _warm_lockstep(s, methods, [s.names[t] for t in layouts[kinds[0]]])
    desc = f"tenant popularity ({cfg.interleaved_steps} lockstep steps x {len(methods) + 1} models)"
    with progress_factory(total=cfg.popularity_rounds * len(kinds), desc=desc) as bar:
        for rnd in range(cfg.popularity_rounds):
            j = rnd % len(kinds)
            for kind in kinds[j:] + kinds[:j]:
                names = [s.names[t] for t in layouts[kind]]
                r = _lockstep_quiet(s, methods, cfg.interleaved_steps, names, quiet, bar, start=rnd)
                for m, ts in r["times"].items():
                    times[kind][m] += ts
                prefills[kind].append(r["prefill"])
                rounds[kind].append({"others_cpu": r["others_cpu"], "repeated": r.get("repeated", False),
                                     "ratio_medians": {m: statistics.median(a / b for a, b in zip(
                                         r["times"][m], r["times"]["bare"])) for m in methods}})
                bar.update(1)
    out = {"methods": methods, "labels": {m: method_label(m, cfg) for m in ["bare", *methods]},
           "pool_tenants": len(s.names), "steps_per_run": cfg.interleaved_steps,
           "rounds": cfg.popularity_rounds, "waited_s": quiet.waited_s, "layouts": {}}
    for kind in kinds:
        shares = [x["others_cpu"] for x in rounds[kind] if x["others_cpu"] is not None]
        others = summary(shares) if shares else None
        n = len(times[kind]["bare"])
        out["layouts"][kind] = {
            "row_tenants": layouts[kind], "distinct_tenants": len(set(layouts[kind])),
            "bare_time": summary(times[kind]["bare"]), "runs": rounds[kind], "others_cpu": others,
            "methods": {m: _step_summary(times[kind], m, others, n) for m in methods},
            "prefill": _prefill_ratios(prefills[kind], methods)}
    return out


def run_timing(s: Setup, progress_factory, log=print, deadline=NO_DEADLINE, out: dict | None = None) -> dict:
    """The timed phases: warm-up, decode (alternated generate runs), the decode step under
    CUDA-graph replay (CUDA), prefill, tenant popularity (lockstep) and the interleaved
    cross-check. Past ``deadline`` the optional phases (graph replay, popularity, the
    interleaved cross-check) are skipped and listed under "skipped"; decode and prefill,
    the headline's columns, always run. Each phase's result goes into ``out`` (returned) as soon
    as it is measured."""
    cfg = s.cfg
    methods = list(cfg.methods)
    out = {} if out is None else out
    phases = out["phases_s"] = {}
    skipped = []
    t0 = time.perf_counter()
    # warm-up: every method decodes once (allocator, caches, lazy init) and runs its prefill
    with progress_factory(total=2 * (len(methods) + 1), desc="warm-up") as bar:
        for m in ["bare", *methods]:
            s.generate(m, cfg.warmup_tokens)
            bar.update(1)
            _time_prefill(s, m)
            bar.update(1)
    phases["warm_up"] = time.perf_counter() - t0
    n_decode = 1 + 2 * cfg.rounds * len(methods)
    t0 = time.perf_counter()
    with progress_factory(total=n_decode, desc=f"decode ({cfg.new_tokens} tokens/run)") as bar:
        decode = _alternated(s, methods, cfg.rounds, _time_generate,
                             {"ratio": "step_median_s", "ratio_mean_interval": "step_mean_s",
                              "ratio_total_time": "total_s"}, bar)
    for m in ["bare", *methods]:  # end to end: rows x new tokens / whole generate() wall time
        decode[m]["tokens_per_s"] = summary([r["tokens_per_s"] for r in decode[m]["runs"]])
    phases["decode"] = time.perf_counter() - t0
    out["decode"] = decode
    if cfg.graph_rounds and s.device.type == "cuda":
        if deadline.passed():
            skipped.append("CUDA-graph replay")
        else:
            t0 = time.perf_counter()
            log(f"decode step under CUDA-graph replay ({cfg.graph_rounds} rounds)")
            out["graph"] = graphs.run(s, [m for m in cfg.graph_methods if m in cfg.methods], cfg.graph_rounds,
                                      log=log)
            phases["graph_replay"] = time.perf_counter() - t0
    n_prefill = 1 + 2 * cfg.prefill_rounds * len(methods)
    t0 = time.perf_counter()
    with progress_factory(total=n_prefill, desc="prefill (1 forward)") as bar:
        out["prefill"] = _alternated(s, methods, cfg.prefill_rounds, _time_prefill, {"ratio": "total_s"}, bar)
    phases["prefill"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    interleaved = {}
    if cfg.interleaved_steps and cfg.popularity and deadline.passed():
        skipped.append("tenant popularity")
    elif cfg.interleaved_steps and cfg.popularity:
        out["popularity"] = pop = run_popularity(s, progress_factory)
        if "uniform" in pop["layouts"]:  # the headline's layout: its lockstep column comes from here
            for m, r in pop["layouts"]["uniform"]["methods"].items():
                if m in methods:
                    interleaved[m] = {**r, "source": "tenant popularity, uniform layout"}
    phases["popularity"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    missing = [m for m in methods if m not in interleaved] if cfg.interleaved_steps else []
    if missing and deadline.passed():
        skipped.append("decode steps interleaved")
    elif missing:
        quiet = _Quiet(cfg.max_other_cpu, cfg.max_wait_s / 4)
        with progress_factory(total=len(missing), desc=f"decode, steps interleaved ({cfg.interleaved_steps} each)") as bar:
            for m in missing:
                r = _lockstep_quiet(s, [m], cfg.interleaved_steps, None, quiet, bar)
                interleaved[m] = {**_step_summary(r["times"], m, r["others_cpu"], cfg.interleaved_steps),
                                  "repeated": r.get("repeated", False)}
                bar.update(1)
    phases["decode_interleaved"] = time.perf_counter() - t0
    out["decode_interleaved"] = interleaved
    if skipped:
        log(f"time limit: skipped {', '.join(skipped)}")
        out["skipped"] = [f"{x} (--time-limit)" for x in skipped]
    return out


# ----------------------------------------------------------------- tenant-count sweep
def sweep_config(cfg: ServingConfig) -> ServingConfig:
    """The sweep's own configuration: batch ``sweep_batch`` with adapters for max(sweep_tenants)
    tenants, PARA and BGMV LoRA (random banks: no PEFT model) only."""
    methods = tuple(m for m in ("para", "bgmv_lora") if m in cfg.methods)
    return replace(cfg, batch=cfg.sweep_batch, tenants=max(cfg.sweep_tenants), methods=methods, popularity=(),
                   interleaved_steps=cfg.sweep_steps, notes=[])


def sweep_rows(batch: int, tenants: int) -> list[int]:
    """Row b -> tenant b mod tenants."""
    return [b % tenants for b in range(batch)]


def run_sweep(s: Setup, progress_factory, log=print, deadline=NO_DEADLINE) -> dict:
    """Decode-step ratios to the bare model of PARA and BGMV LoRA at batch ``sweep_batch`` for each
    tenant count K of ``sweep_tenants`` (row b -> tenant b mod K): ``sweep_rounds`` lockstep runs
    of ``sweep_steps`` steps per K (the K order rotating each round), and on a GPU the step under
    CUDA-graph replay. ``s``: a Setup built from :func:`sweep_config`."""
    cfg = s.cfg
    methods = list(cfg.methods)
    ks = list(cfg.sweep_tenants)
    times = {k: {m: [] for m in ["bare", *methods]} for k in ks}
    prefills = {k: [] for k in ks}
    quiet = _Quiet(cfg.max_other_cpu, cfg.max_wait_s / 4)
    _warm_lockstep(s, methods, [s.names[t] for t in sweep_rows(cfg.batch, ks[0])])
    with progress_factory(total=cfg.sweep_rounds * len(ks),
                          desc=f"tenant sweep, batch {cfg.batch} ({cfg.sweep_steps} lockstep steps)") as bar:
        for rnd in range(cfg.sweep_rounds):
            j = rnd % len(ks)
            for k in ks[j:] + ks[:j]:
                names = [s.names[t] for t in sweep_rows(cfg.batch, k)]
                r = _lockstep_quiet(s, methods, cfg.sweep_steps, names, quiet, bar, start=rnd)
                for m, ts in r["times"].items():
                    times[k][m] += ts
                prefills[k].append(r["prefill"])
                bar.update(1)
    out = {"batch": cfg.batch, "tenants": ks, "methods": methods,
           "labels": {m: method_label(m, cfg) for m in ["bare", *methods]},
           "steps_per_run": cfg.sweep_steps, "rounds": cfg.sweep_rounds, "by_tenants": {}}
    for k in ks:
        n = len(times[k]["bare"])
        out["by_tenants"][k] = {"bare_time": summary(times[k]["bare"]),
                                "methods": {m: _step_summary(times[k], m, None, n) for m in methods},
                                "prefill": _prefill_ratios(prefills[k], methods)}
    if cfg.graph_rounds and s.device.type == "cuda":
        for k in ks:
            if deadline.passed():
                out.setdefault("skipped", []).append(f"CUDA-graph replay at {k} tenants (--time-limit)")
                continue
            log(f"  tenant sweep: CUDA-graph replay, {k} tenants")
            names = [s.names[t] for t in sweep_rows(cfg.batch, k)]
            out["by_tenants"][k]["graph"] = graphs.run(s, methods, cfg.graph_rounds, row_names=names, log=log)
    return out


def _run_sweep_guarded(s: Setup, progress_factory, log, deadline=NO_DEADLINE) -> dict:
    """:func:`run_sweep` on a Setup of :func:`sweep_config` sharing ``s``'s backbone; an error
    becomes an entry, never a crash of the whole run."""
    t0 = time.perf_counter()
    sweep = None
    try:
        sweep = Setup(sweep_config(s.cfg), s.device, log=log, backbone=(s.bare, s.tokenizer))
        out = run_sweep(sweep, progress_factory, log=log, deadline=deadline)
    except Exception as e:  # e.g. out of memory at batch 64
        log(f"tenant sweep failed: {type(e).__name__}: {e}")
        out = {"error": f"{type(e).__name__}: {e}"[:600]}
    finally:
        del sweep
        gc.collect()
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
    out["wall_s"] = time.perf_counter() - t0
    return out


def run(cfg: ServingConfig, device: torch.device, *, check: bool, progress_factory, log=print,
        deadline=NO_DEADLINE, time_failed: bool = False, out: dict | None = None) -> dict:
    """One model's serving comparison: set-up, checks, timing, tenant sweep. A failed check
    skips the timing unless ``time_failed``; past ``deadline`` the optional parts are skipped
    (see :func:`run_timing`; the sweep too). ``out``: the dict to fill (returned), part by part
    as each finishes, so that a run interrupted or failing half-way keeps its finished parts."""
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    result = {} if out is None else out
    result.update({"model": cfg.model, "model_name": models.full_name(cfg.model), "config": asdict(cfg),
                   "device": str(device), "methods": {m: method_label(m, cfg) for m in ["bare", *cfg.methods]}})
    s = Setup(cfg, device, log=log)
    result.update({"random_weights": s.shared, "load_s": s.load_s,
                   "row_tenants": s.row_ids, "pool_tenants": len(s.names), "prompt_tokens": list(s.input_ids.shape),
                   "para_backends": {m: s.backends_used(m) for m in cfg.methods if m == "para" or para_backend(m)}
                   if s.para is not None else {},
                   "setup_s": time.perf_counter() - t0})
    if check:
        log("checks:")
        t1 = time.perf_counter()
        result["checks"] = {}
        try:
            run_checks(s, log=log, results=result["checks"])
        except Exception as e:  # noqa: BLE001 - a check that cannot run is a failed check, recorded
            what = f"{type(e).__name__}: {e}"[:500]
            log(f"  a check raised: {what}")
            result["checks"]["checks_raised"] = {"value": float("nan"), "bar": "no exception", "ok": False,
                                                 "what": f"the checks stopped here: {what}"}
        result["checks_s"] = time.perf_counter() - t1
        failed = [k for k, v in result["checks"].items() if isinstance(v, dict) and v.get("ok") is False]
        if failed:
            result["failed_checks"] = failed
            if not time_failed:
                log(f"checks FAILED: {failed}; timing skipped")
                return result
            log(f"checks FAILED: {failed}; timing anyway (--time-after-failed-checks)")
            result["timed_despite_failed_checks"] = True
    run_timing(s, progress_factory, log=log, deadline=deadline, out=result)
    if cfg.sweep_tenants and deadline.passed():
        result.setdefault("skipped", []).append("tenant sweep (--time-limit)")
        log("time limit: tenant sweep skipped")
    elif cfg.sweep_tenants:
        result["sweep"] = _run_sweep_guarded(s, progress_factory, log, deadline=deadline)
        result["phases_s"]["tenant_sweep"] = result["sweep"]["wall_s"]
    result["wall_s"] = time.perf_counter() - t0
    result["setup"] = s  # dropped before serialisation; used by the attribution and profile
    return result
