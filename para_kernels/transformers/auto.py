"""AutoPARAModelForCausalLM: an adapter folder or Hub id in, the backbone it names plus the adapter out.

As PEFT's ``AutoPeftModelForCausalLM``: the adapter's ``adapter_config.json`` names its backbone
(``base_model_name_or_path``, ``revision``); that model is loaded with
``AutoModelForCausalLM.from_pretrained`` and wrapped with the adapter.
"""
from __future__ import annotations

from . import io
from .model import PARAModel

HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only")


class AutoPARAModelForCausalLM:
    """Not instantiated: use :meth:`from_pretrained`."""

    def __init__(self, *args, **kwargs):
        raise TypeError("use AutoPARAModelForCausalLM.from_pretrained(adapter_path_or_hub_id)")

    @classmethod
    def from_pretrained(cls, adapter_path: str, adapter_name: str = "default", is_trainable: bool = False,
                        subfolder: str | None = None, revision: str | None = None, token=None,
                        cache_dir: str | None = None, local_files_only: bool = False,
                        **model_kwargs) -> PARAModel:
        """The backbone named in the adapter's config, wrapped with the adapter.
        ``revision`` is the adapter repo's; the backbone's comes from the adapter's config.
        ``token``, ``cache_dir`` and ``local_files_only`` serve both downloads; ``model_kwargs``
        (dtype, device_map, attn_implementation, ...) go to AutoModelForCausalLM.from_pretrained."""
        from transformers import AutoModelForCausalLM

        hub = {"token": token, "cache_dir": cache_dir, "local_files_only": local_files_only}
        folder = io.resolve_adapter(adapter_path, adapter_name, subfolder, revision=revision, **hub)
        config, _ = io.read_config(folder)
        if not config.base_model_name_or_path:
            raise io.AdapterFileError(
                f"the adapter in {folder} does not name its base model (base_model_name_or_path is empty: it was "
                "saved from a model built from a config); load the backbone yourself and use "
                "PARAModel.from_pretrained(model, adapter_path)")
        model = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path, revision=config.revision,
                                                     **hub, **model_kwargs)
        return PARAModel.from_pretrained(model, folder, adapter_name=adapter_name, is_trainable=is_trainable)
