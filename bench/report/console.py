"""The console summary of a run, rendered from the report JSON (schema.py): each model's
headline, CUDA-graph, popularity and sweep tables, the attribution, the op table at one batch
size, and the run time by part."""
from __future__ import annotations

from .schema import serving_parts
from .tables import (
    ATTR_HEADER,
    COMPILE_HEADER,
    GRAPH_HEADER,
    HEADLINE_HEADER,
    OPS_HEADER,
    attribution_rows,
    compile_rows,
    contention_line,
    graph_rows,
    headline_rows,
    ops_rows,
    phases_line,
    popularity_header,
    popularity_prefill_rows,
    popularity_rows,
    sweep_header,
    sweep_rows,
)
from .text import fmt_ms, short_title, text_table


def serving_console(serving, env) -> list[str]:
    """The console lines of one model's serving run."""
    out = []
    if "config" not in serving:
        return [f"\n{serving.get('model', '?')}: the serving run failed: {serving.get('error', '?')}"]
    cfg = serving["config"]
    title = short_title(serving)
    if serving.get("error"):
        out.append(f"\n{title}: the serving run failed part-way: {serving['error']}")
    if "decode" in serving:
        out.append(f"\nHeadline — {title}: greedy decode, batch {cfg['batch']} from {cfg['tenants']} tenants, "
                   f"prompt {cfg['prompt_len']} tokens, {cfg['new_tokens']} new tokens, {cfg['dtype']}, "
                   f"{cfg['rounds']} alternated runs per method ({env['device_name']}, {env['torch_threads']} threads)")
        out.append(text_table(HEADLINE_HEADER, headline_rows(serving)))
        for phase in ("decode", "prefill"):
            line = contention_line(serving.get(phase) or {}, phase, cfg["max_other_cpu"])
            if line:
                out.append(line)
    g = serving.get("graph")
    if g and not g.get("skipped"):
        out.append(f"\n{title}: decode step under CUDA-graph replay ({g['rounds']} rounds, batch {g['batch']}):")
        out.append(text_table(GRAPH_HEADER, graph_rows(serving)))
    pop = serving.get("popularity")
    if pop:
        out.append(f"\n{title}, tenant popularity: decode-step ratio to the bare model, median [IQR] of "
                   f"{pop['rounds']} x {pop['steps_per_run']} lockstep steps per layout (adapters for "
                   f"{pop['pool_tenants']} tenants per method):")
        out.append(text_table(popularity_header(pop), popularity_rows(pop)))
        prefill = popularity_prefill_rows(pop)
        if prefill:
            out.append("prefill ratio to bare per layout, median [IQR] over the runs:")
            out.append(text_table(popularity_header(pop), prefill))
    sw = serving.get("sweep")
    if sw:
        if sw.get("error"):
            out.append(f"\n{title}, tenant sweep failed: {sw['error']}")
        else:
            out.append(f"\n{title}, tenant-count sweep at batch {sw['batch']} (row b -> tenant b mod K):")
            out.append(text_table(sweep_header(sw), sweep_rows(sw, sw.get("labels", {}))))
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
        out.append(text_table(ATTR_HEADER[:4], [r[:4] for r in attribution_rows(attr)]))
        delta = attr.get("measured_decode_delta_s")
        inter = attr.get("measured_interleaved_delta_s")
        out.append(f"sum {fmt_ms(attr['sum_per_token_s'])} ms/token; measured PARA - bare decode step: "
                   + ("n/a" if delta is None else f"{fmt_ms(delta)} ms/token (generate runs)")
                   + ("" if inter is None else f", {fmt_ms(inter)} ms/token (steps interleaved)"))
    ops = result.get("ops")
    if ops:
        batches = sorted({r["B"] for r in ops["rows"]})
        b = 8 if 8 in batches else (batches[len(batches) // 2] if batches else None)
        out.append(f"\nOp microbenchmarks (copy bandwidth {ops['rates']['copy']['bytes_per_s'] / 1e9:.1f} GB/s); "
                   f"B = {b} shown, every shape in the Markdown report:")
        out.append(text_table(OPS_HEADER, ops_rows(ops, batch=b)))
        if ops.get("compiled"):
            out.append(f"\nReference under torch.compile (forward, B = {b} shown):")
            out.append(text_table(COMPILE_HEADER, compile_rows(ops, batch=b)))
    out.append(f"\nruntime {result['runtime_s']:.0f} s")
    line = phases_line(result)
    if line:
        out.append(line)
    return "\n".join(out)
