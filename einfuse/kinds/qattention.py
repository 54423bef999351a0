"""Attention over a 4-bit KV cache: key and value tiles whose codes are stored two per byte (docs/quant.md's
KV4 cache: `u8[NB, BS, .., L/2]`, even l in the low nibble, with a scale and zero per token and head).

The attention kind (einfuse.kinds.attention) computes a K/V tile from its IR expression element by element;
for a read of a 4-bit code, `bitand(shr(S[.., p // 2], 4 * (p % 2)), 15)`, that loads every byte twice
(once per nibble). This module registers a KV_LOADERS entry that loads the tile's bytes once — [BLOCK/2,
BLOCK_M0] through the same block-table gather — splits them into nibbles in registers and interleaves
them back along the head dimension (join + reshape), and leaves the rest of the expression (scale, zero,
cast: the dequantization) to the tile, which loads each token's scale and zero once. The paged decode
attention then moves 0.5 byte per cached key/value element plus 4 bytes per token and head.
"""
from __future__ import annotations

import sympy

from ..ir import index as ix
from ..ir.expr import Access, Call, Const, Expr, IndexValue, index_symbols, walk
from ..ir.ops import infer
from .attention import KV_LOADERS
from .tile import Tile


def _index_form(x: Expr):
    """An integer-valued expression of ranks as index arithmetic (`4 * (p % 2)`), or None."""
    if isinstance(x, IndexValue):
        return sympy.sympify(x.expr)
    if isinstance(x, Const) and x.category == "int":
        return sympy.Integer(x.value)
    if isinstance(x, Call) and x.op in ("mul", "add") and len(x.args) == 2:
        a, b = (_index_form(y) for y in x.args)
        if a is None or b is None:
            return None
        return a * b if x.op == "mul" else a + b
    return None


def _even(c) -> bool:
    """Whether an index expression is even for every value of its ranks (integer coefficients all even)."""
    for t in sympy.Add.make_args(sympy.expand(c)):
        coeff = t.as_coeff_Mul()[0]
        if t != 0 and not (coeff.is_Integer and coeff % 2 == 0):
            return False
    return True


def nibble_read(x: Expr, axis) -> tuple[Access, sympy.Expr] | None:
    """(the byte access, the even offset c) when `x` reads the 4-bit code at position axis + c of a row stored
    two per byte: `bitand(shr(S[.., (axis + c) // 2], 4 * ((axis + c) % 2)), 15)`, in any form the cleanup
    passes leave it (`S[.., c/2 + axis // 2]`, `4 * (axis % 2)`). None otherwise."""
    if not (isinstance(x, Call) and x.op == "bitand" and x.args[1] == Const(15)):
        return None
    inner = x.args[0]
    if not (isinstance(inner, Call) and inner.op == "shr" and isinstance(inner.args[0], Access)):
        return None
    a, shift = inner.args[0], _index_form(inner.args[1])
    if shift is None or isinstance(a.indices[-1], Expr):
        return None
    four, mod = sympy.sympify(shift).as_coeff_Mul()
    if four != 4 or not isinstance(mod, ix.Mod) or mod.args[1] != 2:
        return None
    rest = sympy.expand(mod.args[0] - axis)
    if axis in rest.free_symbols or not _even(rest):
        return None
    last = sympy.sympify(a.indices[-1])
    if isinstance(last, ix.FloorDiv) and last.args[1] == 2:
        c = sympy.expand(last.args[0] - axis)
        if axis in c.free_symbols or not _even(c):
            return None
    else:
        half = sympy.expand(last - ix.FloorDiv(axis, 2))
        if axis in half.free_symbols:
            return None
        c = 2 * half
    if any(axis in sympy.sympify(q).free_symbols for q in a.indices[:-1] if not isinstance(q, Expr)):
        return None
    return a, c


def load_nibbles(em, tile: Tile, expr: Expr, name: str, axis, block: str, rows: bool) -> str | None:
    """A K/V tile whose expression reads 4-bit codes along `axis` (the head dimension): bytes loaded once,
    nibbles split in registers. None when the expression reads no such codes or the tile is ragged along
    the axis (a head dimension that is not a power of two keeps the element-by-element load)."""
    reads = {}
    for x in walk(expr):
        found = nibble_read(x, axis)
        if found is not None:
            reads[x] = found
    if not reads or em.ragged([axis], _block_size(em, axis)):
        return None
    kb = em.kb
    half = ix.rank(kb.fresh(f"{axis}_byte"))
    em.extents[half] = sympy.ceiling(sympy.sympify(em.extents[axis]) / 2)
    var = kb.let(f"{tile.ranks[axis]}_half", f"tl.arange(0, {block} // 2)" + ("[:, None]" if rows else "[None, :]"),
                 to=tile.block)
    byte_tile = Tile(em, {**tile.ranks, half: var}, {r: m for r, m in tile.masks.items() if r != axis})
    byte_tile.block = tile.block
    other = "BLOCK_M0"
    for x, (a, c) in reads.items():
        byte = Access(a.tensor, a.indices[:-1] + (c / 2 + half,))
        code, _ = byte_tile.value(byte, f"{a.tensor}_bytes")
        lo, hi = tile.emit(f"{code} & 15", f"{a.tensor}_lo"), tile.emit(f"{code} >> 4", f"{a.tensor}_hi")
        if rows:  # [B/2, M0, 2] -> [B/2, 2, M0] -> [B, M0]: row e is byte e // 2's nibble e % 2
            joined = f"tl.reshape(tl.permute(tl.join({lo}, {hi}), (0, 2, 1)), ({block}, {other}))"
        else:  # [M0, B/2, 2] -> [M0, B]
            joined = f"tl.reshape(tl.join({lo}, {hi}), ({other}, {block}))"
        codes = tile.emit(f"{joined}.to(tl.int32)", f"{a.tensor}_codes")
        # the tile computes the rest of the expression (the dequantization) on these registers; the codes
        # (0..15) are held in int32 whatever integer type the IR reads them as
        tile.memo[x] = (codes, infer(x, em.dtype_of)[0])
        tile.zero_where[codes] = set()
    _load_groups(em, tile, expr, axis, block, rows)
    return tile.value(expr, name)[0]


def _load_groups(em, tile: Tile, expr: Expr, axis, block: str, rows: bool) -> None:
    """Reads of a per-group parameter along the head dimension, `S[.., axis // g]` (keys' scale and zero in
    groups of g channels): loaded once per group ([BLOCK/g, BLOCK_M0]) and repeated g times in registers, not
    once per channel. A read whose other indices involve the axis, or a g not dividing the tile, is left to
    the tile's element-by-element load."""
    kb = em.kb
    size = _block_size(em, axis)
    ext = sympy.sympify(em.extents[axis])
    for x in walk(expr):
        if not isinstance(x, Access) or x in tile.memo or isinstance(x.indices[-1], Expr):
            continue
        found = _group_read(sympy.sympify(x.indices[-1]), axis)
        if found is None:
            continue
        g, c = found
        if g <= 1 or size % g or not ext.is_Integer or int(ext) != size:
            continue
        if any(isinstance(q, Expr) and axis in index_symbols(q) or not isinstance(q, Expr)
               and axis in sympy.sympify(q).free_symbols for q in x.indices[:-1]):
            continue
        grp = ix.rank(kb.fresh(f"{axis}_group"))
        em.extents[grp] = size // g
        var = kb.let(f"{tile.ranks[axis]}_group", f"tl.arange(0, {block} // {g})" + ("[:, None]" if rows else "[None, :]"),
                     to=tile.block)
        gtile = Tile(em, {**tile.ranks, grp: var}, {r: m for r, m in tile.masks.items() if r != axis})
        gtile.block = tile.block
        v, d = gtile.value(Access(x.tensor, x.indices[:-1] + (c + grp,)), f"{x.tensor}_groups")
        if rows:  # [B/g, M0] -> [B/g, g, M0] -> [B, M0]: row e is group e // g's value
            code = (f"tl.reshape(tl.broadcast_to(tl.expand_dims(tl.broadcast_to({v}, ({block} // {g}, BLOCK_M0)), 1), "
                    f"({block} // {g}, {g}, BLOCK_M0)), ({block}, BLOCK_M0))")
        else:  # [M0, B/g] -> [M0, B/g, g] -> [M0, B]
            code = (f"tl.reshape(tl.broadcast_to(tl.expand_dims(tl.broadcast_to({v}, (BLOCK_M0, {block} // {g})), 2), "
                    f"(BLOCK_M0, {block} // {g}, {g})), (BLOCK_M0, {block}))")
        out = tile.emit(code, f"{x.tensor}_per_channel")
        tile.memo[x] = (out, d)
        tile.zero_where[out] = set(gtile.zero_where.get(v, set()))


def _group_read(last, axis) -> tuple[int, sympy.Expr] | None:
    """(g, c) when the index `last` is the group `c + axis // g` of the head-dim position axis + g * c
    (`(axis + g*c) // g` or `c + axis // g`, c free of the axis), else None."""
    if isinstance(last, ix.FloorDiv) and last.args[1].is_Integer and int(last.args[1]) > 1:
        g = int(last.args[1])
        c = sympy.expand(last.args[0] - axis)
        if axis in c.free_symbols:
            return None
        if all(t == 0 or (t.as_coeff_Mul()[0].is_Integer and t.as_coeff_Mul()[0] % g == 0)
               for t in sympy.Add.make_args(c)):
            return g, sympy.expand(c / g)
        return None
    for t in sympy.Add.make_args(sympy.expand(last)):
        if isinstance(t, ix.FloorDiv) and t.args[0] == axis and t.args[1].is_Integer and int(t.args[1]) > 1:
            rest = sympy.expand(last - t)
            return (int(t.args[1]), rest) if axis not in rest.free_symbols else None
    return None


def _block_size(em, axis) -> int:
    """The tile size along the head dimension (the attention kind pads it to a power of two, at least 16)."""
    from .tile import next_pow2

    return max(16, next_pow2(em.hint(em.extents[axis])))


KV_LOADERS.append(load_nibbles)
