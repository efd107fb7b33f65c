"""Fixtures of the vLLM plugin tests (run in the vLLM venv, .venv-vllm: `make test` runs them
there; in the main venv, where vLLM is absent, they are skipped).

A tiny random LLaMA (hidden 128, head_dim 64: a size vLLM's CPU attention serves) with a character
tokenizer is saved to a folder with PARA adapters beside it: ``a`` and ``b`` (random W_up, so
they change the tokens; ``b`` pools the normed input with the mean pooler), ``zero`` (as
PARAModel creates it: W_up = b_up = 0), ``attn`` (the attention pooler, rational activation, q
and up only, one layer), ``c`` (loaded at run time from a request's path) and ``saved``
(modules_to_save: not servable by vLLM). The engine runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), one per module; test_server.py starts the OpenAI server as a
real deployment does.
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from tests.kit.vllm_engine import build_model, save_adapter  # noqa: E402 - after the environment


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    pytest.importorskip("vllm", reason="vLLM is installed in .venv-vllm only (make test runs these tests there)")
    import para_kernels as pk

    root = tmp_path_factory.mktemp("served")
    model = str(root / "model")
    build_model(model)
    adapters = {"a": save_adapter(model, str(root / "a"), 1),
                "b": save_adapter(model, str(root / "b"), 2, pk.PARAConfig(r=4, pool_input="normed", pooler="mean")),
                "zero": save_adapter(model, str(root / "zero"), None),
                "attn": save_adapter(model, str(root / "attn"), 3, pk.PARAConfig(
                    r=3, pooler="attn", activation="rational", targets=("q", "up"), layers_to_transform=[1])),
                "c": save_adapter(model, str(root / "c"), 4)}
    saved = save_adapter(model, str(root / "saved"), 5, pk.PARAConfig(r=4, modules_to_save=["lm_head"]))
    return {"model": model, "adapters": adapters, "saved": saved, "root": root}
