"""Bad input to the ops: a clear error naming the argument, before any backend runs (every op;
the CUDA C++ wrappers' own checks are in each op's file)."""
import pytest
import torch

# para_kernels internals
from para_kernels import ops
from para_kernels.ops import dispatch

H = torch.randn(2, 5, 4)
S, E = torch.tensor([0, 1]), torch.tensor([5, 3])
P = torch.randn(2, 4)
WD, BD, WU, BU = torch.randn(3, 4, 2), torch.randn(3, 2), torch.randn(3, 2, 6), torch.randn(3, 6)
IDS = torch.tensor([0, -1])
X, V = torch.randn(2, 5, 6), torch.randn(2, 6)

CASES = [
    ("pool: hidden 1-D", lambda: ops.pool(torch.randn(4), S, E), ValueError, "hidden must be"),
    ("pool: int hidden", lambda: ops.pool(H.long(), S, E), TypeError, "hidden must be float"),
    ("pool: start count", lambda: ops.pool(H, torch.tensor([0]), E), ValueError,
     "prompt_start must have shape [B] = [2]"),
    ("pool: end 2-D", lambda: ops.pool(H, S, E[None]), ValueError, "prompt_end"),
    ("pool: float ranges", lambda: ops.pool(H, S.float(), E), TypeError, "prompt_start must be int32 or int64"),
    ("pool: end past T", lambda: ops.pool(H, S, torch.tensor([6, 3])), ValueError, "T = 5"),
    ("pool: empty prompt", lambda: ops.pool(H, S, torch.tensor([5, 1])), ValueError, "prompt length 0"),
    ("pool: negative start", lambda: ops.pool(H, torch.tensor([-1, 0]), E), ValueError, "row 0"),
    ("pool: packed end past total", lambda: ops.pool(H.reshape(10, 4), S, torch.tensor([5, 11])), ValueError,
     "total = 10"),
    ("pool: bad mode", lambda: ops.pool(H, S, E, "median"), ValueError, "mode must be one of"),
    ("pool: attn without w_sa", lambda: ops.pool(H, S, E, "attn"), ValueError, "w_sa must be given"),
    ("pool: w_sa with mean", lambda: ops.pool(H, S, E, "mean", torch.randn(4)), ValueError, "w_sa"),
    ("pool: w_sa shape", lambda: ops.pool(H, S, E, "attn", torch.randn(3)), ValueError, "w_sa must have shape"),
    ("pool: w_sa dtype", lambda: ops.pool(H, S, E, "attn", torch.randn(4).double()), TypeError, "w_sa has dtype"),
    ("pool: ranges on meta", lambda: ops.pool(H, S.to("meta"), E), ValueError, "prompt_start is on meta"),
    ("generate: pooled 3-D", lambda: ops.generate(H, WD, BD, WU, BU, IDS), ValueError, "pooled must be [B, d]"),
    ("generate: w_down d", lambda: ops.generate(P, WD[:, :3], BD, WU, BU, IDS), ValueError, "w_down must have shape"),
    ("generate: w_up r", lambda: ops.generate(P, WD, BD, WU[:, :1], BU, IDS), ValueError, "w_up must have shape"),
    ("generate: b_up N", lambda: ops.generate(P, WD, BD, WU, BU[:, :5], IDS), ValueError, "b_up must have shape"),
    ("generate: b_down A", lambda: ops.generate(P, WD, BD[:2], WU, BU, IDS), ValueError, "b_down must have shape"),
    ("generate: dtype mix", lambda: ops.generate(P, WD.double(), BD, WU, BU, IDS), TypeError, "w_down has dtype"),
    ("generate: ids count", lambda: ops.generate(P, WD, BD, WU, BU, torch.tensor([0])), ValueError,
     "adapter_ids must have shape [2]"),
    ("generate: id too big", lambda: ops.generate(P, WD, BD, WU, BU, torch.tensor([0, 3])), ValueError,
     "adapter_ids[1] = 3"),
    ("generate: id below -1", lambda: ops.generate(P, WD, BD, WU, BU, torch.tensor([-2, 0])), ValueError,
     "adapter_ids[0] = -2"),
    ("generate: activation", lambda: ops.generate(P, WD, BD, WU, BU, IDS, "swish"), ValueError, "activation must be"),
    ("generate: rational params", lambda: ops.generate(P, WD, BD, WU, BU, IDS, "rational"), ValueError, "act_params"),
    ("generate: params shape", lambda: ops.generate(P, WD, BD, WU, BU, IDS, "rational", torch.randn(3, 9)),
     ValueError, "act_params must have shape"),
    ("scale: n mismatch", lambda: ops.scale(X, V[:, :5]), ValueError, "x must end in n = 5"),
    ("scale: B mismatch", lambda: ops.scale(X, torch.randn(3, 6)), ValueError, "B = 3 rows"),
    ("scale: dtype mix", lambda: ops.scale(X, V.half()), TypeError, "v has dtype"),
    ("scale: v 1-D", lambda: ops.scale(X, V[0]), ValueError, "v must be [B, n]"),
    ("scale: token_rows count", lambda: ops.scale(torch.randn(4, 6), V, torch.tensor([0, 1])), ValueError,
     "token_rows must have shape [4]"),
    ("scale: token_rows range", lambda: ops.scale(torch.randn(2, 6), V, torch.tensor([0, 2])), ValueError,
     "token_rows[1] = 2"),
]


@pytest.mark.parametrize("name,call,error,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_named(name, call, error, fragment):
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value)


def test_errors_come_before_any_backend(monkeypatch):
    """A backend must never see invalid arguments."""
    def explode(*args, **kwargs):
        raise AssertionError("backend called with invalid input")

    backend = dispatch._backends["reference"]
    monkeypatch.setattr(backend, "impls", {name: explode for name in backend.impls})
    for _, call, error, _ in CASES:
        with pytest.raises(error):
            call()


def test_direct_custom_op_calls_are_checked_too():
    with pytest.raises(ValueError, match="T = 5"):
        torch.ops.para.pool(H, S, torch.tensor([6, 3]), "last", None)
    with pytest.raises(ValueError, match="adapter_ids"):
        torch.ops.para.generate(P, WD, BD, WU, BU, torch.tensor([0, 5]), "gelu", None)


# ------------------------------------------------------------------ the fused ops
FX, FV = torch.randn(2, 3, 4), torch.randn(2, 4)
FUSED_ERRORS = [
    ("glu: up shape", lambda: ops.scaled_glu(FX, FX[:, :2], FV), "up must have gate's shape"),
    ("glu: v rows", lambda: ops.scaled_glu(FX, FX, torch.randn(3, 4)), "gate must be [B, ..., n] = [3, ..., 4]"),
    ("glu: activation", lambda: ops.scaled_glu(FX, FX, FV, "relu"), "activation must be one of"),
    ("linear: weight k", lambda: ops.scaled_linear(FX, torch.randn(5, 3), None, torch.randn(2, 5)),
     "weight must be [n, k] with k = 4"),
    ("linear: bias n", lambda: ops.scaled_linear(FX, torch.randn(5, 4), torch.randn(4), torch.randn(2, 5)),
     "bias must have shape"),
    ("linear: v shape", lambda: ops.scaled_linear(FX, torch.randn(5, 4), None, FV), "v must be [B, n] = [2, 5]"),
    ("pool_generate: d", lambda: ops.pool_generate(FX, torch.tensor([0, 0]), torch.tensor([3, 3]), "last", None,
                                                    torch.randn(1, 5, 2), torch.randn(1, 2), torch.randn(1, 2, 3),
                                                    torch.randn(1, 3), torch.tensor([0, -1])),
     "w_down must have shape"),
    ("pool_generate: range", lambda: ops.pool_generate(FX, torch.tensor([0, 0]), torch.tensor([4, 3]), "last", None,
                                                        torch.randn(1, 4, 2), torch.randn(1, 2), torch.randn(1, 2, 3),
                                                        torch.randn(1, 3), torch.tensor([0, -1])), "T = 3"),
]


@pytest.mark.parametrize("name,call,fragment", FUSED_ERRORS, ids=[c[0] for c in FUSED_ERRORS])
def test_fused_bad_input_is_named(name, call, fragment):
    with pytest.raises(ValueError) as info:
        call()
    assert fragment in str(info.value)
