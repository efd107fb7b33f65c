"""Where PARA's time per decode token goes: each part of its decode path timed in isolation on
the real model's modules with decode-sized tensors (batch rows x 1 token), after a real prefill
and one real decode step through the PARA model (so PARA is in its decode state), then counted
as often as one decode step runs it. The sum is set beside the measured difference between the
PARA and bare decode steps. Everything is measured; nothing is taken from PARA's internals
except the hooks and forwards it installed on the model's modules.

Per decode step, in each decoder layer, PARA changes what q_proj, v_proj and the FFN (mlp) do —
with forward hooks or instance-level forward overrides (fused consumers), whichever the package
installs — and runs the layer's forward pre-hook; plus hooks on the wrapped model itself.
"""
from __future__ import annotations

import copy
import cProfile
import io
import pstats
import time
from contextlib import ExitStack

import torch
from torch import nn

from para_kernels import ops
from para_kernels.transformers import consumers
from para_kernels.transformers.state import active

from ..harness.stats import summary
from ..harness.timers import sync, time_fn
from .lora_baselines import decoder_layers

MODULES = ("self_attn.q_proj", "self_attn.v_proj", "mlp")


def _t(fn, device, samples=40) -> float:
    return summary(time_fn(fn, device, samples=samples, min_sample_s=2e-3, max_total_s=1.0))["median"]


def _sample(fn, k: int, device) -> float:
    sync(device)
    t0 = time.perf_counter_ns()
    for _ in range(k):
        fn()
    sync(device)
    return (time.perf_counter_ns() - t0) / 1e9 / k


def _paired(fa, fb, device, pairs=60, min_sample_s=2e-3) -> tuple[float, float, float]:
    """(median of per-pair differences a - b, median a, median b): samples alternate a, b, a, b
    (each ``k`` back-to-back calls, >= min_sample_s), so drift of the machine cancels."""
    for _ in range(3):
        fa(), fb()
    k = max(1, int(min_sample_s / max(_sample(fa, 1, device), 1e-7)))
    da, db = [], []
    for _ in range(pairs):
        da.append(_sample(fa, k, device))
        db.append(_sample(fb, k, device))
    diffs = [a - b for a, b in zip(da, db)]
    return summary(diffs)["median"], summary(da)["median"], summary(db)["median"]


def calls_per_decode_step(s, top: int = 12) -> list[dict]:
    """cProfile of one real decode step of the PARA model: the para_kernels functions it calls,
    how often, and their own time under the profiler (which inflates Python-heavy code)."""
    B = s.input_ids.shape[0]
    with torch.no_grad():
        out = s.forward("para", use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        mask = torch.ones(B, s.input_ids.shape[1] + 1, dtype=torch.long, device=s.device)
        prof = cProfile.Profile()
        prof.enable()
        s.para(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True,
               logits_to_keep=1)
        prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    for (filename, line, func), (_, nc, tt, ct, _) in stats.stats.items():
        if "para_kernels" in filename:
            short = filename.split("para_kernels", 1)[1].lstrip("/\\")
            rows.append({"function": f"{short}:{line}({func})", "calls": nc, "tottime_s": tt, "cumtime_s": ct})
    rows.sort(key=lambda r: -r["tottime_s"])
    return rows[:top]


def _hooks(module: nn.Module) -> list[tuple[str, object, bool]]:
    """(kind, hook, with_kwargs) of every forward pre-hook and forward hook on ``module``."""
    out = []
    for k, h in module._forward_pre_hooks.items():
        out.append(("pre", h, k in module._forward_pre_hooks_with_kwargs))
    for k, h in module._forward_hooks.items():
        out.append(("post", h, k in getattr(module, "_forward_hooks_with_kwargs", {})))
    return out


def measure(s, decode_delta_s: float | None = None) -> dict:
    """``s``: a serving.Setup with PARA built. ``decode_delta_s``: measured PARA - bare time per
    decode step (from the headline runs), for comparison."""
    device = s.device
    dtype = next(s.bare.parameters()).dtype  # the modules' inputs must be in the model's dtype (bf16 on a GPU)
    bare_layers = decoder_layers(s.bare)
    para_layers = decoder_layers(s.para.get_base_model())
    n_layers = len(bare_layers)
    B = s.input_ids.shape[0]
    g = torch.Generator().manual_seed(1)
    pieces = {}
    with torch.no_grad():
        # a real prefill and one real decode step put PARA in its decode state
        out = s.forward("para", use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        mask = torch.ones(B, s.input_ids.shape[1] + 1, dtype=torch.long, device=device)
        s.para(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True,
               logits_to_keep=1)
        # the modules and hooks below are called directly, as part of that request's decode step
        request = s.para.request_state(out.past_key_values)
        stack = ExitStack()
        stack.enter_context(active(request))
        d = s.bare.config.hidden_size
        x = torch.randn(B, 1, d, generator=g).to(device=device, dtype=dtype)
        # 1. each PARA-touched module: PARA's module (with its hooks / forward) minus the bare one
        for path in MODULES:
            pm, bm = para_layers[0].get_submodule(path), bare_layers[0].get_submodule(path)
            how = ("forward override" if "forward" in pm.__dict__ else "") + \
                  (" + hooks" if _hooks(pm) else "")
            delta, t_para, t_bare = _paired(lambda pm=pm: pm(x), lambda bm=bm: bm(x), device)
            # A/A control: a plain copy of the bare module, timed the same way
            ctrl = copy.deepcopy(bm)
            aa, _, _ = _paired(lambda ctrl=ctrl: ctrl(x), lambda bm=bm: bm(x), device)
            pieces[f"{path}: PARA - bare"] = {
                "per_call_s": delta, "calls": n_layers, "aa_control_s": aa,
                "what": f"extra time of layer 0's {path} under PARA ({how.strip(' +') or 'unchanged'}); "
                        f"bare {t_bare * 1e6:.1f} us, PARA {t_para * 1e6:.1f} us; A/A control (a plain copy "
                        f"of the bare module - bare): {aa * 1e6:+.1f} us"}
        # 2. the decoder layer's PARA hooks, called as nn.Module would (decode state)
        layer = para_layers[0]
        hs = torch.randn(B, 1, d, generator=g).to(device=device, dtype=dtype)
        layer_hooks = _hooks(layer)

        def run_layer_hooks():
            for kind, h, kw in layer_hooks:
                if kind == "pre":
                    h(layer, (hs,), {}) if kw else h(layer, (hs,))
        pieces["decoder-layer hooks (bodies)"] = {
            "per_call_s": _t(run_layer_hooks, device), "calls": n_layers,
            "what": f"{len(layer_hooks)} hook(s) on each decoder layer, bodies only, in the decode state"}
        # 3. leaving nn.Module's fast path: a module with one no-op (with-kwargs) pre-hook
        ident = nn.Identity()
        t0 = _t(lambda: ident(hs), device)
        hnd = ident.register_forward_pre_hook(lambda m, a, k: None, with_kwargs=True)
        t1 = _t(lambda: ident(hs), device)
        hnd.remove()
        pieces["hooked-module dispatch"] = {
            "per_call_s": t1 - t0, "calls": n_layers * (1 if layer_hooks else 0),
            "what": "extra cost of calling a module that has one no-op forward pre-hook (nn.Module slow path)"}
        # 4. hooks on the wrapped model
        model_hooks = _hooks(s.para.get_base_model())
        cache = out.past_key_values
        kwargs = {"input_ids": nxt, "attention_mask": mask, "past_key_values": cache}

        def run_model_hooks():  # pre then post: the pre-hook enters the request, the post-hook leaves it
            for kind, h, kw in model_hooks:
                if kind == "pre":
                    h(s.para.get_base_model(), (), kwargs) if kw else h(s.para.get_base_model(), ())
                elif kw:
                    h(s.para.get_base_model(), (), kwargs, None)
                else:
                    h(s.para.get_base_model(), (), None)
        pieces["model-level hooks (bodies)"] = {
            "per_call_s": _t(run_model_hooks, device), "calls": 1,
            "what": f"{sum(k == 'pre' for k, _, _ in model_hooks)} pre-hook(s) and "
                    f"{sum(k == 'post' for k, _, _ in model_hooks)} post-hook(s) on the wrapped model at a "
                    "decode step"}
        # 5. inside the module deltas: the rescale as eager decoding runs it (one in-place
        # multiply by the module's slot), the checked public op (training / compile paths), and
        # a bare multiply on the same tensors
        inplace_s, scale_s, mul_s = 0.0, 0.0, 0.0
        for _target, n in (("q", s.bare.config.num_attention_heads * s.bare.config.head_dim),
                        ("v", s.bare.config.num_key_value_heads * s.bare.config.head_dim),
                        ("up", s.bare.config.intermediate_size)):
            y = torch.randn(B, 1, n, generator=g).to(device=device, dtype=dtype)
            v = (1.0 + 0.1 * torch.randn(B, n, generator=g)).to(device=device, dtype=dtype)
            vv = v[:, None, :]
            inplace_s += _t(lambda y=y, v=v, vv=vv: consumers.scale_in_place(y, v, vv), device)
            scale_s += _t(lambda y=y, v=v: ops.scale(y, v), device)
            mul_s += _t(lambda y=y, vv=vv: y * vv, device)
        pieces["  of which: in-place rescale, q+v+up"] = {
            "per_call_s": inplace_s, "calls": n_layers, "nested": True,
            "what": "consumers.scale_in_place(x, s, s[:, None]) on q, v and up sized tensors: what eager "
                    "decoding runs"}
        pieces["  of which: plain x * v, q+v+up"] = {
            "per_call_s": mul_s, "calls": n_layers, "nested": True,
            "what": "the arithmetic alone: x * v[:, None, :] on the same tensors"}
        pieces["  (not on this path) para_kernels.ops.scale, q+v+up"] = {
            "per_call_s": scale_s, "calls": n_layers, "nested": True,
            "what": "the checked public op (argument checks, dispatch, multiply), which training, "
                    "torch.compile and kernel backends take; for comparison"}
        stack.close()
        profile_rows = calls_per_decode_step(s)
        n_dispatch = next((r["calls"] for r in profile_rows if r["function"].endswith("(backend_for)")), None)
        if n_dispatch:
            pieces["  of which: para_kernels.ops.backend_for"] = {
                "per_call_s": _t(lambda: ops.backend_for("scale", x.device), device), "calls": n_dispatch,
                "nested": True, "what": "choosing the backend (public ops.backend_for), as often as one profiled "
                                        "decode step calls it"}
    for p in pieces.values():
        p["per_token_s"] = p["per_call_s"] * p["calls"]
    total = sum(p["per_token_s"] for p in pieces.values() if not p.get("nested"))
    return {"pieces": pieces, "sum_per_token_s": total, "measured_decode_delta_s": decode_delta_s,
            "decode_step_profile": profile_rows,
            "batch": B, "layers": n_layers,
            "note": "rows marked 'of which' are parts of the module deltas above them, not added to the sum"}


def profile_decode(s, method: str, new_tokens: int, top: int = 25) -> str:
    """cProfile of one generate() call of ``method``; top functions by own time."""
    s.generate(method, 2)
    prof = cProfile.Profile()
    prof.enable()
    s.generate(method, new_tokens)
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("tottime")
    stats.print_stats(top)
    buf.write("\n-- by cumulative time --\n")
    stats.sort_stats("cumulative").print_stats(top)
    buf.write("\n-- para_kernels functions, by cumulative time --\n")
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats("para_kernels", top)
    return buf.getvalue()


def torch_profile_decode(s, method: str, new_tokens: int, top: int = 25) -> str:
    """torch.profiler table (CPU ops) of one generate() call of ``method``."""
    from torch.profiler import ProfilerActivity, profile

    s.generate(method, 2)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        s.generate(method, new_tokens)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
