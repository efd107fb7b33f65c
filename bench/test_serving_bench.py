"""Tests of the serving benchmark's code paths (not timings):  pytest bench/ -q

* the random-weight LLaMA path end to end on the CPU with ``llama-tiny`` (the same code the GPU
  runs for LLaMA-2-7B shapes): checks, timing with tiny rounds, popularity prefill, tokens per
  second, tenant sweep, and the report files;
* PARA through a forced backend (the ``para@<backend>`` methods' route);
* the device-independent parts of the CUDA-graph timing: the static decode step run eagerly
  equals the dynamic-cache decode step, cache resets, the replay order and the paired ratios;
  the capture itself only where CUDA is present.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from para_kernels import ops as para_ops

from . import graphs, models, serving
from .__main__ import configs, main, parse
from .lora import BGMVLoRA

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
    from . import report

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
    assert serving.backend_methods(CPU) == ()
    assert serving.para_backend("para@triton") == "triton" and serving.para_backend("para") is None
    assert serving.is_para("para@cuda") and not serving.is_para("peft_lora")


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
