"""Writers for the single-file benchmarks (bench/quality, bench/vllm): the run's JSON first, then
its Markdown and PNG drawn from that JSON alone.

- ``save(result, path, render)``: ``path`` (folders made), then ``render(path)``; returns ``path``.
- ``render(json_path, markdown, plot, what)``: ``<same name>.md`` from ``markdown(res)`` and
  ``<same name>.png`` from ``plot(res, png_path)``, with ``res["png_name"]`` set for the Markdown to
  link; a plot that fails is reported on stderr (``what`` names the report) and the Markdown is
  still written. Returns (md path, png path).
"""
from __future__ import annotations

import json
import os
import sys


def save(result: dict, path: str, render) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    render(path)
    return path


def render(json_path: str, markdown, plot, what: str) -> tuple[str, str]:
    with open(json_path) as f:
        res = json.load(f)
    base = json_path[:-5] if json_path.endswith(".json") else json_path
    png, md = base + ".png", base + ".md"
    res["png_name"] = os.path.basename(png)
    try:
        plot(res, png)
    except Exception as e:  # noqa: BLE001 - the numbers matter more than the picture
        print(f"{what}: plot failed: {e!r}", file=sys.stderr)
    with open(md, "w") as f:
        f.write(markdown(res))
    return md, png
