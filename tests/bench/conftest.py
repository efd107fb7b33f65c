"""Tests of the benchmark suite (bench/): its code paths, its correctness checker and its
pytest-benchmark cases. They run in ``make test`` in a small mode: the pytest-benchmark cases
get a short timing budget (each case still runs, so a case that raises fails). With
``PARA_BENCH_LARGE=1`` they run at the benchmark sizes with pytest-benchmark's own budget."""
from __future__ import annotations

import os

import pytest

LARGE = os.environ.get("PARA_BENCH_LARGE") == "1"


def pytest_collection_modifyitems(config, items):
    """Small mode: at most ~50 ms of timing per pytest-benchmark case, one round minimum."""
    if LARGE:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()) and str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.benchmark(max_time=0.05, min_rounds=1, warmup=False))



@pytest.fixture(autouse=True)
def no_waiting_for_a_quiet_machine(monkeypatch):
    """``python -m bench`` waits (minutes, on a shared machine) for other processes to leave the
    CPUs and repeats the runs they slowed; tests check code paths, not timings, so the serving
    configs that ``main()`` builds here never wait and never repeat a run."""
    from bench import cli

    make = cli.serving_config

    def never_waiting(*args, **kwargs):
        cfg = make(*args, **kwargs)
        cfg.max_wait_s, cfg.max_other_cpu = 0.0, 1.0  # a share of the CPUs never exceeds 1
        return cfg

    monkeypatch.setattr(cli, "serving_config", never_waiting)
