"""The rows and headers of every table, shared by the console and the Markdown writers (each
reads one part of the report JSON: serving, its graph / popularity / sweep, attribution, ops)."""
from __future__ import annotations

from .schema import measured_methods
from .text import fmt_ms, fmt_ms_iqr, fmt_ratio, fmt_tokens_per_s, fmt_us, num


def headline_rows(serving) -> list[list[str]]:
    dec, pre = serving["decode"], serving.get("prefill") or {}  # no prefill: a run cut short
    inter = serving.get("decode_interleaved") or {}
    labels = serving.get("methods") or {}
    rows = [["bare backbone", fmt_ms(dec["bare"]["time"]["median"]), "1", "", "", "1" if inter else "",
             fmt_tokens_per_s(dec["bare"]), fmt_ms(pre["bare"]["time"]["median"]) if pre else "", "1" if pre else ""]]
    for m in measured_methods(serving):
        rows.append([labels.get(m, m), fmt_ms(dec[m]["time"]["median"]), fmt_ratio(dec[m]["ratio"]),
                     f"{num(dec[m]['ratio_mean_interval']['median']):.3f}",
                     f"{num(dec[m]['ratio_total_time']['median']):.3f}",
                     fmt_ratio(inter[m]["ratio"]) if m in inter else "", fmt_tokens_per_s(dec[m]),
                     fmt_ms(pre[m]["time"]["median"]) if m in pre else "",
                     fmt_ratio(pre[m]["ratio"]) if m in pre else ""])
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
        rows.append([labels.get(m, m), fmt_ms_iqr(t),
                     "1" if m == "bare" else fmt_ratio(e["ratio"]), f"{e['check']['value']:.2g}", ""])
    for m, err in g.get("errors", {}).items():
        rows.append([labels.get(m, m), "", "", "", "failed: " + err.replace("|", "/").replace("\n", " ")[:240]])
    return rows


GRAPH_HEADER = ["method", "ms per decode step, median [IQR]", "ratio to bare, median [IQR]",
                "replay vs eager logits (rel.)", "error"]


def sweep_graphed(sweep) -> bool:
    return any(e.get("graph") and not e["graph"].get("skipped") for e in sweep["by_tenants"].values())


def sweep_rows(sweep, labels) -> list[list[str]]:
    """Per tenant count: bare ms per step, each method's lockstep ratio [IQR] and prefill ratio,
    and (where graphs ran) the bare replay ms and each method's replay ratio [IQR]."""
    rows = []
    for k, e in sweep["by_tenants"].items():
        row = [str(k), fmt_ms(e["bare_time"]["median"])]
        row += [fmt_ratio(e["methods"][m]["ratio"]) for m in sweep["methods"]]
        row += [fmt_ratio(e["prefill"][m]["ratio"]) for m in sweep["methods"]]
        if sweep_graphed(sweep):
            g = e.get("graph") or {}
            gm = g.get("methods", {})
            row.append(fmt_ms(gm["bare"]["time"]["median"]) if "bare" in gm else "")
            row += [fmt_ratio(gm[m]["ratio"]) if m in gm else ("failed" if m in g.get("errors", {}) else "")
                    for m in sweep["methods"]]
        rows.append(row)
    return rows


def sweep_header(sweep) -> list[str]:
    ms = sweep["methods"]
    head = (["tenants", "bare ms/step (eager)"] + [f"{m} ratio, eager lockstep [IQR]" for m in ms]
            + [f"{m} prefill ratio [IQR]" for m in ms])
    if sweep_graphed(sweep):
        head += ["bare ms/step (graph)"] + [f"{m} ratio, graph replay [IQR]" for m in ms]
    return head


def ops_rows(ops, model=None, batch=None) -> list[list[str]]:
    rows = []
    for r in ops["rows"]:
        if (model is not None and r["model"] != model) or (batch is not None and r["B"] != batch):
            continue
        t = r["time"]
        rows.append([r["backend"], r["dtype"], r["model"], r["op"], r["variant"], r["direction"], r["B"], r["T"],
                     fmt_us(t["median"]), fmt_us(t["iqr"]), t["n"], f"{r['bytes'] / 1e6:.3f}", f"{r['gb_per_s']:.2f}",
                     f"{r['frac_of_copy_bw']:.3f}", f"{r['floor_over_time']:.3f}"])
    return rows


OPS_HEADER = ["backend", "dtype", "model", "op", "variant", "dir", "B", "T", "median us", "IQR us", "runs",
              "MB moved", "GB/s", "of copy BW", "floor/time"]


def attribution_rows(attr) -> list[list[str]]:
    rows = []
    for name, p in attr["pieces"].items():
        rows.append([name, fmt_us(p["per_call_s"]), p["calls"],
                     fmt_ms(p["per_token_s"]), p["what"]])
    return rows


ATTR_HEADER = ["piece", "us per call", "calls per token", "ms per token", "what"]


def layout_head(pop, kind) -> str:
    lay = pop["layouts"][kind]
    return f"{kind} ({lay['distinct_tenants']} tenant{'s' if lay['distinct_tenants'] != 1 else ''})"


def popularity_header(pop) -> list[str]:
    return ["method"] + [layout_head(pop, k) + ", ratio [IQR]" for k in pop["layouts"]]


def _layout_rows(pop, kinds, bare_label, bare_time, cell) -> list[list[str]]:
    """One row per popularity method, one column per layout in ``kinds``; first row: the bare
    model's time ``bare_time(layout)``; cells ``cell(layout, method)``."""
    rows = [[bare_label] + [fmt_ms_iqr(bare_time(k)) for k in kinds]]
    return rows + [[pop["labels"][m]] + [cell(k, m) for k in kinds] for m in pop["methods"]]


def popularity_rows(pop) -> list[list[str]]:
    """Ratio to the bare decode step, per method (rows) and layout (columns); first row: the
    bare model's ms per step."""
    lay = pop["layouts"]
    return _layout_rows(pop, list(lay), "bare backbone, ms per step [IQR]", lambda k: lay[k]["bare_time"],
                        lambda k, m: fmt_ratio(lay[k]["methods"][m]["ratio"]))


def popularity_prefill_rows(pop) -> list[list[str]]:
    """Prefill ratio to the bare model per method and layout (first row: bare prefill ms)."""
    lay = pop["layouts"]
    kinds = [k for k in lay if lay[k].get("prefill")]
    if not kinds:
        return []
    return _layout_rows(pop, kinds, "bare backbone, prefill ms [IQR]", lambda k: lay[k]["prefill"]["bare"]["time"],
                        lambda k, m: fmt_ratio(lay[k]["prefill"][m]["ratio"]))


def popularity_ms_rows(pop) -> list[list[str]]:
    """ms per decode step of every method, per layout, median [IQR]."""
    lay = pop["layouts"]
    return [[pop["labels"][m]] + [fmt_ms_iqr(lay[k]["methods"][m]["time"]) for k in lay] for m in pop["methods"]]


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
                fmt_us(op_t["median"]) if op_t else ""]
        if c.get("error"):
            error = c["error"].replace("|", "/").replace("\n", " ")[:200]
            rows.append(head + ["", "", "", "", "", "", "failed: " + error])
            continue
        fe, ct = c["eager_function_time"], c["compiled_time"]
        rows.append(head + [f"{fmt_us(fe['median'])} [{fmt_us(fe['iqr'])}]",
                            f"{fmt_us(ct['median'])} [{fmt_us(ct['iqr'])}]",
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
            f"than {num(limit):.0%}, {part.get('contended_runs_kept', 0)} kept over the limit after the retry budget, "
            f"{part.get('waited_s', 0):.0f} s spent waiting for a quiet machine.")


def ops_contention(ops) -> str | None:
    shares = [r["others_cpu"] for r in ops["rows"] if r.get("others_cpu") is not None]
    if not shares:
        return None
    busy = sum(x > 0.1 for x in shares)
    return (f"Other processes used a median {sorted(shares)[len(shares) // 2]:.1%} (max {max(shares):.1%}) of "
            f"the CPUs during the op cases; {busy} of {len(shares)} cases had more than 10%.")
