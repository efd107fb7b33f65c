"""The PNG plots, drawn from the report JSON (schema.py): per serving model the ratios to the
bare model, the popularity layouts and the tenant sweep; for the op suite time vs batch size
per op and per backend. A plot that fails is reported on stderr and skipped: it never costs
the report its numbers."""
from __future__ import annotations

import os
import sys

from .schema import measured_methods, part_suffix, serving_parts
from .tables import layout_head
from .text import short_title


def _ratio_series(serving) -> list[tuple[str, dict]]:
    """(label, {method: ratio summary}) of every ratio the headline plot shows."""
    series = [("decode (per token)", {m: serving["decode"][m]["ratio"] for m in measured_methods(serving)})]
    if serving.get("prefill"):
        series.append(("prefill", {m: serving["prefill"][m]["ratio"] for m in measured_methods(serving)}))
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
    methods = measured_methods(serving)
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
    ax.set_title(f"{short_title(serving)}, batch {cfg['batch']} from {cfg['tenants']} tenants, "
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
    ax.set_xticklabels([layout_head(pop, k) for k in kinds])
    ax.set_ylabel("decode-step time ratio to bare")
    lows = [pop["layouts"][k]["methods"][m]["ratio"]["q1"] for k in kinds for m in methods]
    ax.set_ylim(bottom=min(0.9, min(lows) - 0.02))
    cfg = serving["config"]
    ax.set_title(f"{short_title(serving)} decode step, batch {cfg['batch']}, by tenant popularity — "
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
                            yerr=[[p[1]["median"] - p[1]["q1"] for p in pts],
                                  [p[1]["q3"] - p[1]["median"] for p in pts]],
                            color=f"C{j}", ls=style, marker="o", ms=3, capsize=2,
                            label=f"{sw.get('labels', {}).get(m, m)} "
                                  f"({'eager lockstep' if kind == 'eager' else 'CUDA graph'})")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(1.03, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xticks([int(k) for k in ks])
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel(f"tenants in the batch of {sw['batch']} (row b → tenant b mod K)")
    ax.set_ylabel("decode-step ratio to bare")
    ax.set_title(f"{short_title(serving)}, {serving['config']['dtype']} — "
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
