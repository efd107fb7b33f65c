"""The one correctness checker of the serving comparison (docs/spec.md §4 bars).

``run_checks(setup)`` compares outputs of every method the Setup holds: PARA's rows routed to no
adapter equal the bare model, its adapter rows differ; each forced backend equals the default
dispatch; BGMV LoRA equals PEFT LoRA for the same weights (every rank); (IA)3 equals its vectors
folded into the weights. Each entry: {value, bar, ok, what}. The bench calls it before timing
(and refuses to time a model that fails it, unless --time-after-failed-checks); tests/bench
calls the same function and asserts every entry passes.
"""
from __future__ import annotations

import copy
import gc
from typing import TYPE_CHECKING

import torch

from .methods import para_backend

if TYPE_CHECKING:
    from .serving_setup import Setup


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_checks(s: Setup, log=print, results: dict | None = None) -> dict:
    """Correctness before timing. Each entry: measured value, bar and pass flag. ``results``:
    the dict to fill (returned), check by check."""
    cfg = s.cfg
    results = {} if results is None else results
    tol = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 2e-2}[cfg.dtype]  # docs/spec.md §4 bars

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
                   f"greedy tokens ({cfg.check_tokens} new, through the KV cache) of the None rows "
                   "differ (1) or not (0)")
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
