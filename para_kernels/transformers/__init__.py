"""Hugging Face integration: PARA adapters on any decoder-only transformers model."""
from .auto import AutoPARAModelForCausalLM
from .io import AdapterFileError
from .mapping import MappingError
from .model import LayerStatus, ModelStatus, PARAModel, UnloadedError, get_para_model

__all__ = ["PARAModel", "get_para_model", "AutoPARAModelForCausalLM", "MappingError", "AdapterFileError",
           "UnloadedError", "LayerStatus", "ModelStatus"]
