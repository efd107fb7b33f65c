"""Hugging Face integration: PARA adapters on any decoder-only transformers model (docs/api.md)."""
from .auto import AutoPARAModelForCausalLM
from .io import AdapterFileError
from .mapping import MappingError
from .model import LayerStatus, ModelStatus, PARAModel, UnloadedError, get_para_model
from .state import RequestState, RequestStateError

__all__ = ["PARAModel", "get_para_model", "AutoPARAModelForCausalLM", "MappingError", "AdapterFileError",
           "UnloadedError", "RequestStateError", "RequestState", "LayerStatus", "ModelStatus"]
