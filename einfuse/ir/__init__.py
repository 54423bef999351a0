"""The Einsum-cascade IR: types, expressions, statements, modules, text form and the reference evaluator."""
from . import dtypes
from .collective import Collective
from .dtypes import DType
from .expr import Access, Call, Const, Expr, IndexValue
from .index import FloorDiv, Mod, rank, size
from .module import Input, Iterate, Module, Opaque, Reduce, Statement, TensorRef, TensorType
from .parser import ParseError, parse
from .printer import print_module

__all__ = [
    "Access", "Call", "Collective", "Const", "DType", "Expr", "FloorDiv", "IndexValue", "Input", "Iterate", "Mod",
    "Module", "Opaque", "ParseError", "Reduce", "Statement", "TensorRef", "TensorType", "dtypes", "parse",
    "print_module", "rank", "size",
]
