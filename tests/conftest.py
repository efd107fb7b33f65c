import os
import sys

# The Triton interpreter runs tiny numpy matmuls: multi-threaded OpenBLAS only adds contention.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton's kernels run on the CPU in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # tests import bench.smollm2
    sys.path.insert(0, ROOT)

import para_kernels  # noqa: E402
from para_kernels.ops import dispatch  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (device, backend) pairs the op tests run on: every backend that can run there.
BACKEND_PARAMS = [pytest.param((dev, b), id=f"{dev}-{b}") for dev in DEVICES
                  for b in dispatch.available_backends(dev)]


@pytest.fixture(params=BACKEND_PARAMS)
def device_backend(request):
    """Run the test with one backend forced, through the same dispatch users have."""
    device, backend = request.param
    para_kernels.set_backend(backend)
    yield device, backend
    para_kernels.set_backend(None)



def _compile_module(items):
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__.endswith("test_triton_compile") and hasattr(module, "start"):
            return module
    return None


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected what they deselect
def pytest_collection_modifyitems(config, items):
    """The ahead-of-time Triton compile (tests/test_triton_compile.py) starts now, in two
    background processes, when any of its tests is selected: it overlaps the other tests."""
    module = _compile_module(items)
    if module is not None and not torch.cuda.is_available():
        import tempfile
        module.start(tempfile.mkdtemp(prefix="para-aot-"))
        config._para_compile_module = module


def pytest_sessionfinish(session):
    """No compile outlives the session (one interrupted or failed early)."""
    module = getattr(session.config, "_para_compile_module", None)
    for proc, *_ in (module._RUNS.values() if module is not None else ()):
        if proc.poll() is None:
            proc.kill()
