"""para_kernels benchmark suite: ``python -m bench`` (``make bench``).

    cli.py       options and the per-device configurations (quick / full)
    runner.py    one run: serving comparison per model, attribution, profile, op suite, report
    harness/     how to measure: timers, alternation, statistics, contention, deadlines, machine
    scenarios/   what is measured: decode / prefill, popularity, sweep, graphs, ops, attribution
    report/      the report JSON schema and the writers reading it: console, Markdown, plots
    smollm2.py   the offline SmolLM2-135M-Instruct loader (also used by scripts/ and tests/)

Its tests are in tests/bench (part of ``make test``).
"""
