"""Plain PyTorch reference of every ``para::`` op: the specification, the CPU fallback and
the test oracle. Each function accumulates in fp32 (fp64 for fp64 inputs) and returns the
input dtype; backward formulas are written out so kernels have one closed form to match."""
from .generate import generate, generate_backward
from .pool import pool, pool_backward
from .scale import scale, scale_backward

__all__ = ["pool", "pool_backward", "generate", "generate_backward", "scale", "scale_backward"]
