"""Registers the PyTorch reference as the backend that runs on every device."""
from . import dispatch, torch_ops

dispatch.register_backend(
    "reference",
    {name: getattr(torch_ops, name) for name in dispatch.OPS},
    is_available=lambda device: True,
)
