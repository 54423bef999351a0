"""Choosing a mapping for a statement: kernel kind and tile sizes that are valid on a GPU.

Tiles are powers of two and `tl.dot` tiles are at least 16, so the kernel the interpreter runs on a
CPU is the kernel a GPU compiles. On CUDA the runtime may autotune among `candidates()`."""
from __future__ import annotations

import sympy
import torch

from ..ir.module import Module, Statement
from .kernel import Mapping
from ..ir.contraction import contraction
from .triton_gen import next_pow2

MAX_TILE = 4096  # elements of a 2-D register tile (x 4 bytes / 128 threads = 32 registers per thread)


def _hint(e, hints: dict, default: int = 1024) -> int:
    v = sympy.sympify(e).xreplace({k: sympy.Integer(x) for k, x in hints.items()})
    return int(v) if v.is_Integer else default


def float32_precision() -> str:
    """tf32 tensor cores for f32 contractions only when torch allows it (as for torch.matmul)."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _clamp_pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_pow2(n)))


def choose(m: Module, s: Statement, block_mn: int = 64, block_k: int | None = None) -> Mapping:
    """The default mapping of one statement. A contraction's K tile is 64 for 16-bit operands (half the
    loop trips of 32, which the interpreter runs one by one) and 32 for 32-bit ones, whose operand tiles
    take twice the registers (IEEE f32 keeps both in registers for its FMA loop; tf32 with two
    accumulators spills at 64)."""
    hints = {k: int(v) for k, v in m.size_hints}
    ext = s.ranks()
    out = [p for p in s.index if isinstance(p, sympy.Symbol)]
    numel = lambda ranks: _hint(sympy.Mul(*[ext[r] for r in ranks]) if ranks else 1, hints)  # noqa: E731
    if s.iterate is not None:
        return Mapping("iterate", rows=tuple(out), red=(s.iterate.rank,),
                       tiles=(("BLOCK", _clamp_pow2(numel(out), 16, 256)),))
    if s.reduce is None:
        return Mapping("map", rows=tuple(out), tiles=(("BLOCK", _clamp_pow2(numel(out), 16, 1024)),))
    types = m.types()
    parts = contraction(s, lambda n: types[n].dtype)
    red = tuple(r for r, _ in s.reduce.ranks)
    if parts is not None:
        M, N, B = parts.m, parts.n, parts.batch
        if M and N:
            bm = _clamp_pow2(numel(M), 16, block_mn)
            bn = _clamp_pow2(numel(N), 16, block_mn)
            prec = float32_precision() if parts.operand.name == "f32" else ""
            bk = _clamp_pow2(numel(red), 16, block_k or (64 if parts.operand.bits <= 16 else 32))
            return Mapping("dot", rows=M, cols=N, red=red, batch=B,
                           tiles=(("BLOCK_M", bm), ("BLOCK_N", bn), ("BLOCK_K", bk)), input_precision=prec)
    br = _clamp_pow2(numel(red), 16, 1024)
    bm = _clamp_pow2(numel(out), 1, max(1, MAX_TILE // br))
    return Mapping("reduce", rows=tuple(out), red=red, tiles=(("BLOCK_M", bm), ("BLOCK_R", br)))


def candidates(m: Module, s: Statement) -> list[Mapping]:
    """A small autotuning space for CUDA: the default and a few tile variants."""
    base = choose(m, s)
    if base.kind == "dot":
        variants = [choose(m, s, mn, k) for mn, k in ((64, 32), (128, 32), (64, 64), (32, 32))]
        return [base] + list(dict.fromkeys(v for v in variants if v != base))
    return [base]
