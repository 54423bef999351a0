"""Runtime: compiled modules, their variants and execution backends."""
from . import torch_backend, triton_backend  # noqa: F401  (register the "torch" and "triton" backends)
from .backends import BACKENDS, register_backend
from .compiled import CompiledModule, Explanation, Variant

__all__ = ["BACKENDS", "CompiledModule", "Explanation", "Variant", "register_backend"]
