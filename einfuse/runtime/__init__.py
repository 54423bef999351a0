"""Runtime: compiled modules, their variants and execution backends."""
from . import triton_backend  # noqa: F401  (registers the "triton" backend)
from .backends import BACKENDS, register_backend
from .compiled import CompiledModule, Explanation, Variant

__all__ = ["BACKENDS", "CompiledModule", "Explanation", "Variant", "register_backend"]
