"""The vLLM benchmark's report, drawn from its JSON only: ``write(json_path)`` writes the
Markdown (machine, commit, set-up, checks, throughput and ratios to bare) and a PNG (each
method's time per batch relative to bare: median with quartile bars)."""
from __future__ import annotations

from bench.harness.stats import summary
from bench.report import single

LABELS = {"bare": "vLLM, bare model", "para": "vLLM + PARA (para_kernels.vllm)", "lora8": "vLLM multi-LoRA r=8",
          "lora16": "vLLM multi-LoRA r=16"}


def rows(res: dict) -> list[dict]:
    m, plan = res["measured"], res["measured"]["plan"]
    tokens = plan["batch"] * plan["new_tokens"]
    out = []
    for method, times in m["times_s"].items():
        ratio = summary(m["ratios"][method]) if method in m["ratios"] else None
        time = summary(times)
        out.append({"method": method, "label": LABELS.get(method, method), "time": time,
                    "tokens_per_s": tokens / time["median"], "ratio": ratio})
    return out


def _ratio(q) -> str:
    return "1" if q is None else f"{q['median']:.3f} [{q['q1']:.3f}, {q['q3']:.3f}]"


def console(res: dict) -> str:
    lines = [f"vLLM {res['measured']['vllm']}, {res['model']}: time per batch relative to bare (median [quartiles])"]
    for r in rows(res):
        ratio = _ratio(r["ratio"])
        lines.append(f"  {r['label']:<34} {r['tokens_per_s']:8.1f} tokens/s   {ratio}")
    return "\n".join(lines)


def markdown(res: dict) -> str:
    env, m = res["environment"], res["measured"]
    plan, git = m["plan"], env.get("git") or {}
    lines = [f"# vLLM: bare vs PARA vs vLLM's multi-LoRA ({res['mode']})", "",
             f"- Date (UTC): {env['date_utc']}; commit {git.get('commit')}{' (dirty)' if git.get('dirty') else ''}",
             f"- Machine: {env['device_name']}, {env['cpu_count']} CPUs; vLLM {m['vllm']} (CPU build), torch "
             f"{m['torch']} in the vLLM venv; para_kernels {env['para_kernels']}",
             f"- Model: {res['model']}, fp32, eager mode for every engine (PARA forces it; docs/vllm.md). "
             f"{plan['tenants']} tenants; each round serves one batch of {plan['batch']} requests (request i is "
             f"tenant i mod {plan['tenants']}), prompts of the same template, {plan['new_tokens']} new tokens, greedy; "
             f"{plan['rounds']} rounds, engines in a rotated order per round, all four resident. LoRA on q_proj, "
             "v_proj with max_loras = tenants. Ratio: a round's time on a method over its time on bare, median "
             "[quartiles] over rounds.",
             f"- Engine start-up, all four: {m['start_s']:.0f} s. Whole run {res['wall_s'] / 60:.1f} min.", "",
             "| method | tokens / s | time per batch (s) | ÷ bare |", "|---|---:|---:|---:|"]
    for r in rows(res):
        ratio = _ratio(r["ratio"])
        lines.append(f"| {r['label']} | {r['tokens_per_s']:.1f} | {r['time']['median']:.2f} | {ratio} |")
    lines += ["", "Checks before timing (adapters that were silently ignored would fail them):", ""]
    for name, c in m["checks"].items():
        detail = f"{c['value']} of {c['of']}" if "of" in c else str(c["value"])
        lines.append(f"- {name}: {detail} — {'ok' if c['ok'] else 'FAILED'}")
    lines += ["", f"![time per batch relative to bare]({res.get('png_name', '')})", ""]
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in rows(res) if r["ratio"] is not None]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    y = [r["ratio"]["median"] for r in rs]
    err = [[r["ratio"]["median"] - r["ratio"]["q1"] for r in rs], [r["ratio"]["q3"] - r["ratio"]["median"] for r in rs]]
    ax.bar([r["label"] for r in rs], y, yerr=err, capsize=4, color=["C0", "C1", "C2"][:len(rs)])
    ax.axhline(1.0, ls="--", c="grey", label="bare model")
    for i, v in enumerate(y):
        ax.annotate(f"{v:.3f}", (i, v), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=9)
    ax.set_ylabel("time per batch ÷ bare (median, quartiles)")
    ax.set_title(f"vLLM {res['measured']['vllm']} on the CPU, {res['model']}", fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(json_path: str) -> tuple[str, str]:
    return single.render(json_path, markdown, plot, "vllm report")
