"""Kernel kinds: one module per loop structure (map, rows, iterate, dot, attention, moe), each owning which
statements it groups, its members' roles, tiling, autotuning candidates, cost and emission. Importing
this package registers the built-in kinds; `register_kind` adds yours."""
from . import attention, dot, iterate, map, moe, qattention, qdot, rows, update  # noqa: F401  (register the built-in kinds)
from .base import KINDS, Cost, Group, KernelKind, ModuleInfo, Unsupported, kind_named, register_kind, single, statement_kind
from .builder import KernelBuilder
from .emit import Emitter
from .spec import Arg, KernelSpec, Mapping
from .tile import Tile, register_triton_op

__all__ = ["Arg", "Cost", "Emitter", "Group", "KINDS", "KernelBuilder", "KernelKind", "KernelSpec", "Mapping",
           "ModuleInfo", "Tile", "Unsupported", "kind_named", "register_kind", "register_triton_op", "single",
           "statement_kind"]
