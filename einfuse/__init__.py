"""einfuse: compile PyTorch models through an Einsum-cascade IR.

    cm = einfuse.compile(model, args)     # an nn.Module computing what `model` computes
    print(cm.ir)                          # the final IR, readable and parseable
    cm.explain()                          # what was lowered, what fell back to torch and why
    torch.compile(model, backend="einfuse")
"""
from . import ir, passes
from .api import compile
from .frontend.dynamo import register as _register_dynamo_backend
from .runtime import CompiledModule

_register_dynamo_backend()

__version__ = "0.1.0"

__all__ = ["CompiledModule", "compile", "ir", "passes", "__version__"]
