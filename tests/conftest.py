"""Root conftest: the environment every test runs in (set before para_kernels is imported).
Fixtures and hooks of one layer live in that layer's conftest (ops/, wrapper/, build/)."""
import os
import sys

# The Triton interpreter runs tiny numpy matmuls: multi-threaded OpenBLAS only adds contention.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton's kernels run on the CPU in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # tests import bench.smollm2
    sys.path.insert(0, ROOT)
TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:  # the test kit: tests/kit (import kit, kit.oracles, kit.checks, kit.models)
    sys.path.insert(0, TESTS)

import para_kernels  # noqa: E402,F401 (registers the ops before any test module imports)
