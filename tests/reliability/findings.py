"""What the reliability campaign found, by category: the hand-kept half of docs/reliability.md
(the case counts come from running the campaign). Each finding names the test that now guards
it (a pytest node id under tests/). Add one when a campaign finds a failure; never remove one."""
from __future__ import annotations

# category -> (title, what is tried)
CATEGORIES = {
    "files": ("Fuzzed adapter files", "truncated, bit-flipped and lying safetensors headers, huge declared shapes, "
              "duplicate keys, extra files, wrong-typed / unknown / invalid config fields, paths that escape the "
              "folder, symlinks, failed saves"),
    "calls": ("Fuzzed calls", "random configs x tiny architectures x padding sides x prompt lengths x adapter "
              "assignments x dtypes (each row of a mixed batch equals its adapter alone); wrong types and values "
              "for every public argument"),
    "numerics": ("Numerics", "NaN / Inf in one row's prompt; adapters whose weights went NaN or Inf"),
    "long_runs": ("Long runs and resources", "generate calls with changing adapters and batch sizes, "
                  "add / delete / load cycles: RSS, per-call state, hooks, cached banks"),
    "concurrency": ("Concurrency", "threads serving one model at once, against the same requests run in turn"),
}

# Each: {"category": ..., "found": what failed, "fix": what changed, "test": node id, "left": "" or why not fixed}
FINDINGS: list[dict] = [
    # --- files (test_files.py)
    # --- calls and numerics (test_calls.py, test_numerics.py)
    # --- long runs and concurrency (test_long_runs.py, test_concurrency.py)
]
