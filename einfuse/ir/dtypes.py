"""Element types of the IR: the names printed in the text and how each maps to torch storage."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DType:
    """One IR element type; `packed` types store `per_byte` values in each byte of `storage`."""

    name: str
    torch: torch.dtype | None  # logical element type as torch computes with it
    storage: torch.dtype  # what a bound tensor holds
    category: str  # "bool" | "int" | "float" | "encoded"
    bits: int
    signed: bool = True
    per_byte: int = 1

    @property
    def packed(self) -> bool:
        return self.per_byte > 1

    @property
    def is_float(self) -> bool:
        return self.category == "float"

    @property
    def is_int(self) -> bool:
        return self.category == "int"

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"DType({self.name})"


_ALL: dict[str, DType] = {}


def register_dtype(dt: DType) -> DType:
    """Add a dtype (e.g. a custom encoding) so the printer, parser and verifier know it."""
    _ALL[dt.name] = dt
    return dt


def _std(name, tdt, cat, bits, signed=True):
    return register_dtype(DType(name, tdt, tdt, cat, bits, signed))


f64 = _std("f64", torch.float64, "float", 64)
f32 = _std("f32", torch.float32, "float", 32)
f16 = _std("f16", torch.float16, "float", 16)
bf16 = _std("bf16", torch.bfloat16, "float", 16)
f8e4m3 = _std("f8e4m3", torch.float8_e4m3fn, "float", 8)
f8e5m2 = _std("f8e5m2", torch.float8_e5m2, "float", 8)
i64 = _std("i64", torch.int64, "int", 64)
i32 = _std("i32", torch.int32, "int", 32)
i16 = _std("i16", torch.int16, "int", 16)
i8 = _std("i8", torch.int8, "int", 8)
u8 = _std("u8", torch.uint8, "int", 8, signed=False)
bool_ = _std("bool", torch.bool, "bool", 1, signed=False)
# Two 4-bit values per byte, low nibble first; logical shape counts values, storage halves the last dim.
i4 = register_dtype(DType("i4", torch.int8, torch.uint8, "int", 4, True, per_byte=2))
u4 = register_dtype(DType("u4", torch.uint8, torch.uint8, "int", 4, False, per_byte=2))
BUILTIN = frozenset(_ALL)  # the names above; register_dtype adds others (e.g. einfuse.compress's tdict<bits>)


def by_name(name: str) -> DType:
    """Look a dtype up by its printed name."""
    try:
        return _ALL[name]
    except KeyError:
        raise KeyError(f"unknown dtype {name!r}; known: {', '.join(sorted(_ALL))}") from None


def is_dtype_name(name: str) -> bool:
    return name in _ALL


_FROM_TORCH = {d.torch: d for d in _ALL.values() if not d.packed and d.torch is not None}


def from_torch(tdt: torch.dtype) -> DType:
    """The IR dtype for a torch dtype; raises for dtypes the IR cannot hold (complex, ...)."""
    try:
        return _FROM_TORCH[tdt]
    except KeyError:
        raise TypeError(f"torch dtype {tdt} has no einfuse IR dtype") from None


def promote(a: DType, b: DType) -> DType:
    """Torch's type promotion between two tensor dtypes."""
    return from_torch(torch.promote_types(a.torch, b.torch))


DEFAULT_FOR_CATEGORY = {"bool": bool_, "int": i64, "float": f32}
_CAT_RANK = {"bool": 0, "int": 1, "float": 2}


def category_rank(cat: str) -> int:
    return _CAT_RANK[cat]
