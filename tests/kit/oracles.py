"""Independent, row-by-row fp64 implementations of docs/spec.md §1/§3, written from the spec
(not from the reference) so that the reference itself is checked."""
import torch
import torch.nn.functional as F

from para_kernels.ops.activations import RATIONAL_DEN_DEGREE, RATIONAL_NUM_DEGREE


def rational(x, c):
    num = sum(c[j] * x**j for j in range(RATIONAL_NUM_DEGREE + 1))
    den = 1 + sum(c[RATIONAL_NUM_DEGREE + k].abs() * x.abs() ** k for k in range(1, RATIONAL_DEN_DEGREE + 1))
    return num / den


def act(x, name, params=None):
    return {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh,
            "identity": lambda t: t, "rational": lambda t: rational(t, params)}[name](x)


def pool(hidden, start, end, mode, w_sa=None):
    h = hidden.double()
    rows = []
    for b in range(start.shape[0]):
        s, e = int(start[b]), int(end[b])
        x = h[b, s:e] if h.dim() == 3 else h[s:e]
        if mode == "last":
            rows.append(x[-1])
        elif mode == "mean":
            rows.append(x.mean(0))
        elif mode == "max":
            rows.append(x.max(0).values)
        else:
            w = w_sa.double() if w_sa.dim() == 1 else w_sa[b].double()
            alpha = torch.softmax(x @ w, 0)
            rows.append(alpha @ x)
    return torch.stack(rows)


def generate(pooled, w_down, b_down, w_up, b_up, ids, activation, act_params=None):
    rows = []
    for b in range(pooled.shape[0]):
        a = int(ids[b])
        if a < 0:
            rows.append(torch.ones(w_up.shape[2], dtype=torch.float64))
            continue
        params = None if act_params is None else act_params[a].double()
        z = act(pooled[b].double() @ w_down[a].double() + b_down[a].double(), activation, params)
        rows.append(1 + z @ w_up[a].double() + b_up[a].double())
    return torch.stack(rows)


def scale(x, v, token_rows=None):
    if token_rows is not None:
        return torch.stack([x[i].double() * v[int(token_rows[i])].double() for i in range(x.shape[0])])
    return torch.stack([x[b].double() * v[b].double() for b in range(x.shape[0])])


def pool_generate(hidden, start, end, mode, w_sa, w_down, b_down, w_up, b_up, ids, activation, act_params=None):
    return generate(pool(hidden, start, end, mode, w_sa), w_down, b_down, w_up, b_up, ids, activation, act_params)


def scaled_glu(gate, up, v, activation):
    a = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[activation]
    return torch.stack([a(gate[b].double()) * up[b].double() * v[b].double() for b in range(gate.shape[0])])


def scaled_linear(x, weight, bias, v):
    rows = []
    for b in range(x.shape[0]):
        y = x[b].double() @ weight.double().T
        rows.append((y if bias is None else y + bias.double()) * v[b].double())
    return torch.stack(rows)
