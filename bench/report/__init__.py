"""Report writers. ``write(result, out_dir, slug)`` serialises a run's result dict once into
<out_dir>/<slug>.json (schema.py) and renders the plots (plots.py) and <slug>.md (markdown.py)
from that JSON; ``console(load(path))`` prints the summary (console.py). No writer sees the
live result: what the reports show is exactly what the JSON holds. single.py does the same for the
one-file benchmarks (bench/quality, bench/vllm)."""
from __future__ import annotations

import json
import os
import sys

from .console import console
from .markdown import markdown
from .markdown_serving import serving_markdown
from .plots import plots
from .schema import SCHEMA_VERSION, as_json, load, serving_parts

__all__ = ["SCHEMA_VERSION", "console", "load", "markdown", "plots", "serving_markdown", "serving_parts", "write"]


def write(result, out_dir: str, slug: str) -> dict:
    """<out_dir>/<slug>.json (first: whatever fails after it, the measurements are on disk),
    the plots, then <slug>.md (a rendering failure leaves a note and the traceback there), all
    drawn from the JSON. Returns {key: path} of the files written."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, f"{slug}.json"), os.path.join(out_dir, f"{slug}.md")
    data = as_json(result)
    _dump(data, json_path)
    files = plots(data, out_dir, slug)
    files["json"], files["markdown"] = json_path, md_path
    data["files"] = {k: os.path.basename(v) for k, v in files.items()}
    _dump(data, json_path)
    try:
        text = markdown(load(json_path), files)
    except Exception as e:  # noqa: BLE001
        import traceback

        print(f"bench report: the Markdown rendering failed: {type(e).__name__}: {e}", file=sys.stderr)
        text = (f"# para_kernels benchmark\n\nThe Markdown rendering failed ({type(e).__name__}: {e}); every "
                f"measurement is in {os.path.basename(json_path)}.\n\n```\n{traceback.format_exc()}```\n")
    with open(md_path, "w") as f:
        f.write(text)
    return files


def _dump(data: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
