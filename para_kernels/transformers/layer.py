"""The per-layer vector generator: each adapter's weights, stacked into a bank for a batch."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import PARAConfig
from ..ops.activations import RATIONAL_GELU_INIT

WEIGHT_NAMES = ("w_down", "b_down", "w_up", "b_up", "w_sa", "act_params")


def weight_shapes(config: PARAConfig, d: int, n: int) -> dict[str, tuple]:
    """Shape of each of one adapter's tensors in one layer (d: hidden size, n: N = n_q+n_v+n_u)."""
    shapes = {"w_down": (d, config.r), "b_down": (config.r,), "w_up": (config.r, n), "b_up": (n,)}
    if config.pooler == "attn":
        shapes["w_sa"] = (d,)
    if config.activation == "rational":
        shapes["act_params"] = (len(RATIONAL_GELU_INIT),)
    return shapes


class AdapterWeights(nn.Module):
    """One adapter's generator in one layer: p -> 1 + g(p W_down + b_down) W_up + b_up."""

    def __init__(self, config: PARAConfig, d: int, n: int, dtype: torch.dtype, device=None):
        super().__init__()
        for name, shape in weight_shapes(config, d, n).items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, dtype=dtype, device=device)))
        bound = config.init_scale / math.sqrt(d)
        with torch.no_grad():
            self.w_down.uniform_(-bound, bound)
            if config.activation == "rational":
                self.act_params.copy_(torch.tensor(RATIONAL_GELU_INIT, dtype=dtype))
        # w_up, b_up start at zero (v = 1: the model equals its backbone); w_sa at zero
        # makes the attention pooler start as the mean.


class PARAGenerator(nn.Module):
    """Attached to a decoder layer as ``para_generator``: the adapters resident in that layer."""

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()

    def bank(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named adapters' weights stacked along a leading adapter axis A (a view when A=1),
        in the layout of ``para::generate``: w_down [A,d,r], b_down [A,r], w_up [A,r,N], ..."""
        weights = [self.adapters[n] for n in names]
        out = {}
        for key in WEIGHT_NAMES:
            tensors = [getattr(w, key, None) for w in weights]
            if tensors[0] is not None:
                out[key] = tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)
        return out
