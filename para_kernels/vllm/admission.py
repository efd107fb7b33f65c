"""Requests checked when they are added, in the front end: a bad ``para_adapter`` is refused
there (``ValueError``: HTTP 400 on the OpenAI server) instead of failing a batch in the worker.

vLLM runs ``validate_params`` of every installed logits processor (entry point
``vllm.logits_processors``) on each request's SamplingParams; ``PARAAdmission`` uses that hook
and changes no logits (argmax-invariant, ``apply`` returns its input).
"""
from __future__ import annotations

import os

from . import ADAPTER_KEY, PATH_KEY

# Set (to "1") by the PARA config hook when an engine config for a PARA model is built in this process;
# inherited by the processes started after it (the API server's front ends). A request that names an
# adapter where no PARA engine was configured would otherwise get the bare model's output silently.
ENGINE_ENV = "PARA_VLLM_ENGINE"
_remembered: dict[str, str] = {}  # names loaded at run time in this process: load_adapter(), a request's path


def remember(name: str, path: str) -> None:
    _remembered[name] = os.fspath(path)


def check(extra_args: dict | None) -> None:
    """Raise ValueError for a request whose PARA arguments cannot be served."""
    if not extra_args or extra_args.get(ADAPTER_KEY) is None:
        if extra_args and extra_args.get(PATH_KEY) is not None:
            raise ValueError(f"{PATH_KEY} was given without {ADAPTER_KEY} (the name to serve it under)")
        return
    from .serving import known_adapters

    name, path = extra_args[ADAPTER_KEY], extra_args.get(PATH_KEY)
    if os.environ.get(ENGINE_ENV) != "1":
        raise ValueError(f"{ADAPTER_KEY}={name!r} was given, but this vLLM engine does not serve a PARA model: start "
                         "it with hf_overrides={'architectures': ['PARA<Arch>']} (e.g. PARALlamaForCausalLM; "
                         "docs/vllm.md), or send the request without para_adapter for the bare model")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{ADAPTER_KEY} must be an adapter name (a non-empty str), got {name!r}")
    if path is not None:
        if not isinstance(path, str) or not os.path.isdir(path):
            raise ValueError(f"{PATH_KEY} must be an adapter folder on the server, got {path!r}")
        remember(name, path)  # later requests may name it alone, as the worker keeps its folder
        return
    known = {**known_adapters(), **_remembered}
    if name not in known:
        raise ValueError(f"unknown PARA adapter {name!r}: serve it by listing it in PARA_VLLM_ADAPTERS (known: "
                         f"{sorted(known)}) or by passing {PATH_KEY}")


try:
    from vllm.v1.sample.logits_processor import LogitsProcessor
except ImportError:  # imported without vLLM (docs, tests of check())
    LogitsProcessor = object


class PARAAdmission(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        check(sampling_params.extra_args)

    def __init__(self, vllm_config=None, device=None, is_pin_memory=False) -> None:
        pass

    def apply(self, logits):
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        pass
