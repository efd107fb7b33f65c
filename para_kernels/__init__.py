"""para_kernels: PARA (Prompt-Aware Representation Adjustment) for Hugging Face models.

pool -> generate -> scale: :mod:`para_kernels.ops` holds the ops (reference, Triton and CUDA
C++ behind one dispatch point); :mod:`para_kernels.transformers` the model wrapper.
"""
from ._version import __version__
from .config import PARAConfig
from .ops import available_backends, get_backend, set_backend
from .transformers import (
    AdapterFileError,
    AutoPARAModelForCausalLM,
    MappingError,
    PARAModel,
    UnloadedError,
    get_para_model,
)

__all__ = [
    "__version__", "PARAConfig", "PARAModel", "get_para_model", "set_backend", "get_backend",
    "available_backends", "MappingError", "AdapterFileError", "UnloadedError", "AutoPARAModelForCausalLM",
    "PARATrainer",
]


def __getattr__(name: str):
    if name == "PARATrainer":  # imported on first use: transformers.Trainer pulls in accelerate
        from .transformers.trainer import PARATrainer
        return PARATrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
