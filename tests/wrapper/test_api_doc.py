"""docs/api.md names only what exists: every API entry (the code spans that open a list item,
before its dash) resolves to an object, and a written signature lists exactly the parameters
of the code, with the same defaults."""
from __future__ import annotations

import ast
import builtins
import dataclasses
import importlib
import inspect
import pathlib
import re

import pytest

import para_kernels
import para_kernels.transformers
from para_kernels import PARAConfig, get_para_model

from kit import ROOT
from kit.models import tiny_llama

DOC = pathlib.Path(ROOT) / "docs" / "api.md"
ROOTS = (para_kernels, para_kernels.transformers, builtins)
ENTRY = re.compile(r"^- ((?:`[^`]+`(?: / )?)+)(?: \(`(\w+)`\))? — ")  # an error: its base class in parentheses


def entries() -> list[str]:
    """The code spans that open each list item of docs/api.md."""
    found = []
    for line in DOC.read_text().splitlines():
        m = ENTRY.match(line)
        if m:
            found += [f"{span} < {m.group(2)}" if m.group(2) else span
                      for span in re.findall(r"`([^`]+)`", m.group(1))]
    return found


def split_params(text: str) -> list[str]:
    """Top-level comma-separated parameters of a written signature."""
    out, depth, cur = [], 0, ""
    for c in text:
        depth += c in "([{"
        depth -= c in ")]}"
        if c == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += c
    return [p for p in out + [cur.strip()] if p]


@pytest.fixture(scope="module")
def wrapped():
    return get_para_model(tiny_llama(), PARAConfig(r=2))


def resolve(name: str, instance):
    """The object ``name`` (dotted) names; instance attributes of PARAModel are looked up on
    ``instance`` (its own, never the backbone's through attribute proxying)."""
    head, *rest = name.split(".")
    if head == "para_kernels":
        obj, parts = para_kernels, rest
        while parts:
            try:
                obj = getattr(obj, parts[0])
            except AttributeError:
                obj = importlib.import_module(f"{obj.__name__}.{parts[0]}")
            parts = parts[1:]
        return obj
    obj = next((getattr(r, head) for r in ROOTS if hasattr(r, head)), None)
    assert obj is not None, f"docs/api.md names {head!r}, which para_kernels does not export"
    for part in rest:
        if hasattr(obj, part):
            obj = getattr(obj, part)
        elif obj is para_kernels.PARAModel and (part in vars(instance) or part in instance._modules):
            obj = getattr(instance, part)
        elif dataclasses.is_dataclass(obj) and part in {f.name for f in dataclasses.fields(obj)}:
            obj = None  # a dataclass field without a class-level default
        else:
            raise AssertionError(f"docs/api.md names {name!r}, but {obj!r} has no {part!r}")
    return obj


def test_doc_lists_the_api():
    names = {e.split("(")[0].split(" < ")[0] for e in entries()}
    for expected in ("get_para_model", "PARAModel.add_adapter", "PARAModel.load_adapter", "PARAModel.save_pretrained",
                     "PARAModel.forward", "PARAModel.generate", "PARAModel.disable_adapter", "PARATrainer",
                     "PARAModel.add_weighted_adapter", "PARAModel.request_state", "RequestStateError"):
        assert expected in names, expected


@pytest.mark.parametrize("entry", entries())
def test_entry_exists_with_its_signature(entry, wrapped):
    entry, _, base = entry.partition(" < ")
    name, paren, params = entry.partition("(")
    obj = resolve(name, wrapped)
    if base:
        assert isinstance(obj, type) and issubclass(obj, getattr(builtins, base)), f"{name} is not a {base}"
    if not paren:
        return
    assert params.endswith(")"), entry
    assert callable(obj), f"{name} is written as a call but is not callable"
    code = inspect.signature(obj)
    code_params = {n: p for n, p in code.parameters.items() if n not in ("self", "cls")}
    written = {}
    for p in split_params(params[:-1]):
        key, eq, default = p.lstrip("*").partition("=")
        written[key.strip()] = (p.startswith("*"), default.strip() if eq else None)
    assert set(written) == set(code_params), f"{name}: docs/api.md lists {sorted(written)}, the code has " \
                                             f"{sorted(code_params)}"
    for key, (starred, default) in written.items():
        param = code_params[key]
        assert starred == (param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD)), (name, key)
        if default is None:
            assert starred or param.default is param.empty, f"{name}: {key} has a default in the code"
        else:
            assert param.default == ast.literal_eval(default), f"{name}: {key}={default} in docs/api.md, " \
                                                               f"{param.default!r} in the code"
