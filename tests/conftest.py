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
