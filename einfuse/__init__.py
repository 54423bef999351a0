"""einfuse: compile PyTorch models through an Einsum-cascade IR.

    cm = einfuse.compile(model, args)     # an nn.Module computing what `model` computes
    print(cm.ir)                          # the final IR, readable and parseable
    cm.explain()                          # what was lowered, what fell back to torch and why
    torch.compile(model, backend="einfuse")
"""
import os as _os
import sys as _sys


def _prepare_triton() -> None:
    """Triton chooses GPU compilation or its CPU interpreter when it is imported; without a CUDA
    device, select the interpreter before anything imports triton."""
    if "triton" in _sys.modules or "TRITON_INTERPRET" in _os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        _os.environ["TRITON_INTERPRET"] = "1"


_prepare_triton()

from . import ir, passes  # noqa: E402
from .api import compile, register_dynamo_backend  # noqa: E402
from .dist import Dist  # noqa: E402
from .runtime import CompiledModule  # noqa: E402
from .serve import LLM  # noqa: E402

register_dynamo_backend()

__version__ = "0.1.0"

__all__ = ["LLM", "CompiledModule", "Dist", "compile", "ir", "passes", "__version__"]
