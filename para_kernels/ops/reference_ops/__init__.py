"""The ``reference`` backend: plain PyTorch implementations of every ``para::`` op, one module
per op (``<op>.py`` defines ``<op>`` and ``<op>_backward``). They are the specification, the
fallback on every device and the tests' oracle. Each function accumulates in fp32 (fp64 for fp64
inputs) and returns the input dtype; backward formulas are written out so that kernels have one
closed form to match."""
from .. import dispatch

# Re-exported for callers that run the reference directly (ops.scale's fast path, tests, bench).
from .generate import generate, generate_backward  # noqa: F401
from .pool import pool, pool_backward  # noqa: F401
from .pool_generate import pool_generate, pool_generate_backward  # noqa: F401
from .scale import scale, scale_backward  # noqa: F401
from .scaled_glu import scaled_glu, scaled_glu_backward  # noqa: F401
from .scaled_linear import scaled_linear, scaled_linear_backward  # noqa: F401

dispatch.register_backend("reference", dispatch.load_implementations(__name__), is_available=lambda device: True)
