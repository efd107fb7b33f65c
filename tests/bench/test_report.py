"""The report writers (bench/report) read only the report JSON.

The committed CPU report (docs/benchmarks/cpu.json and cpu.md, written by one ``make bench``)
is the fixture: rendering that JSON again must give that Markdown byte for byte, and the
console summary and every plot must render from it. A number the JSON holds as null (NaN when
measured) renders as "nan", as it did before serialisation.
"""
from __future__ import annotations

import json
import os

import pytest

from bench import report

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs", "benchmarks")


@pytest.fixture
def committed():
    path = os.path.join(DOCS, "cpu.json")
    if not os.path.exists(path):
        pytest.skip("no committed CPU report")
    with open(path) as f:
        data = json.load(f)
    data.pop("files", None)
    data.pop("schema_version", None)
    return data


def test_committed_report_renders_from_its_json(committed, tmp_path):
    files = report.write(committed, str(tmp_path), "cpu")
    with open(os.path.join(DOCS, "cpu.md")) as f:
        assert (tmp_path / "cpu.md").read_text() == f.read()
    data = report.load(files["json"])
    assert data["schema_version"] == report.SCHEMA_VERSION
    assert set(data["files"]) == {"json", "markdown", "ratios_png", "popularity_png", "ops_png", "ops_backends_png"}
    assert all((tmp_path / name).exists() for name in data["files"].values())
    text = report.console(data)
    assert "Headline" in text and "Op microbenchmarks" in text


def test_null_numbers_render_as_nan(committed, tmp_path):
    """NaN is stored as null (strict JSON); the writers print it as nan rather than fail."""
    serving = committed["serving"]
    serving["checks"]["checks_raised"] = {"value": float("nan"), "bar": "no exception", "ok": False, "what": "test"}
    serving["decode"]["para"]["ratio_mean_interval"]["median"] = float("nan")
    report.write(committed, str(tmp_path), "cpu")
    data = report.load(str(tmp_path / "cpu.json"))
    assert data["serving"]["checks"]["checks_raised"]["value"] is None
    md = (tmp_path / "cpu.md").read_text()
    assert "rendering failed" not in md
    assert "| checks_raised | nan | no exception | **NO** | test |" in md
    assert "nan" in report.console(data)
