"""Plain PyTorch reference of every ``para::`` op: the specification, the CPU fallback and
the test oracle. Each function accumulates in fp32 (fp64 for fp64 inputs) and returns the
input dtype; backward formulas are written out so kernels have one closed form to match."""
from .fused import (pool_generate, pool_generate_backward, scaled_glu, scaled_glu_backward, scaled_linear,
                    scaled_linear_backward)
from .generate import generate, generate_backward
from .pool import pool, pool_backward
from .scale import scale, scale_backward

__all__ = ["pool", "pool_backward", "generate", "generate_backward", "scale", "scale_backward",
           "pool_generate", "pool_generate_backward", "scaled_glu", "scaled_glu_backward",
           "scaled_linear", "scaled_linear_backward"]
