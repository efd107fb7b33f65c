"""The vLLM benchmark's harness end to end (``python -m bench --vllm --quick``: a tiny model, the
measurement in the vLLM venv), and its report drawn from the JSON alone."""
from __future__ import annotations

import json
import os

import pytest

from bench.vllm import report
from bench.vllm.run import VLLM_PYTHON


@pytest.mark.skipif(not os.path.exists(VLLM_PYTHON), reason="the vLLM venv (make vllm-install) is not built")
def test_quick_run_measures_every_engine_and_passes_its_checks(tmp_path):
    from bench.runner import main

    assert main(["--vllm", "--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "vllm-cpu-quick.json").read_text())
    m = res["measured"]
    assert set(m["times_s"]) == {"bare", "para", "lora8", "lora16"}
    assert all(len(t) == m["plan"]["rounds"] and min(t) > 0 for t in m["times_s"].values())
    assert all(c["ok"] for c in m["checks"].values()) and "para_no_adapter_equals_bare" in m["checks"]
    assert res["environment"]["git"]["commit"]
    text = (tmp_path / "vllm-cpu-quick.md").read_text()
    assert "vLLM + PARA" in text and "multi-LoRA r=16" in text and "FAILED" not in text
    assert (tmp_path / "vllm-cpu-quick.png").stat().st_size > 1000


def test_report_ratios_and_failed_checks_come_from_the_json(tmp_path):
    res = {"mode": "quick", "model": "m", "wall_s": 60.0, "exit_code": 1,
           "environment": {"date_utc": "2026-01-01T00:00:00Z", "git": {"commit": "abc"}, "device_name": "CPU",
                           "cpu_count": 2, "para_kernels": "0.1.0"},
           "measured": {"vllm": "0.32.0", "torch": "2.13.0", "start_s": 30.0,
                        "plan": {"tenants": 2, "batch": 4, "new_tokens": 4, "rounds": 3},
                        "times_s": {"bare": [1.0, 2.0, 1.0], "para": [1.1, 2.2, 1.1]},
                        "ratios": {"para": [1.1, 1.1, 1.1]},
                        "checks": {"para_requests_differ_from_bare": {"value": 0, "of": 4, "ok": False}}}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(res))
    md, _ = report.write(str(path))
    text = open(md).read()
    assert "| vLLM + PARA (para_kernels.vllm) | 14.5 | 1.10 | 1.100 [1.100, 1.100] |" in text
    assert "0 of 4 — FAILED" in text and "commit abc" in text
