"""Worker methods for load / unload at run time (``LLM.collective_rpc``), mixed into vLLM's
worker by ``parallel_config.worker_extension_cls`` (set by the config hook)."""
from __future__ import annotations


def _state(worker):
    state = getattr(worker.model_runner.get_model(), "para_serving", None)
    if state is None:
        raise RuntimeError("this engine does not serve a PARA model (hf_overrides={'architectures': "
                           "['PARA<Arch>']}, docs/vllm.md)")
    return state


class PARAWorkerExtension:
    def para_load_adapter(self, name: str, path: str) -> None:
        _state(self).load(name, path)

    def para_unload_adapter(self, name: str) -> bool:
        return _state(self).unload(name)

    def para_resident_adapters(self) -> list:
        return _state(self).registry.resident()
