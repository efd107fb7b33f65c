"""Formatting shared by the writers: numbers (ms, µs, ratio summaries), tables (Markdown and
plain text) and model titles. A number the JSON holds as null (NaN or infinity when measured)
prints as "nan", as it did before it was serialised."""
from __future__ import annotations


def num(x):
    """A JSON number, null read back as NaN."""
    return float("nan") if x is None else x


def fmt_ms(x):
    return f"{1e3 * num(x):.2f}"


def fmt_us(x):
    return f"{1e6 * num(x):.1f}"


def fmt_ratio(s):
    return f"{num(s['median']):.3f} [{num(s['q1']):.3f}, {num(s['q3']):.3f}]"


def fmt_ms_iqr(t):
    """A time summary in ms: 'median [q1, q3]'."""
    return f"{fmt_ms(t['median'])} [{fmt_ms(t['q1'])}, {fmt_ms(t['q3'])}]"


def fmt_tokens_per_s(entry) -> str:
    t = entry.get("tokens_per_s")
    return "" if not t else f"{t['median']:.1f}"


def md_table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def text_table(header, rows) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*[str(c) for c in r]) for r in rows]
    return "\n".join(lines)


def model_title(serving) -> str:
    return serving.get("model_name") or "SmolLM2-135M-Instruct"


def short_title(serving) -> str:
    """The model's name without its shapes: 'LLaMA-2-7B shapes, random weights'."""
    return model_title(serving).split(" (")[0]
