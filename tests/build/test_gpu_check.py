"""The one-shot device run stays runnable: scripts/gpu_check.sh parses, and its checks
(scripts/gpu_validate.py) run here on the CPU, through the Triton interpreter, at small sizes:
the smoke every sanitizer runs, an op table with its views, and the report. The whole dry run
is `GPU_CHECK_QUICK=1 bash scripts/gpu_check.sh` (a few minutes)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from kit import ROOT  # noqa: E402 (the repository)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the device runs the script itself")


def validate(*args, out=None):
    env = dict(os.environ, GPU_CHECK_QUICK="1", TRITON_INTERPRET="1")
    cmd = [sys.executable, "scripts/gpu_validate.py", *args] + (["--out", str(out)] if out else [])
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_script_parses():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", "gpu_check.sh")], check=True)


def test_smoke_table_and_report(tmp_path):
    smoke = validate("smoke", "--backend", "triton", out=tmp_path / "smoke.jsonl")
    assert smoke.returncode == 0, smoke.stdout[-3000:] + smoke.stderr[-3000:]
    ops = {r["op"] for r in rows(tmp_path / "smoke.jsonl")}
    assert ops == {"pool", "generate", "scale", "scaled_glu", "scaled_linear", "pool_generate"}
    table = validate("table", "--op", "scale", "--backend", "triton", out=tmp_path / "table.jsonl")
    assert table.returncode == 0, table.stdout[-3000:] + table.stderr[-3000:]
    got = rows(tmp_path / "table.jsonl")
    assert {r["dtype"] for r in got} == {"fp32", "fp16", "bf16"}
    assert all(r["ok"] and set(r["errors"]) == {"fwd", "bwd0", "bwd1"} for r in got), got
    assert any("views" in r["case"] for r in got) and any("packed" in r["case"] for r in got)
    report = validate("report", str(tmp_path))
    assert report.returncode == 0 and "0 failed" in report.stdout, report.stdout
    assert "| table | scale | triton | bf16 |" in (tmp_path / "validation.md").read_text()


def test_a_failed_check_is_reported(tmp_path):
    """A wrong kernel must show as FAIL with its error, not pass: the reference backend is
    compared with itself after its forward is broken on purpose."""
    script = (
        "import sys; sys.argv = ['x', 'table', '--op', 'scale', '--backend', 'reference', '--out', %r]\n"
        "sys.path.insert(0, 'scripts'); import gpu_validate as g\n"
        "from para_kernels.ops import dispatch\n"
        "impl = dispatch._backends['reference'].impls\n"
        "real = impl['scale']; impl['scale'] = lambda x, v, rows=None: real(x, v, rows) * 1.1\n"
        "dispatch._chosen.clear()\n"
        "sys.exit(g.main())\n" % str(tmp_path / "bad.jsonl"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, GPU_CHECK_QUICK="1", TRITON_INTERPRET="1"))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    got = rows(tmp_path / "bad.jsonl")
    assert got and not any(r["ok"] for r in got) and all(r["errors"]["fwd"] > 2e-2 for r in got)
