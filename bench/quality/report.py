"""The quality report, drawn from the run's JSON only (run.py writes it first).

Contract: ``write(json_path)`` writes ``<same name>.md`` (date, commit, machine, set-up, the
method table with each method's decode cost quoted from the serving benchmark, per-family scores,
ablations, skipped units, learning rates picked at the end of their grid) and ``<same name>.png``
(score vs trainable parameters and score vs decode time relative to the bare model; means with
min-max bars over seeds), through bench/report/single.py: a plot that fails is reported on stderr
and skipped; the Markdown always gets written.
"""
from __future__ import annotations

from bench.report import single

NAMES = {"smollm2": "SmolLM2-135M-Instruct", "tiny": "a tiny random Llama (character tokenizer)"}


def _matched(res) -> str:
    para = res["methods"].get("para")
    lora = [(n, r) for n, r in res["methods"].items() if n.endswith("(matched)")]
    if not (para and lora and para["trainable"] and lora[0][1]["trainable"]):
        return ""
    n, r = lora[0]
    return (f" LoRA's matched rank r = {r['params']['r']}: {r['trainable']:,} trainable parameters, the closest of any "
            f"rank to PARA's {para['trainable']:,}.")


def _edges(res) -> list[str]:
    """Methods whose picked learning rate is the lowest or highest of their grid (the best may lie outside)."""
    out = []
    for name, lr in res["picked_lr"].items():
        kind = res["methods"].get(name, {}).get("kind")
        grid = res["grids"].get(kind) or []
        if len(grid) > 1 and lr in (min(grid), max(grid)):
            out.append(f"{name} ({lr}, {'top' if lr == max(grid) else 'bottom'} of {grid})")
    return out


def _decode(res, name) -> str:
    q = ((res.get("serving_cost") or {}).get("decode_ratio") or {}).get(name)
    return f"{q['median']:.3f} [{q['q1']:.3f}, {q['q3']:.3f}]" if q else ("1" if name == "bare" else "–")


def _ms(s, digits=2, pct=False):
    if not s:
        return "–"
    k = 100 if pct else 1
    spread = f" ± {k * s['std']:.{digits}f}" if s["n"] > 1 else ""
    return f"{k * s['mean']:.{digits}f}{spread}"


def markdown(res: dict) -> str:
    env, cfg = res["environment"], res["config"]
    git = env.get("git") or {}
    lines = [f"# Quality: does PARA learn as well as LoRA? ({res['mode']})", "",
             f"- Date (UTC): {env['date_utc']}; commit {git.get('commit')}{' (dirty)' if git.get('dirty') else ''}",
             f"- Machine: {env['device_name']}, {env['cpu_count']} CPUs, torch {env['torch']} ({env['torch_threads']}"
             f" threads), transformers {env['transformers']}, peft {env['peft']}, para_kernels {env['para_kernels']}",
             f"- Backbone: {NAMES.get(res['backbone'], res['backbone'])} (fp32, CPU). Families: "
             f"{', '.join(res['families'])}; one adapter per method serves their mixture, the prompt alone says "
             "which task.",
             f"- Per family: {cfg['sizes']} examples (splits share no prompt). {cfg['steps']} steps of batch "
             f"{cfg['batch']}, AdamW, linear schedule (10 % warm-up), same batches for every method; "
             f"{cfg['seeds']} seed(s). Learning rate from the grid {res['grids']} on seed 0's validation loss: "
             f"{res['picked_lr']}." + _matched(res),
             f"- Wall time {res['wall_s'] / 60:.1f} min (budget {cfg['budget_s'] / 60:.0f} min).", "",
             "Score: mean over families of accuracy (label tasks) or exact match (the rest), held-out test split, "
             "greedy decoding; mean ± standard deviation over seeds.", "",
             "| method | trainable | lr | score % | exact match % | test loss | s / step | decode ÷ bare |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    main = {n: r for n, r in res["methods"].items() if not r["ablation"]}
    for name, r in main.items():
        lr = r["runs"][0]["lr"] if r["runs"] else None
        lines.append(f"| {name} | {r['trainable'] or 0:,} | {lr if lr is not None else '–'} | "
                     f"{_ms(r['summary']['score'], 1, True)} | {_ms(r['summary']['exact_match'], 1, True)} | "
                     f"{_ms(r['summary']['test_loss'], 3)} | {_ms(r['summary']['step_s'], 3)} | {_decode(res, name)} |")
    cost = res.get("serving_cost")
    if cost:
        lines += ["", "Decode ÷ bare: time per decode step relative to the bare model, median [quartiles], quoted "
                  f"from the serving benchmark `{cost['source']}` ({cost['model']}, batch {cost['batch']}, "
                  f"{cost['date_utc']}, commit {cost['commit']}), which measured the methods marked; '–' was not "
                  "measured there (its LoRA is PEFT's at one rank)."]
    edges = _edges(res)
    if edges:
        lines += ["", "Learning rate picked at the end of its grid (the best may lie outside it): " + "; ".join(edges)
                  + "."]
    fams = res["families"]
    lines += ["", "Per family (exact match %; accuracy % for label tasks in brackets):", "",
              "| method | " + " | ".join(fams) + " |", "|---|" + "---:|" * len(fams)]
    for name, r in res["methods"].items():
        cells = []
        for f in fams:
            s = r["families"].get(f, {})
            acc = f" ({_ms(s['accuracy'], 0, True)})" if s.get("accuracy") else ""
            cells.append(_ms(s.get("exact_match"), 0, True) + acc)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    abl = {n: r for n, r in res["methods"].items() if r["ablation"]}
    if abl:
        lines += ["", "Ablations (PARA, at PARA's learning rate):", "", "| variant | trainable | score % | test loss |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {n} | {r['trainable'] or 0:,} | {_ms(r['summary']['score'], 1, True)} | "
                  f"{_ms(r['summary']['test_loss'], 3)} |" for n, r in abl.items()]
    if res["skipped"]:
        lines += ["", "Skipped (time budget): " + ", ".join(f"{s['method']} seed {s['seed']}" for s in res["skipped"])]
    lines += ["", "![score vs trainable parameters and vs decode cost](" + res.get("png_name", "") + ")", ""]
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode = (res.get("serving_cost") or {}).get("decode_ratio") or {}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    bare = res["methods"].get("bare", {}).get("summary", {}).get("score")
    for i, (name, r) in enumerate(res["methods"].items()):
        s = r["summary"]["score"]
        if not s or not r["trainable"]:
            continue
        y, color = 100 * s["mean"], f"C{i % 10}"  # one colour per method in both panels
        bars = [[y - 100 * s["min"]], [100 * s["max"] - y]]
        ax.errorbar(r["trainable"], y, yerr=bars, fmt="o", capsize=3, c=color)
        ax.annotate(name, (r["trainable"], y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if name in decode:
            q = decode[name]
            ax2.errorbar(q["median"], y, yerr=bars, xerr=[[q["median"] - q["q1"]], [q["q3"] - q["median"]]], fmt="o",
                         capsize=3, c=color)
            ax2.annotate(name, (q["median"], y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if bare:
        ax2.errorbar(1.0, 100 * bare["mean"], fmt="s", c="grey")
        ax2.annotate("bare", (1.0, 100 * bare["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for a in (ax, ax2):
            a.axhline(100 * bare["mean"], ls="--", c="grey", label="bare model, zero-shot")
        ax.legend()
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("score on held-out test (%)")
    ax.set_title(f"{NAMES.get(res['backbone'], res['backbone'])}: score vs trainable parameters", fontsize=10)
    ax2.set_xlabel("decode time per step ÷ bare model (serving benchmark, median, quartiles)")
    ax2.set_title("score vs decode cost (methods the serving benchmark measured)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(json_path: str) -> tuple[str, str]:
    return single.render(json_path, markdown, plot, "quality report")
