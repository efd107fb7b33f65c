import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 when the inputs already are."""
    return torch.float64 if dtype == torch.float64 else torch.float32
