"""Hugging Face integration: PARA adapters on any decoder-only transformers model."""
from .io import AdapterFileError
from .mapping import MappingError
from .model import PARAModel, get_para_model

__all__ = ["PARAModel", "get_para_model", "MappingError", "AdapterFileError"]
