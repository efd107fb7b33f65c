"""The one schema every report writer reads: the JSON file <out>/<device>.json.

A run's result dict is serialised once (:func:`to_jsonable`: NaN and infinities become null,
tuples lists, int keys strings, anything else its str; the live models under "setup" are
dropped) and the console table, the Markdown report and the plots are rendered from that JSON
(:func:`load`), never from the live objects, so a report can be re-rendered from the file alone.

Top level: schema_version, argv, mode, env, warnings, phases_s, runtime_s, [time_limit_s,
partial, interrupted, errors], serving (the first model: config, methods, checks, decode,
prefill, decode_interleaved, popularity, graph, sweep, phases_s, ...), serving_more (the other
models, same fields), attribution, profile_file, ops (config, rates, rows, errors, compiled,
fallbacks, backends, timer), files (name of each file written). See bench/scenarios for how
each part is measured.
"""
from __future__ import annotations

import json
import math

SCHEMA_VERSION = 1  # 1: the fields of the reports before the split (no version field), plus this one


METHOD_ORDER = ("para", "para_none", "peft_lora", "bgmv_lora", "ia3", "bare_again")  # JSON without "methods"


def to_jsonable(x):
    if isinstance(x, dict):
        return {k: to_jsonable(v) for k, v in x.items() if k != "setup"}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def as_json(result: dict) -> dict:
    """``result`` exactly as the JSON file holds it (with the schema version)."""
    return json.loads(json.dumps({"schema_version": SCHEMA_VERSION, **to_jsonable(result)}))


def load(path: str) -> dict:
    """A report JSON file, for the writers (console, Markdown, plots)."""
    with open(path) as f:
        return json.load(f)


def measured_methods(serving):
    """The measured methods (bare excluded), in the run's order."""
    order = list(serving.get("methods") or ()) or list(METHOD_ORDER)
    return [m for m in order if m != "bare" and m in serving.get("decode", {})]


def serving_parts(result) -> list[dict]:
    """Every model's serving result: result["serving"] (the first model) and result["serving_more"]."""
    return [p for p in [result.get("serving"), *result.get("serving_more", [])] if p]


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def part_suffix(result, i: int) -> str:
    """File-name suffix of the i-th serving part's plots: '' for the first, '-<model>' after."""
    return "" if i == 0 else "-" + slug(serving_parts(result)[i].get("model", str(i)))
