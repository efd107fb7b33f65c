"""Console table, JSON, Markdown and PNG plots of one benchmark run."""
from __future__ import annotations

import json
import math
import os
import sys

METHOD_ORDER = ("para", "para_none", "peft_lora", "bgmv_lora", "ia3", "bare_again")  # JSON without "methods"


def _ms(x):
    return f"{1e3 * x:.2f}"


def _us(x):
    return f"{1e6 * x:.1f}"


def _ratio(s):
    return f"{s['median']:.3f} [{s['q1']:.3f}, {s['q3']:.3f}]"


def _ms_iqr(t):
    """A time summary in ms: 'median [q1, q3]'."""
    return f"{_ms(t['median'])} [{_ms(t['q1'])}, {_ms(t['q3'])}]"


def _methods(serving):
    """The measured methods (bare excluded), in the run's order."""
    order = list(serving.get("methods") or ()) or list(METHOD_ORDER)
    return [m for m in order if m != "bare" and m in serving.get("decode", {})]


def serving_parts(result) -> list[dict]:
    """Every model's serving result: result["serving"] (the first model) and result["serving_more"]."""
    return [p for p in [result.get("serving"), *result.get("serving_more", [])] if p]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def part_suffix(result, i: int) -> str:
    """File-name suffix of the i-th serving part's plots: '' for the first, '-<model>' after."""
    return "" if i == 0 else "-" + _slug(serving_parts(result)[i].get("model", str(i)))


def _tokens_per_s(entry) -> str:
    t = entry.get("tokens_per_s")
    return "" if not t else f"{t['median']:.1f}"


# ----------------------------------------------------------------- tables
def headline_rows(serving) -> list[list[str]]:
    dec, pre = serving["decode"], serving.get("prefill") or {}  # no prefill: a run cut short
    inter = serving.get("decode_interleaved") or {}
    labels = serving.get("methods") or {}
    rows = [["bare backbone", _ms(dec["bare"]["time"]["median"]), "1", "", "", "1" if inter else "",
             _tokens_per_s(dec["bare"]), _ms(pre["bare"]["time"]["median"]) if pre else "", "1" if pre else ""]]
    for m in _methods(serving):
        rows.append([labels.get(m, m), _ms(dec[m]["time"]["median"]), _ratio(dec[m]["ratio"]),
                     f"{dec[m]['ratio_mean_interval']['median']:.3f}", f"{dec[m]['ratio_total_time']['median']:.3f}",
                     _ratio(inter[m]["ratio"]) if m in inter else "", _tokens_per_s(dec[m]),
                     _ms(pre[m]["time"]["median"]) if m in pre else "", _ratio(pre[m]["ratio"]) if m in pre else ""])
    return rows


HEADLINE_HEADER = ["method", "decode ms/token", "decode ratio to bare, median [IQR]",
                   "ratio (mean step)", "ratio (whole generate)", "ratio, steps interleaved [IQR]",
                   "generate() tokens/s", "prefill ms", "prefill ratio, median [IQR]"]


def graph_rows(serving) -> list[list[str]]:
    """The decode step under CUDA-graph replay: ms per step [IQR], ratio to bare [IQR], and the
    replay-vs-eager logits check, per method; failures as rows."""
    g = serving["graph"]
    labels = serving.get("methods", {})
    rows = []
    for m, e in g["methods"].items():
        t = e["time"]
        rows.append([labels.get(m, m), _ms_iqr(t),
                     "1" if m == "bare" else _ratio(e["ratio"]), f"{e['check']['value']:.2g}", ""])
    for m, err in g.get("errors", {}).items():
        rows.append([labels.get(m, m), "", "", "", "failed: " + err.replace("|", "/").replace("\n", " ")[:240]])
    return rows


GRAPH_HEADER = ["method", "ms per decode step, median [IQR]", "ratio to bare, median [IQR]",
                "replay vs eager logits (rel.)", "error"]


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
            "eagerly before timing (bench/graphs.py).", "",
            _md_table(GRAPH_HEADER, graph_rows(serving)), ""]


def _sweep_graphed(sweep) -> bool:
    return any(e.get("graph") and not e["graph"].get("skipped") for e in sweep["by_tenants"].values())


def sweep_rows(sweep, labels) -> list[list[str]]:
    """Per tenant count: bare ms per step, each method's lockstep ratio [IQR] and prefill ratio,
    and (where graphs ran) the bare replay ms and each method's replay ratio [IQR]."""
    rows = []
    for k, e in sweep["by_tenants"].items():
        row = [str(k), _ms(e["bare_time"]["median"])]
        row += [_ratio(e["methods"][m]["ratio"]) for m in sweep["methods"]]
        row += [_ratio(e["prefill"][m]["ratio"]) for m in sweep["methods"]]
        if _sweep_graphed(sweep):
            g = e.get("graph") or {}
            gm = g.get("methods", {})
            row.append(_ms(gm["bare"]["time"]["median"]) if "bare" in gm else "")
            row += [_ratio(gm[m]["ratio"]) if m in gm else ("failed" if m in g.get("errors", {}) else "")
                    for m in sweep["methods"]]
        rows.append(row)
    return rows


def sweep_header(sweep) -> list[str]:
    ms = sweep["methods"]
    head = (["tenants", "bare ms/step (eager)"] + [f"{m} ratio, eager lockstep [IQR]" for m in ms]
            + [f"{m} prefill ratio [IQR]" for m in ms])
    if _sweep_graphed(sweep):
        head += ["bare ms/step (graph)"] + [f"{m} ratio, graph replay [IQR]" for m in ms]
    return head


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
             + (" Graph: the decode step under CUDA-graph replay as above, per K." if _sweep_graphed(sw) else ""), "",
             _md_table(sweep_header(sw), sweep_rows(sw, labels)), ""]
    if errors:
        lines += ["CUDA-graph failures: " + "; ".join(f"{k}: `{v[:200]}`" for k, v in errors.items()), ""]
    if sw.get("skipped"):
        lines += [f"Not run (time limit): {'; '.join(sw['skipped'])}.", ""]
    if files.get("sweep_png" + suffix):
        lines += [f"![ratio to bare vs tenant count]({os.path.basename(files['sweep_png' + suffix])})", ""]
    return lines


def _md_table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _text_table(header, rows) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*[str(c) for c in r]) for r in rows]
    return "\n".join(lines)


def ops_rows(ops, model=None, batch=None) -> list[list[str]]:
    rows = []
    for r in ops["rows"]:
        if (model is not None and r["model"] != model) or (batch is not None and r["B"] != batch):
            continue
        t = r["time"]
        rows.append([r["backend"], r["dtype"], r["model"], r["op"], r["variant"], r["direction"], r["B"], r["T"],
                     _us(t["median"]), _us(t["iqr"]), t["n"], f"{r['bytes'] / 1e6:.3f}", f"{r['gb_per_s']:.2f}",
                     f"{r['frac_of_copy_bw']:.3f}", f"{r['floor_over_time']:.3f}"])
    return rows


OPS_HEADER = ["backend", "dtype", "model", "op", "variant", "dir", "B", "T", "median us", "IQR us", "runs",
              "MB moved", "GB/s", "of copy BW", "floor/time"]


def attribution_rows(attr) -> list[list[str]]:
    rows = []
    for name, p in attr["pieces"].items():
        rows.append([name, _us(p["per_call_s"]), p["calls"],
                     _ms(p["per_token_s"]), p["what"]])
    return rows


ATTR_HEADER = ["piece", "us per call", "calls per token", "ms per token", "what"]


def _layout_head(pop, kind) -> str:
    lay = pop["layouts"][kind]
    return f"{kind} ({lay['distinct_tenants']} tenant{'s' if lay['distinct_tenants'] != 1 else ''})"


def popularity_header(pop) -> list[str]:
    return ["method"] + [_layout_head(pop, k) + ", ratio [IQR]" for k in pop["layouts"]]


def _layout_rows(pop, kinds, bare_label, bare_time, cell) -> list[list[str]]:
    """One row per popularity method, one column per layout in ``kinds``; first row: the bare
    model's time ``bare_time(layout)``; cells ``cell(layout, method)``."""
    rows = [[bare_label] + [_ms_iqr(bare_time(k)) for k in kinds]]
    return rows + [[pop["labels"][m]] + [cell(k, m) for k in kinds] for m in pop["methods"]]


def popularity_rows(pop) -> list[list[str]]:
    """Ratio to the bare decode step, per method (rows) and layout (columns); first row: the
    bare model's ms per step."""
    lay = pop["layouts"]
    return _layout_rows(pop, list(lay), "bare backbone, ms per step [IQR]", lambda k: lay[k]["bare_time"],
                        lambda k, m: _ratio(lay[k]["methods"][m]["ratio"]))


def popularity_prefill_rows(pop) -> list[list[str]]:
    """Prefill ratio to the bare model per method and layout (first row: bare prefill ms)."""
    lay = pop["layouts"]
    kinds = [k for k in lay if lay[k].get("prefill")]
    if not kinds:
        return []
    return _layout_rows(pop, kinds, "bare backbone, prefill ms [IQR]", lambda k: lay[k]["prefill"]["bare"]["time"],
                        lambda k, m: _ratio(lay[k]["prefill"][m]["ratio"]))


def popularity_ms_rows(pop) -> list[list[str]]:
    """ms per decode step of every method, per layout, median [IQR]."""
    lay = pop["layouts"]
    return [[pop["labels"][m]] + [_ms_iqr(lay[k]["methods"][m]["time"]) for k in lay] for m in pop["methods"]]


def compile_rows(ops, batch=None) -> list[list[str]]:
    """The compiled reference beside the eager public op and the eager reference function."""
    eager = {(r["model"], r["op"], r["variant"], r["B"], r["T"], r["dtype"]): r["time"]
             for r in ops["rows"] if r["backend"] == "reference" and r["direction"] == "forward"}
    rows = []
    for c in ops.get("compiled", []):
        if batch is not None and c["B"] != batch:
            continue
        op_t = eager.get((c["model"], c["op"], c["variant"], c["B"], c["T"], c["dtype"]))
        head = [c["dtype"], c["model"], c["op"], c["variant"], c["B"], c["T"],
                _us(op_t["median"]) if op_t else ""]
        if c.get("error"):
            rows.append(head + ["", "", "", "", "", "", "failed: " + c["error"].replace("|", "/").replace("\n", " ")[:200]])
            continue
        fe, ct = c["eager_function_time"], c["compiled_time"]
        rows.append(head + [f"{_us(fe['median'])} [{_us(fe['iqr'])}]", f"{_us(ct['median'])} [{_us(ct['iqr'])}]",
                            f"{fe['median'] / ct['median']:.2f}", f"{c['compile_s']:.2f}", c["graphs"],
                            f"{c['max_abs_diff']:.2g}", ""])
    return rows


def compile_scope(cfg: dict) -> str:
    """Which cases were compiled, in words (each compile takes seconds, so a subset may be)."""
    parts = []
    for key, what in (("compile_batches", "B"), ("compile_models", "model"), ("compile_dtypes", "dtype"),
                      ("compile_prompt_lens", "T")):
        chosen = cfg.get(key)
        if chosen:
            parts.append(f"{what} = {' / '.join(str(c) for c in chosen)}")
    return "at every shape and dtype" if not parts else "at " + ", ".join(parts)


COMPILE_HEADER = ["dtype", "model", "op", "variant", "B", "T", "public op, eager: median us",
                  "reference fn, eager: median [IQR] us", "reference fn, compiled: median [IQR] us",
                  "eager fn / compiled", "compile s", "graphs", "max |compiled - eager|", "error"]


def phases_line(result) -> str | None:
    """Seconds each part of the run took, in the order they ran."""
    serving = result.get("serving") or {}
    parts = {"setup": serving.get("setup_s"), "checks": serving.get("checks_s"),
             **(serving.get("phases_s") or {}),
             **{k: v for k, v in (result.get("phases_s") or {}).items() if k != "serving"}}
    parts = {k: v for k, v in parts.items() if v and v >= 0.5}
    if not parts:
        return None
    return "Time by part: " + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in parts.items()) + "."


def contention_line(part: dict, what: str, limit: float) -> str | None:
    """One sentence on what other processes did during the timed runs of ``part``."""
    oc = part.get("others_cpu")
    if oc is None:
        return None
    return (f"{what}: other processes used a median {oc['median']:.1%} (max {oc['max']:.1%}) of the CPUs "
            f"during the timed runs; {part.get('retried_runs', 0)} run(s) repeated because others used more "
            f"than {limit:.0%}, {part.get('contended_runs_kept', 0)} kept over the limit after the retry budget, "
            f"{part.get('waited_s', 0):.0f} s spent waiting for a quiet machine.")


def ops_contention(ops) -> str | None:
    shares = [r["others_cpu"] for r in ops["rows"] if r.get("others_cpu") is not None]
    if not shares:
        return None
    busy = sum(x > 0.1 for x in shares)
    return (f"Other processes used a median {sorted(shares)[len(shares) // 2]:.1%} (max {max(shares):.1%}) of "
            f"the CPUs during the op cases; {busy} of {len(shares)} cases had more than 10%.")


def serving_console(serving, env) -> list[str]:
    """The console lines of one model's serving run."""
    out = []
    if "config" not in serving:
        return [f"\n{serving.get('model', '?')}: the serving run failed: {serving.get('error', '?')}"]
    cfg = serving["config"]
    title = _short_title(serving)
    if serving.get("error"):
        out.append(f"\n{title}: the serving run failed part-way: {serving['error']}")
    if "decode" in serving:
        out.append(f"\nHeadline — {title}: greedy decode, batch {cfg['batch']} from {cfg['tenants']} tenants, "
                   f"prompt {cfg['prompt_len']} tokens, {cfg['new_tokens']} new tokens, {cfg['dtype']}, "
                   f"{cfg['rounds']} alternated runs per method ({env['device_name']}, {env['torch_threads']} threads)")
        out.append(_text_table(HEADLINE_HEADER, headline_rows(serving)))
        for phase in ("decode", "prefill"):
            line = contention_line(serving.get(phase) or {}, phase, cfg["max_other_cpu"])
            if line:
                out.append(line)
    g = serving.get("graph")
    if g and not g.get("skipped"):
        out.append(f"\n{title}: decode step under CUDA-graph replay ({g['rounds']} rounds, batch {g['batch']}):")
        out.append(_text_table(GRAPH_HEADER, graph_rows(serving)))
    pop = serving.get("popularity")
    if pop:
        out.append(f"\n{title}, tenant popularity: decode-step ratio to the bare model, median [IQR] of "
                   f"{pop['rounds']} x {pop['steps_per_run']} lockstep steps per layout (adapters for "
                   f"{pop['pool_tenants']} tenants per method):")
        out.append(_text_table(popularity_header(pop), popularity_rows(pop)))
        prefill = popularity_prefill_rows(pop)
        if prefill:
            out.append("prefill ratio to bare per layout, median [IQR] over the runs:")
            out.append(_text_table(popularity_header(pop), prefill))
    sw = serving.get("sweep")
    if sw:
        if sw.get("error"):
            out.append(f"\n{title}, tenant sweep failed: {sw['error']}")
        else:
            out.append(f"\n{title}, tenant-count sweep at batch {sw['batch']} (row b -> tenant b mod K):")
            out.append(_text_table(sweep_header(sw), sweep_rows(sw, sw.get("labels", {}))))
    if "checks" in serving:
        bad = [k for k, v in serving["checks"].items() if isinstance(v, dict) and v.get("ok") is False]
        out.append(f"{title} checks: " + ("all passed" if not bad else f"FAILED {bad}"))
    skipped = serving.get("skipped", []) + ((serving.get("sweep") or {}).get("skipped") or [])
    if skipped:
        out.append(f"{title}: not run (time limit): {'; '.join(skipped)}")
    return out


def console(result) -> str:
    out = []
    for serving in serving_parts(result):
        out += serving_console(serving, result["env"])
    attr = result.get("attribution")
    if attr:
        out.append("\nPARA decode overhead, piece by piece (measured in isolation):")
        out.append(_text_table(ATTR_HEADER[:4], [r[:4] for r in attribution_rows(attr)]))
        delta = attr.get("measured_decode_delta_s")
        inter = attr.get("measured_interleaved_delta_s")
        out.append(f"sum {_ms(attr['sum_per_token_s'])} ms/token; measured PARA - bare decode step: "
                   + ("n/a" if delta is None else f"{_ms(delta)} ms/token (generate runs)")
                   + ("" if inter is None else f", {_ms(inter)} ms/token (steps interleaved)"))
    ops = result.get("ops")
    if ops:
        batches = sorted({r["B"] for r in ops["rows"]})
        b = 8 if 8 in batches else (batches[len(batches) // 2] if batches else None)
        out.append(f"\nOp microbenchmarks (copy bandwidth {ops['rates']['copy']['bytes_per_s'] / 1e9:.1f} GB/s); "
                   f"B = {b} shown, every shape in the Markdown report:")
        out.append(_text_table(OPS_HEADER, ops_rows(ops, batch=b)))
        if ops.get("compiled"):
            out.append(f"\nReference under torch.compile (forward, B = {b} shown):")
            out.append(_text_table(COMPILE_HEADER, compile_rows(ops, batch=b)))
    out.append(f"\nruntime {result['runtime_s']:.0f} s")
    line = phases_line(result)
    if line:
        out.append(line)
    return "\n".join(out)


# ----------------------------------------------------------------- files
def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items() if k != "setup"}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


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
    lines = [f"### Tenant popularity: decode-step ratio to the bare model ({_short_title(serving)})", "",
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
             _md_table(popularity_header(pop), popularity_rows(pop)), "",
             "ms per decode step, median [IQR]:", "",
             _md_table(["method"] + [_layout_head(pop, k) for k in layouts], popularity_ms_rows(pop)), ""]
    prefill = popularity_prefill_rows(pop)
    if prefill:
        lines += ["Prefill per layout: the prefill forward that starts each lockstep run (input_ids [B, T] → KV "
                  "cache and the last position's logits, synchronised before and after, the order rotating each "
                  f"run), as a ratio to the bare prefill of the same run, median [IQR] over the {pop['rounds']} "
                  "runs:", "", _md_table(["method"] + [_layout_head(pop, k) + ", ratio [IQR]" for k in layouts],
                                         prefill), ""]
    shares = [lay["others_cpu"]["max"] for lay in layouts.values() if lay.get("others_cpu")]
    repeated = sum(r.get("repeated", False) for lay in layouts.values() for r in lay["runs"])
    if shares:
        lines += [f"Other processes used at most {max(shares):.1%} of the CPUs during a lockstep run; {repeated} "
                  f"run(s) repeated because they used more than {cfg['max_other_cpu']:.0%}, "
                  f"{pop.get('waited_s', 0):.0f} s spent waiting for a quiet machine.", ""]
    if files.get("popularity_png" + suffix):
        lines += [f"![ratio to bare per popularity layout]({os.path.basename(files['popularity_png' + suffix])})", ""]
    return lines


def _model_title(serving) -> str:
    return serving.get("model_name") or "SmolLM2-135M-Instruct"


def _short_title(serving) -> str:
    """The model's name without its shapes: 'LLaMA-2-7B shapes, random weights'."""
    return _model_title(serving).split(" (")[0]


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
    title = _model_title(serving)
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
             f"{cfg['para_w_up_std']}²), b_up ~ N(0, {cfg['para_b_up_std']}²), `PARAModel.generate(adapter_names=...)`; "
             f"PEFT LoRA — r = {cfg['lora_r']}, alpha = {cfg['lora_alpha']}, q_proj + v_proj, one adapter per tenant "
             f"and rank via `add_adapter`, lora_B ~ N(0, {cfg['lora_b_std']}²), `generate(adapter_names=...)`; BGMV-style "
             "LoRA — the same weights, per-row gathered A[ids] [B,d,r] and B[ids] [B,r,n] with `bmm`/`baddbmm` "
             f"in forward hooks on q_proj and v_proj (bench/lora.py); (IA)³ — per-tenant vectors 1 + N(0, "
             f"{cfg['ia3_std']}²) on the outputs of k_proj, v_proj and up_proj, gathered per row once per batch, "
             "applied in forward hooks." + (" Every method's copy of the model shares the random weights "
                                             "(one backbone in device memory)." if serving.get("random_weights") else ""),
             ""]
    lines += failed_part_way
    if _backend_text(serving):
        lines += [_backend_text(serving), ""]
    if "decode" in serving:
        lines += [_md_table(HEADLINE_HEADER, headline_rows(serving)), ""]
        for phase in ("decode", "prefill"):
            line = contention_line(serving.get(phase) or {}, phase.capitalize(), cfg["max_other_cpu"])
            if line:
                lines += [line, ""]
        if files.get("ratios_png" + suffix):
            lines += [f"![ratios to the bare model]({os.path.basename(files['ratios_png' + suffix])})", ""]
    if "checks" in serving:
        lines += ["### Correctness checks (run before timing)", "",
                  _md_table(["check", "measured", "bar", "ok", "what"],
                            [[k, f"{v['value']:.3g}", v["bar"], "yes" if v["ok"] else "**NO**", v["what"]]
                             for k, v in serving["checks"].items() if isinstance(v, dict) and "ok" in v]), ""]
        vs = serving["checks"].get("para_vector_stats")
        if vs:
            lines += [f"PARA vectors in the check's prefill: |v − 1| mean {vs['abs_mean']:.4f}, std {vs['std']:.4f}, "
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


def markdown(result, files: dict) -> str:
    env = result["env"]
    git = env["git"]
    lines = [f"# para_kernels benchmark — {env['device_name']}", "",
             f"Generated by `python -m bench {' '.join(result['argv'])}` on {env['date_utc']} "
             f"in {result['runtime_s']:.0f} s. Every number below was measured in that run.", "",
             "| | |", "| --- | --- |",
             f"| device | {env['device']} — {env['device_name']} |",
             f"| CPU | {env['cpu_model']} ({env['cpu_count']} cores visible, torch threads {env['torch_threads']}) |",
             f"| load average before / after | {env.get('loadavg_before')} / {env.get('loadavg_after')} |",
             f"| torch / transformers / peft | {env['torch']} / {env['transformers']} / {env['peft']} |",
             f"| para_kernels | {env['para_kernels']}, commit {git['commit']}{' (uncommitted changes)' if git['dirty'] else ''} |",
             f"| python / platform | {env['python']} / {env['platform']} |", ""]
    if phases_line(result):
        lines += [phases_line(result), ""]
    if result.get("partial"):
        lines += ["> **Partial report:** written while the run was still going (after the serving comparison "
                  "of each model); the parts not listed here had not run yet.", ""]
    for w in result.get("warnings", []):
        lines += [f"> **Warning:** {w}", ""]
    for i, serving in enumerate(serving_parts(result)):
        lines += serving_markdown(serving, files, part_suffix(result, i))
    attr = result.get("attribution")
    if attr:
        delta = attr.get("measured_decode_delta_s")
        lines += [f"## Where PARA's decode overhead comes from ({_model_title(result.get('serving') or {})})", "",
                  f"Each piece of PARA's decode path timed in isolation on the real modules with decode-sized "
                  f"tensors ({attr['batch']} rows × 1 token), times the number of calls per decode step "
                  f"({attr['layers']} layers). {attr['note']}.", "",
                  _md_table(ATTR_HEADER, attribution_rows(attr)), "",
                  f"Sum: {_ms(attr['sum_per_token_s'])} ms per token. Measured PARA − bare decode step: "
                  + ("n/a" if delta is None else f"{_ms(delta)} ms per token from the generate runs "
                     "((median ratio − 1) × bare ms/token)")
                  + ("" if attr.get("measured_interleaved_delta_s") is None else
                     f", {_ms(attr['measured_interleaved_delta_s'])} ms per token from the interleaved steps")
                  + ".", ""]
        prof = attr.get("decode_step_profile")
        if prof:
            lines += ["para_kernels functions in one profiled decode step (cProfile; its own overhead inflates "
                      "these times, the call counts are exact):", "",
                      _md_table(["function", "calls per decode step", "own time ms", "cumulative ms"],
                                [[r["function"], r["calls"], _ms(r["tottime_s"]), _ms(r["cumtime_s"])]
                                 for r in prof]), ""]
    if result.get("profile_file"):
        lines += [f"cProfile / torch.profiler of PARA and bare decoding: [{os.path.basename(result['profile_file'])}]"
                  f"({os.path.basename(result['profile_file'])}).", ""]
    ops = result.get("ops")
    if ops:
        rates = ops["rates"]
        lines += ["## Op microbenchmarks", "",
                  f"Backends: {', '.join(ops['backends'])}. Timer: {ops['timer']}. Bytes: each input read once, each "
                  "output written once (the minimum the op must move). Copy bandwidth "
                  f"{rates['copy']['bytes_per_s'] / 1e9:.2f} GB/s ({rates['copy']['what']}); "
                  + "; ".join(f"{k.replace('matmul_', '')} matmul {v['flops_per_s'] / 1e9:.1f} GFLOP/s (n = {v['n']})"
                              for k, v in rates.items() if k.startswith("matmul_"))
                  + ". floor/time = max(bytes / copy rate, FLOPs / matmul rate) / median time (1 = at the floor). "
                  "Forward: the public `para_kernels.ops` function under no_grad; backward: the "
                  "`torch.ops.para.*_backward` op. scale and scaled_glu act on the FFN up projection's output "
                  "(n = n_u); scaled_linear is the q projection at decode; pool_generate uses the last-token "
                  "pooler. A case a backend cannot run is listed under errors in the JSON.", ""]
        fb = ops.get("fallbacks") or {}
        if fb:
            lines += ["Ops a backend does not implement run on another through dispatch's fallback, so they have "
                      "rows under that backend only: " + "; ".join(
                          f"{b}: " + ", ".join(f"{op} → {to}" for op, to in sorted(m.items())) for b, m in fb.items())
                      + ".", ""]
        if ops.get("skipped_cases"):
            lines += [f"Time limit: {ops['skipped_cases']} case(s) were not run.", ""]
        if ops.get("interrupted"):
            lines += ["The op suite was interrupted: the rows below are those measured before.", ""]
        line = ops_contention(ops)
        if line:
            lines += [line, ""]
        if files.get("ops_png"):
            lines += [f"![op time vs batch size]({os.path.basename(files['ops_png'])})", ""]
        if files.get("ops_backends_png"):
            lines += [f"![forward time vs batch size per backend]({os.path.basename(files['ops_backends_png'])})", ""]
        lines += [_md_table(OPS_HEADER, ops_rows(ops)), ""]
        if ops.get("compiled"):
            lines += ["### The reference under torch.compile", "",
                      "Backend `reference+compile` above: the reference's PyTorch function "
                      "(`para_kernels.ops.reference_ops.<op>`, what the public op runs after its argument checks and "
                      "dispatch) under `torch.compile(dynamic=False)` (inductor), forward only, "
                      + compile_scope(ops["config"])
                      + ". Each case is compiled from a clean dynamo state and called once before timing: "
                      "\"compile s\" is that first call (inductor's on-disk cache may shorten it on a second run), "
                      "excluded from the timings. \"graphs\" counts the graphs dynamo compiled (more than one: graph "
                      "breaks, e.g. at data-dependent sizes). The public op's eager time (the `reference` row) and the "
                      "same function run eagerly are the baselines; \"eager fn / compiled\" > 1 means compiling helped. "
                      "A compile that failed shows its error.", "",
                      _md_table(COMPILE_HEADER, compile_rows(ops)), ""]
    return "\n".join(lines) + "\n"


def _ratio_series(serving) -> list[tuple[str, dict]]:
    """(label, {method: ratio summary}) of every ratio the headline plot shows."""
    series = [("decode (per token)", {m: serving["decode"][m]["ratio"] for m in _methods(serving)})]
    if serving.get("prefill"):
        series.append(("prefill", {m: serving["prefill"][m]["ratio"] for m in _methods(serving)}))
    g = (serving.get("graph") or {}).get("methods", {})
    graphed = {m: e["ratio"] for m, e in g.items() if m != "bare"}
    if graphed:
        series.append(("decode step, CUDA-graph replay", graphed))
    return series


def _plot_ratios(plt, result, path: str, serving=None) -> bool:
    """Headline: decode and prefill ratio to bare per method (and the CUDA-graph replay ratio
    where measured), median with IQR bars."""
    serving = serving if serving is not None else result.get("serving")
    if not (serving and "decode" in serving):
        return False
    methods = _methods(serving)
    series = _ratio_series(serving)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.9 * len(methods) + 2), 4))
    width = 0.8 / len(series)
    lows = []
    for k, (label, stats) in enumerate(series):
        idx = [i for i, m in enumerate(methods) if m in stats]
        med = [stats[methods[i]]["median"] for i in idx]
        lo = [stats[methods[i]]["median"] - stats[methods[i]]["q1"] for i in idx]
        hi = [stats[methods[i]]["q3"] - stats[methods[i]]["median"] for i in idx]
        lows += [stats[methods[i]]["q1"] for i in idx]
        xs = [i + (k - (len(series) - 1) / 2) * width for i in idx]
        ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, label=label)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([m.replace("_", " ") for m in methods], fontsize=8, rotation=20)
    ax.set_ylabel("time ratio to bare model")
    ax.set_ylim(bottom=min(0.9, min(lows, default=0.92) - 0.02))
    cfg = serving["config"]
    ax.set_title(f"{_short_title(serving)}, batch {cfg['batch']} from {cfg['tenants']} tenants, "
                 f"{cfg['dtype']} — {result['env']['device_name']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _time_vs_batch_axes(ax, first: bool, title: str, legend_size: int) -> None:
    """Log-log axes of median µs per call against batch size."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    if first:
        ax.set_ylabel("median µs per call")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=legend_size)


def _save_figure(plt, fig, path: str, title: str) -> None:
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_ops(plt, result, path: str) -> bool:
    """Time vs batch size of each op, forward and backward, first backend and dtype."""
    ops = result.get("ops")
    if not (ops and ops["rows"]):
        return False
    models = list(dict.fromkeys(r["model"] for r in ops["rows"]))
    groups = [("pool",), ("generate", "pool_generate"), ("scale",), ("scaled_glu", "scaled_linear")]
    backend0, dtype0 = ops["backends"][0], ops["rows"][0]["dtype"]
    T0 = ops["rows"][0]["T"]
    fig, axes = plt.subplots(len(models), len(groups), figsize=(4.2 * len(groups), 3.4 * len(models)),
                             squeeze=False)
    for i, model in enumerate(models):
        for j, group in enumerate(groups):
            ax = axes[i][j]
            series = {}
            for r in ops["rows"]:
                if (r["model"] != model or r["op"] not in group or r["backend"] != backend0
                        or r["dtype"] != dtype0 or r["T"] != T0):
                    continue
                variant = r["variant"].split(" A=")[0].split(" N=")[0]
                name = r["op"] if r["op"] != group[0] or len(group) > 1 else ""
                key = (f"{name} {variant}".strip(), r["direction"])
                series.setdefault(key, []).append((r["B"], r["time"]["median"] * 1e6))
            colors = {}
            for (label, direction), pts in sorted(series.items()):
                pts.sort()
                c = colors.setdefault(label, f"C{len(colors) % 10}")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1, color=c,
                        ls="-" if direction == "forward" else "--",
                        label=f"{label} ({'fwd' if direction == 'forward' else 'bwd'})")
            if not series:
                ax.set_visible(False)
                continue
            _time_vs_batch_axes(ax, j == 0, f"{' / '.join(group)} — {model}, T={T0}", legend_size=6)
    _save_figure(plt, fig, path, f"para ops, {backend0} backend, {dtype0}, {result['env'].get('device_name', '')} "
                            "(solid: forward, dashed: backward)")
    return True




def _plot_popularity(plt, result, path: str, serving=None) -> bool:
    """Ratio to bare per popularity layout (groups) and method (bars), median with IQR bars."""
    serving = serving if serving is not None else result.get("serving")
    pop = (serving or {}).get("popularity")
    if not pop:
        return False
    kinds, methods = list(pop["layouts"]), pop["methods"]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(kinds) + 0.25 * len(kinds) * len(methods)), 4))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        stats = [pop["layouts"][k]["methods"][m]["ratio"] for k in kinds]
        med = [x["median"] for x in stats]
        err = [[x["median"] - x["q1"] for x in stats], [x["q3"] - x["median"] for x in stats]]
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(kinds))]
        ax.bar(xs, med, width, yerr=err, capsize=2, label=pop["labels"][m], color=f"C{j % 10}")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(kinds)))
    ax.set_xticklabels([_layout_head(pop, k) for k in kinds])
    ax.set_ylabel("decode-step time ratio to bare")
    lows = [pop["layouts"][k]["methods"][m]["ratio"]["q1"] for k in kinds for m in methods]
    ax.set_ylim(bottom=min(0.9, min(lows) - 0.02))
    cfg = serving["config"]
    ax.set_title(f"{_short_title(serving)} decode step, batch {cfg['batch']}, by tenant popularity — "
                 f"{result['env']['device_name']}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


OP_PANELS = ("pool", "generate", "scale", "pool_generate", "scaled_glu", "scaled_linear")


def _plot_ops_backends(plt, result, path: str) -> bool:
    """Forward time vs batch size per backend (colour) and variant (line style), one panel per
    model and op, first dtype and prompt length."""
    ops = result.get("ops")
    if not (ops and ops["rows"]):
        return False
    rows = [r for r in ops["rows"] if r["direction"] == "forward"]
    dtype0, T0 = rows[0]["dtype"], rows[0]["T"]
    rows = [r for r in rows if r["dtype"] == dtype0 and r["T"] == T0]
    models = list(dict.fromkeys(r["model"] for r in rows))
    colours = {b: f"C{i % 10}" for i, b in enumerate(ops["backends"])}
    styles = ("-", "--", ":", "-.")
    fig, axes = plt.subplots(len(models), len(OP_PANELS), figsize=(3.4 * len(OP_PANELS), 3.0 * len(models)),
                             squeeze=False)
    for i, model in enumerate(models):
        for j, op in enumerate(OP_PANELS):
            ax = axes[i][j]
            series = {}
            for r in rows:
                if r["model"] == model and r["op"] == op:
                    series.setdefault((r["backend"], r["variant"]), []).append((r["B"], r["time"]["median"] * 1e6))
            if not series:
                ax.set_visible(False)
                continue
            variants = list(dict.fromkeys(v for _, v in series))
            for (backend, variant), pts in series.items():
                pts.sort()
                label = backend + (f", {variant.split(' A=')[0].split(' N=')[0]}" if len(variants) > 1 else "")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1, color=colours[backend],
                        ls=styles[variants.index(variant) % len(styles)], label=label)
            _time_vs_batch_axes(ax, j == 0, f"{op} — {model}", legend_size=5)
    _save_figure(plt, fig, path, f"forward time per backend, {dtype0}, T={T0}, {result['env'].get('device_name', '')}")
    return True


def _plot_sweep(plt, result, path: str, serving=None) -> bool:
    """Tenant sweep: ratio to bare vs tenant count per method, eager lockstep (solid) and
    CUDA-graph replay (dashed), median with IQR bars; the 3 % line of the claim."""
    sw = (serving or {}).get("sweep")
    if not sw or sw.get("error") or not sw.get("by_tenants"):
        return False
    ks = list(sw["by_tenants"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for j, m in enumerate(sw["methods"]):
        for kind, style in (("eager", "-"), ("graph", "--")):
            pts = []
            for k in ks:
                e = sw["by_tenants"][k]
                r = e["methods"][m]["ratio"] if kind == "eager" else \
                    (e.get("graph") or {}).get("methods", {}).get(m, {}).get("ratio")
                if r:
                    pts.append((int(k), r))
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1]["median"] for p in pts],
                            yerr=[[p[1]["median"] - p[1]["q1"] for p in pts], [p[1]["q3"] - p[1]["median"] for p in pts]],
                            color=f"C{j}", ls=style, marker="o", ms=3, capsize=2,
                            label=f"{sw.get('labels', {}).get(m, m)} ({'eager lockstep' if kind == 'eager' else 'CUDA graph'})")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(1.03, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xticks([int(k) for k in ks])
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel(f"tenants in the batch of {sw['batch']} (row b → tenant b mod K)")
    ax.set_ylabel("decode-step ratio to bare")
    ax.set_title(f"{_short_title(serving)}, {serving['config']['dtype']} — "
                 f"{result['env']['device_name']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


PART_PLOTS = (("ratios_png", "ratios", _plot_ratios), ("popularity_png", "popularity", _plot_popularity),
              ("sweep_png", "sweep", _plot_sweep))  # one per serving model
PLOTS = (("ops_png", "ops", _plot_ops), ("ops_backends_png", "ops-backends", _plot_ops_backends))


def plots(result, out_dir: str, slug: str) -> dict:
    """PNG files <out_dir>/<slug>-<name>[-<model>].png; {key[-<model>]: path} of those written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    files = {}

    def draw_one(key, path, draw, *args):
        try:
            if draw(plt, result, path, *args):
                files[key] = path
        except Exception as e:  # noqa: BLE001 - a plot must never cost the report its numbers
            plt.close("all")
            print(f"bench report: plot {os.path.basename(path)} failed: {type(e).__name__}: {e}", file=sys.stderr)

    for i, serving in enumerate(serving_parts(result)):
        suffix = part_suffix(result, i)
        for key, name, draw in PART_PLOTS:
            draw_one(key + suffix, os.path.join(out_dir, f"{slug}-{name}{suffix}.png"), draw, serving)
    for key, name, draw in PLOTS:
        draw_one(key, os.path.join(out_dir, f"{slug}-{name}.png"), draw)
    return files


def write(result, out_dir: str, slug: str) -> dict:
    """<out_dir>/<slug>.json (first: whatever fails after it, the measurements are on disk),
    the plots, then <slug>.md (a rendering failure leaves a note and the traceback there)."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, f"{slug}.json"), os.path.join(out_dir, f"{slug}.md")
    with open(json_path, "w") as f:
        json.dump(_jsonable(result), f, indent=1)
    files = plots(result, out_dir, slug)
    files["json"], files["markdown"] = json_path, md_path
    result = {**result, "files": {k: os.path.basename(v) for k, v in files.items()}}
    with open(json_path, "w") as f:
        json.dump(_jsonable(result), f, indent=1)
    try:
        text = markdown(result, files)
    except Exception as e:  # noqa: BLE001
        import traceback

        print(f"bench report: the Markdown rendering failed: {type(e).__name__}: {e}", file=sys.stderr)
        text = (f"# para_kernels benchmark\n\nThe Markdown rendering failed ({type(e).__name__}: {e}); every "
                f"measurement is in {os.path.basename(json_path)}.\n\n```\n{traceback.format_exc()}```\n")
    with open(md_path, "w") as f:
        f.write(text)
    return files
