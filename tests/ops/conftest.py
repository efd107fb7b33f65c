"""Fixtures of the op tests: the backend grid, and one backend forced."""
import pytest
import torch

import para_kernels
from para_kernels.ops import dispatch

from kit import TRITON_DEVICES

DEVICES = ["cpu", "cuda"]


def _backend_param(device, backend):
    if device == "cuda" and not torch.cuda.is_available():
        reason = "needs a GPU"
    elif backend not in dispatch.available_backends(device):
        reason = f"the {backend} backend cannot run on {device} here"
    else:
        reason = None
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param((device, backend), id=f"{device}-{backend}", marks=marks)


# every (device, backend) pair: the ones that cannot run here are skipped, with the reason
BACKEND_PARAMS = [_backend_param(dev, b) for dev in DEVICES for b in reversed(dispatch.BACKENDS)]


@pytest.fixture(params=BACKEND_PARAMS)
def device_backend(request):
    """Run the test with one backend forced, through the same dispatch users have."""
    device, backend = request.param
    para_kernels.set_backend(backend)
    yield device, backend
    para_kernels.set_backend(None)


@pytest.fixture
def triton_backend():
    """The Triton backend forced for the test (the kernel tests of tests/ops/*: Triton sections)."""
    para_kernels.set_backend("triton")
    try:
        yield
    finally:
        para_kernels.set_backend(None)


# the devices the Triton backend runs on here (a GPU, or the CPU in Triton's interpreter)


@pytest.fixture(params=TRITON_DEVICES or [pytest.param(None, marks=pytest.mark.skip(
    reason="Triton needs CUDA or TRITON_INTERPRET=1"))])
def triton_device(request):
    """Each device the Triton backend runs on here, with the Triton backend forced."""
    para_kernels.set_backend("triton")
    yield request.param
    para_kernels.set_backend(None)
