"""Decode steps under CUDA-graph replay (docs/spec.md §5: "for decode-sized work, also under
CUDA-graph replay"). Eager decoding of a Hugging Face model is bound by the host launching
kernels; a graph replays the same kernels with no Python in between, so what remains is what
each method costs the device.

For each method (bare, PARA on the default backend, BGMV LoRA), :class:`StaticDecode` runs the
prefill of the headline batch (input_ids [B, T]) into a ``transformers.StaticCache`` of T + 1
positions through the method's route, then captures one decode forward (next ids [B, 1] at
position T -> logits [B, 1, V]) into a ``torch.cuda.CUDAGraph`` after warm-up forwards on a side
stream. PARA's scale vectors are made by that prefill and live in the request state PARA keeps
with that StaticCache: the graph reads those tensors, which stay alive (and unchanged) as long
as the cache does.

Before every replay the cache's write position is set back to T (outside the timed window), so
every replay is the same step. Replays are timed with CUDA events, one replay of each method
per round, the order rotating every round; each method's ratio is taken against the bare replay
of the same round. A graph's logits are checked against the same step run eagerly before
timing. Any failure is recorded as an error entry, never raised.

Two shims make the capture legal without touching the model: ``cache.get_seq_length()`` answers
a host int (T) while capturing (StaticCache answers a device tensor; PARA's model pre-hook tests
``cached > 0``, which on a device tensor is a host sync, illegal during capture), and position_ids
are passed as a static tensor. Both are applied to every method alike.
"""
from __future__ import annotations

import inspect
import time
from contextlib import ExitStack, contextmanager

import torch

from ..harness.stats import summary

GRAPH_METHODS = ("bare", "para", "bgmv_lora")


# ----------------------------------------------------------------- pure helpers (CPU-testable)
def reset_cache_length(cache, length: int) -> None:
    """Set every StaticCache layer's write position (its ``cumulative_length`` tensor) to
    ``length``, in place (a graph holds these tensors' addresses). Transformers versions whose
    static layers have no such tensor write where the forward's ``cache_position`` says, which
    the step passes as a static tensor: nothing to reset there."""
    for layer in getattr(cache, "layers", ()):
        position = getattr(layer, "cumulative_length", None)
        if isinstance(position, torch.Tensor):
            position.fill_(length)


def takes_cache_position(model) -> bool:
    """Whether the model's forward has a ``cache_position`` argument (transformers before the
    cache's own write position, e.g. 4.x and early 5.x); then the step passes it."""
    return "cache_position" in inspect.signature(type(model).forward).parameters


def static_cache(config, max_len: int, batch: int, device, dtype):
    """A transformers StaticCache of ``max_len`` positions (lazily allocated where the version
    allows; else allocated now for ``batch`` rows)."""
    from transformers import StaticCache

    try:
        return StaticCache(config=config, max_cache_len=max_len)
    except TypeError:  # older signature
        return StaticCache(config=config, max_batch_size=batch, max_cache_len=max_len, device=device, dtype=dtype)


@contextmanager
def host_seq_length(cache, length: int):
    """Inside the block ``cache.get_seq_length(...)`` returns the host int ``length``."""
    cache.get_seq_length = lambda layer_idx=0: length
    try:
        yield cache
    finally:
        del cache.get_seq_length


def replay_order(methods: list[str], rounds: int) -> list[list[str]]:
    """Per round, every method once; the order rotates by one each round."""
    n = len(methods)
    return [methods[r % n:] + methods[:r % n] for r in range(rounds)]


def paired_ratios(times: dict[str, list[float]], ref: str = "bare") -> dict[str, dict]:
    """``times``: {method: seconds per replay, one per round, in round order}. For every method
    but ``ref``: the summary of its per-round ratio to ``ref``'s replay of the same round, and
    of its times; ``ref`` gets its times only."""
    out = {ref: {"time": summary(times[ref])}}
    for m, ts in times.items():
        if m == ref:
            continue
        ratios = [a / b for a, b in zip(ts, times[ref])]
        out[m] = {"time": summary(ts), "ratio": summary(ratios)}
    return out


def capture_graph(fn):
    """Capture ``fn()`` into a ``torch.cuda.CUDAGraph``: (graph, fn's output, whose storage the
    graph's replays rewrite). The one place that captures (a CPU test replaces it with an eager
    stand-in that checks the step for host syncs)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ----------------------------------------------------------------- one method's decode step
class StaticDecode:
    """One method's decode step on a StaticCache: built by a prefill through the method's route
    (held open until :meth:`close`), then run eagerly (:meth:`run_eager`) or captured
    (:meth:`capture`) and replayed (:meth:`replay`).

    Tensors: input_ids [B, T] (the setup's prompt batch), next_ids [B, 1] (the prefill's greedy
    token), position_ids [B, 1] = T, cache max length T + 1, step logits [B, 1, V]."""

    def __init__(self, s, method: str, row_names=None):
        self.method = method
        self.stack = ExitStack()
        try:
            ctx, self.model, self.extra = s._route(method, row_names)
            self.stack.enter_context(ctx)
            B, T = s.input_ids.shape
            device = s.input_ids.device
            self.T = T
            self.cache = static_cache(s.bare.config, T + 1, B, device, next(s.bare.parameters()).dtype)
            with torch.no_grad():
                out = self.model(input_ids=s.input_ids, attention_mask=None, past_key_values=self.cache,
                                 use_cache=True, logits_to_keep=1, **self.extra)
            self.next_ids = out.logits[:, -1:].argmax(-1)  # [B, 1]
            self.position_ids = torch.full((B, 1), T, dtype=torch.long, device=device)
            if takes_cache_position(s.bare):
                self.extra = {**self.extra, "cache_position": torch.full((1,), T, dtype=torch.long, device=device)}
        except Exception:
            self.stack.close()
            raise
        self.graph = None
        self.out = None

    def step(self) -> torch.Tensor:
        """One decode forward at position T: logits [B, 1, V]."""
        with torch.no_grad():
            return self.model(input_ids=self.next_ids, attention_mask=None, position_ids=self.position_ids,
                              past_key_values=self.cache, use_cache=True, logits_to_keep=1, **self.extra).logits

    def run_eager(self) -> torch.Tensor:
        """The step, eagerly, from a cache holding the prompt only (as every replay sees it)."""
        reset_cache_length(self.cache, self.T)
        with host_seq_length(self.cache, self.T):
            return self.step()

    def capture(self, warmup: int = 3) -> None:
        """Warm up on a side stream (lazy init, Triton autotuning), then capture one step."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.run_eager()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        reset_cache_length(self.cache, self.T)
        with host_seq_length(self.cache, self.T):
            self.graph, self.out = capture_graph(self.step)
        torch.cuda.synchronize()

    def reset(self) -> None:
        reset_cache_length(self.cache, self.T)

    def replay(self) -> torch.Tensor:
        """Reset the cache position, replay; the graph's static logits [B, 1, V]."""
        self.reset()
        self.graph.replay()
        return self.out

    def close(self) -> None:
        self.graph = self.out = None
        self.stack.close()


# ----------------------------------------------------------------- timing
def time_replays(decoders: dict, rounds: int, warm: int = 3) -> dict[str, list[float]]:
    """Seconds per replay of each decoder, one per round (CUDA events around each replay; the
    cache reset is enqueued before the start event, so it is not timed)."""
    for d in decoders.values():
        for _ in range(warm):
            d.replay()
    torch.cuda.synchronize()
    events = {m: [] for m in decoders}
    for order in replay_order(list(decoders), rounds):
        for m in order:
            d = decoders[m]
            d.reset()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            d.graph.replay()
            end.record()
            events[m].append((start, end))
    torch.cuda.synchronize()
    return {m: [a.elapsed_time(b) / 1e3 for a, b in ev] for m, ev in events.items()}


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:600]


def run(s, methods, rounds: int, row_names=None, warmup: int = 3, log=print) -> dict:
    """Capture and time the decode step of "bare" and every method in ``methods`` (each one a
    route of the Setup ``s``) under CUDA-graph replay. Returns {"methods": {m: {time, ratio,
    check}}, "errors": {m: text}, ...}; never raises."""
    order = ["bare", *[m for m in methods if m != "bare"]]
    result = {"rounds": rounds, "context": s.input_ids.shape[1] + 1, "batch": s.input_ids.shape[0],
              "methods": {}, "errors": {}}
    if s.device.type != "cuda":
        result["skipped"] = "CUDA-graph replay needs a CUDA device"
        return result
    tol = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}.get(s.cfg.dtype, 2e-2)
    decoders, checks = {}, {}
    t0 = time.perf_counter()
    try:
        for m in order:
            d = None
            try:
                d = StaticDecode(s, m, row_names)
                eager = d.run_eager().clone()
                d.capture(warmup)
                err = relative_error(d.replay(), eager)
                torch.cuda.synchronize()
                checks[m] = {"value": err, "bar": f"<= {tol:g}", "ok": err <= tol,
                             "what": "||graph replay logits - eager step logits|| / ||eager||"}
                if err > tol:
                    raise RuntimeError(f"replayed logits differ from the eager step (relative {err:.3g} > {tol:g})")
                decoders[m] = d
            except Exception as e:  # capture not supported, a sync inside the step, ...
                result["errors"][m] = _error(e)
                log(f"  CUDA graph of {m}: {result['errors'][m]}")
                if d is not None:
                    d.close()
                try:
                    torch.cuda.synchronize()
                except Exception as e2:  # the device itself failed: stop here
                    result["errors"]["device"] = _error(e2)
                    return result
        result["capture_s"] = time.perf_counter() - t0
        if "bare" not in decoders:
            return result
        t1 = time.perf_counter()
        times = time_replays(decoders, rounds)
        result["time_s"] = time.perf_counter() - t1
        stats = paired_ratios(times)
        for m in decoders:
            result["methods"][m] = {**stats[m], "check": checks[m]}
    except Exception as e:
        result["errors"]["timing"] = _error(e)
    finally:
        for d in reversed(list(decoders.values())):  # route contexts exit in reverse order
            d.close()
        decoders.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result
