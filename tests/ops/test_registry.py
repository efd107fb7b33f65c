"""The lists of ops agree: dispatch.OPS is the one Python list; csrc/library.cpp, which C++
keeps apart, defines the same names as cuda_ops.OPS; and the backends laid out one module per
op implement every op."""
import os
import re

import pytest

from para_kernels.ops import cuda_ops, dispatch

from kit import ROOT

LIBRARY_CPP = os.path.join(ROOT, "csrc", "library.cpp")


@pytest.mark.skipif(not os.path.exists(LIBRARY_CPP), reason="no source tree (installed wheel)")
def test_cuda_ops_list_is_what_library_cpp_defines():
    with open(LIBRARY_CPP) as f:
        defined = re.findall(r'm\.def\(\s*"(\w+)\(', f.read())
    assert defined and sorted(defined) == sorted(cuda_ops.OPS)
    assert set(cuda_ops.OPS) <= set(dispatch.OPS)


def test_reference_implements_every_op():
    assert sorted(dispatch._backends["reference"].impls) == sorted(dispatch.OPS)


def test_every_op_has_its_backward():
    assert set(dispatch.OPS) == {*dispatch.FORWARD_OPS, *(f"{op}_backward" for op in dispatch.FORWARD_OPS)}
