"""Requests checked when they are added, in the front end: a bad ``para_adapter`` is refused
there (``ValueError``: HTTP 400 on the OpenAI server) instead of failing a batch in the worker,
where an error stops the engine.

- ``para_adapter`` must name an adapter of ``PARA_VLLM_ADAPTERS`` or one ``load_adapter()`` loaded
  in this process, and the engine must serve a PARA model (the config hook says so through
  ``PARA_VLLM_ENGINE``); else refused, never served bare.
- ``para_adapter_path`` (a folder for this request, read by the worker at its first use) only where
  ``PARA_VLLM_ALLOW_ADAPTER_PATHS=1`` (it lets a client make the server read a folder), never to
  rebind a name already bound to another folder; every request using it passes it.
- The adapter's config and weights' header are checked against the served model here (no tensor
  data; cached per file version), so the worker reads only files that fit.

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
FACTS_ENV = "PARA_VLLM_MODEL_FACTS"  # the served model's facts (adapters.ModelFacts JSON), set with ENGINE_ENV
PATHS_ENV = "PARA_VLLM_ALLOW_ADAPTER_PATHS"  # "1": requests may name an adapter folder (para_adapter_path)
_loaded: dict[str, str] = {}  # name -> folder loaded at run time in this process by load_adapter()
_bound: dict[str, str] = {}  # name -> folder a request's para_adapter_path gave it
_checked: dict[tuple, tuple] = {}  # (name, folder) -> (the adapter's folder, its files' mtimes when checked)


def remember(name: str, path: str) -> None:
    _loaded[name] = os.fspath(path)


def _facts():
    from .adapters import ModelFacts

    raw = os.environ.get(FACTS_ENV)
    return ModelFacts.from_json(raw) if raw else None


def _stamp(folder: str):
    from ..transformers import io

    try:
        return tuple(os.stat(os.path.join(folder, f)).st_mtime_ns for f in (io.CONFIG_NAME, io.WEIGHTS_NAME))
    except OSError:
        return None


def _check_files(name: str, folder: str) -> None:
    """The adapter's config and weights' header, against the served model (cached per file version)."""
    from ..transformers import io
    from .adapters import validate

    key = (name, os.path.realpath(folder))
    seen = _checked.get(key)
    if seen is not None and seen[1] is not None and _stamp(seen[0]) == seen[1]:
        return
    try:
        resolved = validate(name, folder, _facts())[0]
    except (io.AdapterFileError, OSError) as e:
        raise ValueError(f"PARA adapter {name!r} cannot be served: {e}") from None
    _checked[key] = (resolved, _stamp(resolved))


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
    named = {**known_adapters(), **_loaded}
    if path is not None:
        if os.environ.get(PATHS_ENV) != "1":
            raise ValueError(f"{PATH_KEY} is switched off on this server (it lets a request read any folder): "
                             f"list the adapter in PARA_VLLM_ADAPTERS, or start the server with {PATHS_ENV}=1")
        if not isinstance(path, str) or not os.path.isdir(path):
            raise ValueError(f"{PATH_KEY} must be an adapter folder on the server, got {path!r}")
        bound = named.get(name, _bound.get(name))
        if bound is not None and os.path.realpath(bound) != os.path.realpath(path):
            raise ValueError(f"{ADAPTER_KEY}={name!r} already names the adapter in {bound!r}; give the one in "
                             f"{path!r} another name")
        _check_files(name, path)
        _bound[name] = path
        return
    if name not in named:
        raise ValueError(f"unknown PARA adapter {name!r}: list it in PARA_VLLM_ADAPTERS (known: {sorted(named)}), "
                         f"or pass {PATH_KEY} with every request that uses it")
    _check_files(name, named[name])


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
