"""Op-level microbenchmarks of ``para::pool``, ``generate`` and ``scale`` (PARA_SPEC §5), and of
the fused ops ``pool_generate``, ``scaled_glu`` and ``scaled_linear`` where the package has them.

For every backend that runs on the device (``para_kernels.ops.available_backends``), forward
(the public ``para_kernels.ops`` functions, no grad) and backward (the ``para::*_backward``
ops, as autograd calls them), on the hidden sizes of SmolLM2-135M and LLaMA-2-7B.

Each case reports the median and IQR of many timed runs (CPU: perf_counter over a calibrated
number of back-to-back calls; GPU: CUDA events, L2 flushed before each run), the bytes the op
must move (each input read once, each output written once), the achieved bandwidth and its
fraction of the measured copy bandwidth, and the floor max(bytes / copy rate, FLOPs / matmul
rate) with both rates measured here.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch

from para_kernels import ops as para_ops

from .common import CpuShare, L2Flusher, summary, time_fn

# hidden size d and the three scaled widths (n_q, n_v, n_u) of each model
MODELS = {
    "SmolLM2-135M": {"d": 576, "n_q": 576, "n_v": 192, "n_u": 1536},
    "LLaMA-2-7B": {"d": 4096, "n_q": 4096, "n_v": 4096, "n_u": 11008},
}


@dataclass
class OpsConfig:
    batches: tuple = (1, 8, 32)
    prompt_lens: tuple = (64,)
    models: tuple = ("SmolLM2-135M", "LLaMA-2-7B")
    pool_modes: tuple = ("last", "mean", "max", "attn")
    dtypes: tuple = ("float32",)
    adapters: int = 4
    r: int = 12
    activation: str = "gelu"
    samples: int = 25
    max_case_s: float = 0.2
    copy_mib: int = 256
    matmul_n: int = 1024
    seed: int = 0


# ----------------------------------------------------------------- machine rates
def copy_rate(device: torch.device, mib: int) -> dict:
    """Bytes per second of ``dst.copy_(src)`` on a large buffer, counting read + write."""
    n = mib * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    times = time_fn(lambda: dst.copy_(src), device, samples=15, min_sample_s=0.0, warmup=2,
                    flush=L2Flusher(device) if device.type == "cuda" else None)
    s = summary(times)
    return {"bytes": 2 * src.numel() * 4, "time": s, "bytes_per_s": 2 * src.numel() * 4 / s["median"],
            "what": f"Tensor.copy_ of a {mib} MiB fp32 buffer ({'device to device' if device.type == 'cuda' else 'host memory'}), read + write"}


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype) -> dict:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = time_fn(lambda: a @ b, device, samples=10, min_sample_s=0.0, warmup=2)
    s = summary(times)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "time": s, "flops_per_s": 2 * n**3 / s["median"]}


# ----------------------------------------------------------------- cases
def _prompt(B: int, T: int, device):
    start = torch.zeros(B, dtype=torch.long, device=device)
    return start, torch.full((B,), T, dtype=torch.long, device=device)


def cases(cfg: OpsConfig, device: torch.device, dtype: torch.dtype):
    """Yield (meta, forward fn, backward fn, bytes fwd, bytes bwd, flops fwd, flops bwd)."""
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    es = torch.tensor([], dtype=dtype).element_size()

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    for model, B, T in itertools.product(cfg.models, cfg.batches, cfg.prompt_lens):
        sz = MODELS[model]
        d, N = sz["d"], sz["n_q"] + sz["n_v"] + sz["n_u"]
        base = {"model": model, "B": B, "T": T, "d": d}
        # ---- pool: hidden [B, T, d], whole row is the prompt
        hidden = rnd(B, T, d)
        start, end = _prompt(B, T, device)
        w_sa = rnd(d) / d ** 0.5
        grad_p = rnd(B, d)
        for mode in cfg.pool_modes:
            w = w_sa if mode == "attn" else None
            read_h = B * d if mode == "last" else B * T * d
            fwd_bytes = es * (read_h + B * d + (d if w is not None else 0)) + 2 * B * 8
            # backward reads grad (and hidden for max / attn), writes grad_hidden [B, T, d]
            bwd_bytes = es * (B * d + (B * T * d if mode in ("max", "attn") else 0) + B * T * d
                              + (2 * d if w is not None else 0)) + 2 * B * 8
            flops = 0 if mode in ("last", "max") else 2 * B * T * d * (2 if mode == "attn" else 1)
            yield ({**base, "op": "pool", "variant": mode, "n": d},
                   (lambda h=hidden, w=w, m=mode, s=start, e=end: para_ops.pool(h, s, e, m, w)),
                   (lambda h=hidden, w=w, m=mode, s=start, e=end, gp=grad_p:
                    torch.ops.para.pool_backward(gp, h, s, e, m, w)),
                   fwd_bytes, bwd_bytes, flops, 2 * flops)
        # ---- generate: bank of `adapters`, rows spread over them
        A, r = cfg.adapters, cfg.r
        pooled = rnd(B, d)
        w_down, b_down = rnd(A, d, r) / d ** 0.5, rnd(A, r) * 0.1
        w_up, b_up = rnd(A, r, N) * 0.02, rnd(A, N) * 0.02
        ids = (torch.arange(B) % A).to(device)
        used = min(A, B)
        weights = used * (d * r + r + r * N + N)
        grad_v = rnd(B, N)
        gen_bytes = es * (B * d + weights + B * N) + B * 8
        gen_bwd_bytes = es * (B * N + B * d + weights + B * d + A * (d * r + r + r * N + N)) + B * 8
        gen_flops = 2 * B * (d * r + r * N)
        yield ({**base, "op": "generate", "variant": f"A={A} r={r} N={N}", "n": N},
               (lambda a=(pooled, w_down, b_down, w_up, b_up, ids): para_ops.generate(*a, cfg.activation)),
               (lambda a=(grad_v, pooled, w_down, b_down, w_up, b_up, ids):
                torch.ops.para.generate_backward(*a, cfg.activation, None)),
               gen_bytes, gen_bwd_bytes, gen_flops, 2 * B * (3 * d * r + 2 * r * N))
        # ---- scale: the FFN up projection's output (the widest scaled activation),
        # at decode (1 token per row) and at prefill (T tokens per row)
        n = sz["n_u"]
        v = 1.0 + rnd(B, n) * 0.1
        for tokens, variant in ((1, "decode T=1"), (T, f"prefill T={T}")):
            x = rnd(B, tokens, n)
            grad_x = rnd(B, tokens, n)
            fwd_bytes = es * (2 * B * tokens * n + B * n)
            bwd_bytes = es * (3 * B * tokens * n + 2 * B * n)
            yield ({**base, "op": "scale", "variant": variant, "n": n, "tokens": tokens},
                   (lambda x=x, v=v: para_ops.scale(x, v)),
                   (lambda x=x, gx=grad_x, v=v: torch.ops.para.scale_backward(gx, x, v, None)),
                   fwd_bytes, bwd_bytes, B * tokens * n, 2 * B * tokens * n)


def fused_cases(cfg: OpsConfig, device: torch.device, dtype: torch.dtype):
    """The fused ops (pool_generate, scaled_glu, scaled_linear), where the package has them."""
    if not all(hasattr(para_ops, n) for n in ("pool_generate", "scaled_glu", "scaled_linear")):
        return
    g = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    es = torch.tensor([], dtype=dtype).element_size()

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    for model, B, T in itertools.product(cfg.models, cfg.batches, cfg.prompt_lens):
        sz = MODELS[model]
        d, nq, nu, N = sz["d"], sz["n_q"], sz["n_u"], sz["n_q"] + sz["n_v"] + sz["n_u"]
        base = {"model": model, "B": B, "T": T, "d": d}
        A, r = cfg.adapters, cfg.r
        hidden = rnd(B, T, d)
        start, end = _prompt(B, T, device)
        bank = (rnd(A, d, r) / d ** 0.5, rnd(A, r) * 0.1, rnd(A, r, N) * 0.02, rnd(A, N) * 0.02)
        ids = (torch.arange(B) % A).to(device)
        weights = min(A, B) * (d * r + r + r * N + N)
        grad_v = rnd(B, N)
        yield ({**base, "op": "pool_generate", "variant": f"last A={A} r={r} N={N}", "n": N},
               (lambda a=(hidden, start, end, "last", None, *bank, ids): para_ops.pool_generate(*a, cfg.activation)),
               (lambda a=(grad_v, hidden, start, end, "last", None, *bank, ids):
                torch.ops.para.pool_generate_backward(*a, cfg.activation, None)),
               es * (B * d + weights + B * N) + 3 * B * 8,
               es * (B * N + B * d + weights + B * T * d + A * (d * r + r + r * N + N)) + 3 * B * 8,
               2 * B * (d * r + r * N), 2 * B * (3 * d * r + 2 * r * N))
        for tokens, variant in ((1, "decode T=1"), (T, f"prefill T={T}")):
            gate, up = rnd(B, tokens, nu), rnd(B, tokens, nu)
            v = 1.0 + rnd(B, nu) * 0.1
            grad = rnd(B, tokens, nu)
            m = B * tokens * nu
            yield ({**base, "op": "scaled_glu", "variant": f"silu {variant}", "n": nu, "tokens": tokens},
                   (lambda a=(gate, up, v): para_ops.scaled_glu(*a, "silu")),
                   (lambda a=(grad, gate, up, v): torch.ops.para.scaled_glu_backward(*a, "silu")),
                   es * (3 * m + B * nu), es * (5 * m + 2 * B * nu), 6 * m, 12 * m)
        # scaled_linear as the q projection, at decode only (prefill-sized matmuls take seconds on a CPU)
        x, w = rnd(B, 1, d), rnd(nq, d) / d ** 0.5
        v = 1.0 + rnd(B, nq) * 0.1
        grad = rnd(B, 1, nq)
        yield ({**base, "op": "scaled_linear", "variant": "q_proj decode T=1", "n": nq, "tokens": 1},
               (lambda a=(x, w, None, v): para_ops.scaled_linear(*a)),
               (lambda a=(grad, x, w, None, v): torch.ops.para.scaled_linear_backward(*a)),
               es * (B * d + nq * d + B * nq + B * nq), es * (2 * B * nq + 2 * B * d + 2 * nq * d + B * nq),
               2 * B * d * nq, 4 * B * d * nq)


def run(cfg: OpsConfig, device: torch.device, *, progress_factory, log=print) -> dict:
    rates = {"copy": copy_rate(device, cfg.copy_mib)}
    log(f"measured copy bandwidth: {rates['copy']['bytes_per_s'] / 1e9:.1f} GB/s (read + write)")
    flush = L2Flusher(device) if device.type == "cuda" else None
    rows, errors = [], []
    backends = para_ops.available_backends(device)
    previous = para_ops.get_backend()
    try:
        for dtype_name in cfg.dtypes:
            dtype = getattr(torch, dtype_name)
            mm = matmul_rate(device, cfg.matmul_n, dtype)
            rates[f"matmul_{dtype_name}"] = mm
            log(f"measured {dtype_name} matmul rate: {mm['flops_per_s'] / 1e9:.1f} GFLOP/s")
            all_cases = list(cases(cfg, device, dtype)) + list(fused_cases(cfg, device, dtype))
            total = len(all_cases) * 2 * len(backends)
            with progress_factory(total=total, desc=f"ops {dtype_name}") as bar:
                for backend in backends:
                    para_ops.set_backend(backend)
                    for meta, fwd, bwd, b_fwd, b_bwd, f_fwd, f_bwd in all_cases:
                        for direction, fn, nbytes, flops in (("forward", fwd, b_fwd, f_fwd),
                                                             ("backward", bwd, b_bwd, f_bwd)):
                            share = CpuShare()
                            share.start()
                            try:
                                with torch.no_grad():
                                    times = time_fn(fn, device, samples=cfg.samples,
                                                    max_total_s=cfg.max_case_s, flush=flush)
                            except Exception as e:  # a backend may not implement every op / shape
                                errors.append({**meta, "direction": direction, "backend": backend,
                                               "dtype": dtype_name, "error": f"{type(e).__name__}: {e}"[:300]})
                                bar.update(1)
                                continue
                            others = share.stop()
                            s = summary(times)
                            bw = nbytes / s["median"]
                            floor = max(nbytes / rates["copy"]["bytes_per_s"], flops / mm["flops_per_s"])
                            rows.append({**meta, "direction": direction, "backend": backend, "dtype": dtype_name,
                                         "time": s, "bytes": nbytes, "flops": flops,
                                         "gb_per_s": bw / 1e9,
                                         "frac_of_copy_bw": bw / rates["copy"]["bytes_per_s"],
                                         "floor_s": floor, "floor_over_time": floor / s["median"],
                                         "others_cpu": others})
                            bar.update(1)
    finally:
        para_ops.set_backend(previous)
    return {"config": asdict(cfg), "backends": backends, "rates": rates, "rows": rows, "errors": errors,
            "timer": "CUDA events, L2 flushed before each run" if device.type == "cuda"
            else "perf_counter_ns over a calibrated number of back-to-back calls (>= 0.2 ms per sample)"}
