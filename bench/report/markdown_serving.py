"""The Markdown section of one model's serving run (headline, checks, CUDA-graph replay,
tenant popularity, tenant sweep), rendered from its part of the report JSON (schema.py)."""
from __future__ import annotations

import os

from .tables import (
    GRAPH_HEADER,
    HEADLINE_HEADER,
    contention_line,
    graph_rows,
    headline_rows,
    layout_head,
    popularity_header,
    popularity_ms_rows,
    popularity_prefill_rows,
    popularity_rows,
    sweep_graphed,
    sweep_header,
    sweep_rows,
)
from .text import md_table, model_title, num, short_title


def graph_markdown(serving) -> list[str]:
    g = serving["graph"]
    if g.get("skipped"):
        return []
    return ["### Decode step under CUDA-graph replay", "",
            f"One decode forward (batch {g['batch']}, context {g['context']} positions in a StaticCache, the "
            "headline's rows and adapters) captured into a CUDA graph after the prefill (PARA's scale vectors "
            "are made there and read by the graph) and warm-up forwards; each replay is timed with CUDA events, "
            f"{g['rounds']} rounds of one replay per method (the order rotating each round), the cache position "
            "reset before each replay outside the timed window. The ratio is the median of the per-round ratios "
            "to the bare replay of the same round. Each graph's logits were checked against the same step run "
            "eagerly before timing (bench/scenarios/graphs.py).", "",
            md_table(GRAPH_HEADER, graph_rows(serving)), ""]


def sweep_markdown(serving, files: dict, suffix: str = "") -> list[str]:
    sw = serving["sweep"]
    if sw.get("error"):
        return ["### Tenant-count sweep", "", f"**The sweep failed:** `{sw['error']}`", ""]
    labels = sw.get("labels", {})
    errors = {f"{k} tenants, {m}": err for k, e in sw["by_tenants"].items()
              for m, err in (e.get("graph") or {}).get("errors", {}).items()}
    lines = ["### Tenant-count sweep: decode-step ratio to the bare model", "",
             f"Batch {sw['batch']}, row b → tenant b mod K, every method holding adapters for "
             f"{max(sw['tenants'])} tenants ({', '.join(f'{m} = {labels.get(m, m)}' for m in sw['methods'])}; "
             "BGMV banks drawn at random, no PEFT model). Eager: the bare model and the methods decode "
             f"{sw['steps_per_run']} greedy steps in lockstep, {sw['rounds']} runs per K (the K order rotating), the "
             "ratio being the median of the per-step ratios to the bare step; the prefill ratio is per run."
             + (" Graph: the decode step under CUDA-graph replay as above, per K." if sweep_graphed(sw) else ""), "",
             md_table(sweep_header(sw), sweep_rows(sw, labels)), ""]
    if errors:
        lines += ["CUDA-graph failures: " + "; ".join(f"{k}: `{v[:200]}`" for k, v in errors.items()), ""]
    if sw.get("skipped"):
        lines += [f"Not run (time limit): {'; '.join(sw['skipped'])}.", ""]
    if files.get("sweep_png" + suffix):
        lines += [f"![ratio to bare vs tenant count]({os.path.basename(files['sweep_png' + suffix])})", ""]
    return lines


def _lockstep_text(serving) -> str:
    pop = serving.get("popularity")
    cfg = serving["config"]
    if pop and "uniform" in pop["layouts"]:
        return (f"taken from the tenant-popularity table's uniform layout (below): the bare model and all its "
                f"methods decode {pop['steps_per_run']} greedy steps in lockstep, {pop['rounds']} times (model "
                "forwards with their own KV caches, the order rotating every step)")
    return (f"the method and the bare model decode {cfg.get('interleaved_steps', 0)} greedy steps in lockstep "
            "(model forwards with their own KV caches, the order alternating every step)")


def popularity_markdown(serving, files: dict, suffix: str = "") -> list[str]:
    pop, cfg = serving["popularity"], serving["config"]
    layouts = pop["layouts"]
    assign = "; ".join(f"{k}: {lay['row_tenants']}" for k, lay in layouts.items())
    lines = [f"### Tenant popularity: decode-step ratio to the bare model ({short_title(serving)})", "",
             f"The headline's batch ({cfg['batch']} rows, {cfg['prompt_len']}-token prompts) with its rows assigned "
             f"to tenants four ways: distinct (every row its own tenant), uniform (row b → tenant b mod "
             f"{cfg['tenants']}, the headline's layout), zipf (each row's tenant drawn from {pop['pool_tenants']} "
             f"with probability ∝ 1/k^{cfg['zipf_s']}, seed {cfg['seed']}) and identical (every row tenant 0). "
             f"Rows → tenants: {assign}. Every method holds adapters for {pop['pool_tenants']} tenants; LoRA runs "
             f"at ranks {', '.join(str(r) for r in cfg['lora_ranks'])}. For each layout the bare model and every "
             f"method decode {pop['steps_per_run']} greedy steps in lockstep from their own prefill and KV cache "
             "(one forward each per step, the order rotating every step); each method's step time is divided by "
             "the bare model's step time of the same step, and the table gives the median of those per-step "
             f"ratios [IQR] over {pop['rounds']} such runs per layout (the layout order rotating each run), all in "
             "one process.", "",
             md_table(popularity_header(pop), popularity_rows(pop)), "",
             "ms per decode step, median [IQR]:", "",
             md_table(["method"] + [layout_head(pop, k) for k in layouts], popularity_ms_rows(pop)), ""]
    prefill = popularity_prefill_rows(pop)
    if prefill:
        lines += ["Prefill per layout: the prefill forward that starts each lockstep run (input_ids [B, T] → KV "
                  "cache and the last position's logits, synchronised before and after, the order rotating each "
                  f"run), as a ratio to the bare prefill of the same run, median [IQR] over the {pop['rounds']} "
                  "runs:", "", md_table(["method"] + [layout_head(pop, k) + ", ratio [IQR]" for k in layouts],
                                         prefill), ""]
    shares = [lay["others_cpu"]["max"] for lay in layouts.values() if lay.get("others_cpu")]
    repeated = sum(r.get("repeated", False) for lay in layouts.values() for r in lay["runs"])
    if shares:
        lines += [f"Other processes used at most {max(shares):.1%} of the CPUs during a lockstep run; {repeated} "
                  f"run(s) repeated because they used more than {num(cfg['max_other_cpu']):.0%}, "
                  f"{pop.get('waited_s', 0):.0f} s spent waiting for a quiet machine.", ""]
    if files.get("popularity_png" + suffix):
        lines += [f"![ratio to bare per popularity layout]({os.path.basename(files['popularity_png' + suffix])})", ""]
    return lines


def _prompt_text(serving) -> str:
    cfg = serving["config"]
    if serving.get("random_weights"):
        return f"prompts of exactly {cfg['prompt_len']} random token ids (seed {cfg['seed']}; no tokenizer)"
    return f"prompts of exactly {cfg['prompt_len']} tokens"


def _backend_text(serving) -> str:
    """Which backend ran each PARA op for every PARA method (dispatch, as measured)."""
    used = serving.get("para_backends") or {}
    if len(used) <= 1:
        return ""
    parts = [f"`{m}`: " + ", ".join(f"{op} → {b}" for op, b in ops.items()) for m, ops in used.items()]
    return ("PARA through each backend: the same PARA model, with `para_kernels.ops.set_backend(X)` around each "
            "of its calls (`para` is the default dispatch; an op a backend lacks falls back). Ops ran on: "
            + "; ".join(parts) + ".")


def serving_markdown(serving, files: dict, suffix: str = "") -> list[str]:
    """The Markdown section of one model's serving run: headline, checks, CUDA-graph replay,
    popularity, tenant sweep."""
    if "config" not in serving:  # the run raised
        return [f"## Headline: {serving.get('model', '?')}", "",
                f"**The serving run failed:** `{serving.get('error', '?')}`", ""]
    cfg = serving["config"]
    failed_part_way = ([f"**The serving run failed part-way** (the sections below are what finished before): "
                        f"`{serving['error']}`", ""] if serving.get("error") else [])
    pool = serving.get("pool_tenants", cfg["tenants"])
    title = model_title(serving)
    lines = [f"## Headline: multi-tenant greedy decode of {title}", "",
             f"Batch of {cfg['batch']} rows from {cfg['tenants']} tenants (row b → tenant b mod "
             f"{cfg['tenants']}), {_prompt_text(serving)}, "
             f"min_new_tokens = max_new_tokens = {cfg['new_tokens']}, {cfg['dtype']}, one process. "
             f"Runs alternate with the bare model (bare, m1, bare, m2, …, bare; the method order rotates each "
             f"round; {cfg['rounds']} runs per method after one warm-up generate per method). A run's time per "
             f"token is the median of its {cfg['new_tokens'] - 1} decode-step intervals (stamped by a logits "
             "processor); each method run is divided by the mean of the two bare runs beside it, and the "
             "ratio reported is the median of those per-run ratios, with its interquartile range. "
             "\"ratio (mean step)\" uses the mean step interval instead; \"ratio (whole generate)\" the "
             f"wall time of the whole generate() call (prefill included). \"Steps interleaved\": a cross-check "
             f"with less noise — {_lockstep_text(serving)}, and the ratio is the median of the per-step "
             "ratios to the bare forward of the same step. \"generate() tokens/s\": end to end, rows × new "
             "tokens / wall time of the whole generate() call (prefill included), median over the runs. "
             "Prefill: one forward of the prompt "
             f"batch (use_cache=True, logits of the last position, as generate's prefill), {cfg['prefill_rounds']} "
             "alternated runs per method.", "",
             f"Methods (each holds adapters for {pool} tenants; the headline's rows use {cfg['tenants']} of them): "
             "PARA — r = 12, q/v/up, random W_up ~ N(0, "
             f"{cfg['para_w_up_std']}²), b_up ~ N(0, {cfg['para_b_up_std']}²), "
             "`PARAModel.generate(adapter_names=...)`; "
             f"PEFT LoRA — r = {cfg['lora_r']}, alpha = {cfg['lora_alpha']}, q_proj + v_proj, one adapter per tenant "
             f"and rank via `add_adapter`, lora_B ~ N(0, {cfg['lora_b_std']}²), `generate(adapter_names=...)`; "
             "BGMV-style "
             "LoRA — the same weights, per-row gathered A[ids] [B,d,r] and B[ids] [B,r,n] with `bmm`/`baddbmm` "
             "in forward hooks on q_proj and v_proj (bench/scenarios/lora_baselines.py); "
             "(IA)³ — per-tenant vectors 1 + N(0, "
             f"{cfg['ia3_std']}²) on the outputs of k_proj, v_proj and up_proj, gathered per row once per batch, "
             "applied in forward hooks."
             + (" Every method's copy of the model shares the random weights (one backbone in device memory)."
                if serving.get("random_weights") else ""),
             ""]
    lines += failed_part_way
    if _backend_text(serving):
        lines += [_backend_text(serving), ""]
    if "decode" in serving:
        lines += [md_table(HEADLINE_HEADER, headline_rows(serving)), ""]
        for phase in ("decode", "prefill"):
            line = contention_line(serving.get(phase) or {}, phase.capitalize(), cfg["max_other_cpu"])
            if line:
                lines += [line, ""]
        if files.get("ratios_png" + suffix):
            lines += [f"![ratios to the bare model]({os.path.basename(files['ratios_png' + suffix])})", ""]
    if "checks" in serving:
        lines += ["### Correctness checks (run before timing)", "",
                  md_table(["check", "measured", "bar", "ok", "what"],
                            [[k, f"{num(v['value']):.3g}", v["bar"], "yes" if v["ok"] else "**NO**", v["what"]]
                             for k, v in serving["checks"].items() if isinstance(v, dict) and "ok" in v]), ""]
        vs = serving["checks"].get("para_vector_stats")
        if vs:
            lines += [f"PARA vectors in the check's prefill: |v − 1| mean {num(vs['abs_mean']):.4f}, "
                      f"std {num(vs['std']):.4f}, "
                      f"range [{vs['min']:.3f}, {vs['max']:.3f}].", ""]
    if serving.get("graph"):
        lines += graph_markdown(serving)
    if serving.get("popularity"):
        lines += popularity_markdown(serving, files, suffix)
    if serving.get("sweep"):
        lines += sweep_markdown(serving, files, suffix)
    if serving.get("failed_checks"):
        if serving.get("timed_despite_failed_checks"):
            lines += [f"**Checks failed: {serving['failed_checks']}; timed anyway (--time-after-failed-checks): "
                      "read the timings with the failed checks in mind.**", ""]
        else:
            lines += [f"**Checks failed: {serving['failed_checks']}; timing was skipped.**", ""]
    if serving.get("skipped"):
        lines += [f"Not run (time limit): {'; '.join(serving['skipped'])}.", ""]
    return lines
