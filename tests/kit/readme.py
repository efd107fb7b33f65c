"""The README's Python blocks, by section (tests/wrapper/test_readme.py runs the main venv's,
tests/vllm_plugin/test_readme_block.py the vLLM section's)."""
from __future__ import annotations

import os
import re

from . import ROOT

BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _text() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def _bounds(text: str, title: str) -> tuple[int, int]:
    start = text.index(title)
    return start, text.index("\n## ", start + len(title))


def python_blocks(section: str | None = None, excluding: tuple = ()) -> list[str]:
    """The Python blocks of the README's ``section`` (its title, e.g. '## Training'), or, without
    one, of every section but those titled in ``excluding``."""
    text = _text()
    if section is not None:
        start, end = _bounds(text, section)
        return BLOCK.findall(text[start:end])
    for title in excluding:
        start, end = _bounds(text, title)
        text = text[:start] + text[end:]
    return BLOCK.findall(text)
