"""Quantized GEMM kernels (QServe's W4A8, W4A16, W8A8 and fp8): `y[m, n] = sum[k] x[m, k] * w[n, k]` with
the weight stored in 4 or 8 bits and dequantized in registers inside the K loop.

A kernel is described by a `QGemm` (the operand formats, the group size) and emitted by `emit_qgemm`
with the project's KernelBuilder; the `qdot` kernel kind (below) matches the IR's quantized contraction
and binds the IR tensors to the kernel's operands. The formats, in the IR's row-major layouts:

- `x`: activations [M, K] — int8 (A8, with a per-token scale `xs[M]`), fp8 e4m3 (with `xs[M]`), or a
  16-bit float (A16).
- `w`: weights [N, K] — packed u4 (two per byte along K, low nibble first: bytes [N, K/2]), int8 or fp8.
- W4A8 (QServe's progressive group quantization): per group of `group` K values an unsigned 8-bit scale
  `gs[N, K/group]` and the zero already multiplied by it, `gz[N, K/group]` (z * s); the 4-bit value is
  dequantized to int8 as `w4 * s - z*s` (subtraction after multiplication) in 8-bit modular arithmetic:
  the level-1 int8 values lie in the protective range [-119, 119], so the exact result lies in
  [-128, 127] and the wrap-around of `w4 * s` (at most 255) and of the subtraction gives it exactly.
  `tl.dot` multiplies int8 by int8 into an int32 accumulator; the epilogue scales by `xs[m] * ws[n]`
  (per token x per output channel, the level-1 float scale).
- W4A16: `w = (w4 - z) * s` with a float scale `gs[N, K/group]` and zero `gz[N, K/group]`, rounded to
  the activations' type; a 16-bit tensor-core dot with an f32 accumulator.
- W8A8 / fp8: `tl.dot` of the stored values (int32 / f32 accumulator), `xs[m] * ws[n]` in the epilogue.

The packed weight bytes are loaded once per tile ([BLOCK_K/2, BLOCK_N] bytes) and split into nibbles in
registers (join + reshape: row k = 2 * byte + nibble), and a K tile never straddles a group (BLOCK_K
divides `group`), so each group's scale and zero are loaded once per tile: the bytes a kernel moves are
the bytes of its operands.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import sympy

from ..ir import dtypes as dt
from ..ir import index as ix
from ..ir.contraction import contraction
from ..ir.expr import Access, Call, Expr, accesses, index_symbols
from ..ir.module import Module, Statement
from .base import Group, register_kind
from .builder import KernelBuilder
from .dot import DotKind, is_contraction
from .emit import Emitter
from .spec import Arg, KernelSpec, Mapping
from .tile import TL, IndexCode, Tile, compute_dtype

SCHEMES = ("w4a8", "w4a16", "w8a8", "fp8")
RESERVED = {"pid", "num_n", "pid_m", "pid_n", "rm", "rn", "mmask", "nmask", "kx", "kw", "k0", "acc", "tl", "triton",
            "libm"}


@dataclass(frozen=True)
class QGemm:
    """What one quantized GEMM kernel computes: the scheme, the dtypes of its operands (IR dtype names)
    and the weight's group size (K values per scale; 0: one scale per output channel)."""

    scheme: str
    x: str  # activations' dtype: i8 | f8e4m3 | bf16 | f16
    out: str  # the output's dtype
    group: int = 0
    gs: str = "u8"  # w4: the group scale's dtype
    gz: str = "u8"  # w4: the group zero's dtype (W4A8: zero times scale)
    ws: str = "f32"  # per output channel scale (W4A8 level 1, W8A8, fp8)
    xs: str = "f32"  # per token scale (A8, fp8)

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"einfuse: no quantized GEMM scheme {self.scheme!r}; known: {', '.join(SCHEMES)}")
        if self.w4 and (self.group <= 0 or self.group % 32):
            raise ValueError(f"einfuse: a {self.scheme} kernel needs a group size that is a positive multiple of 32 "
                             f"(a K tile of int8 tensor cores), got {self.group}; quantize with group=32, 64, 128, ...")

    @property
    def w4(self) -> bool:
        return self.scheme in ("w4a8", "w4a16")

    @property
    def w(self) -> str:
        """The weight's stored IR dtype."""
        return {"w4a8": "u4", "w4a16": "u4", "w8a8": "i8", "fp8": "f8e4m3"}[self.scheme]

    @property
    def operands(self) -> tuple:
        """The kernel's tensor operands in argument order (role names)."""
        scales = {"w4a8": ("xs", "gs", "gz", "ws"), "w4a16": ("gs", "gz"), "w8a8": ("xs", "ws"), "fp8": ("xs", "ws")}
        return ("x", "w") + scales[self.scheme] + ("y",)

    def dtype(self, role: str) -> str:
        return {"x": self.x, "w": self.w, "y": self.out, "gs": self.gs, "gz": self.gz, "ws": self.ws,
                "xs": self.xs}[role]


def block_k(q: QGemm, K: int) -> int:
    """K per tile: 64 (the int8 and 16-bit tensor cores' step is 32 and 16) or less for a short K, and a
    divisor of the group so a tile lies inside one group."""
    bk = 64
    while q.w4 and q.group % bk:
        bk //= 2
    while bk > 32 and bk // 2 >= K:
        bk //= 2
    return bk


def default_tiles(q: QGemm, M: int, N: int, K: int) -> dict:
    """A decode-shaped M (a few tokens) takes the smallest tensor-core M tile; N and K tiles of 64."""
    bm = 16 if M <= 16 else 32 if M <= 32 else 64
    return {"BLOCK_M": bm, "BLOCK_N": 64 if N >= 64 else max(16, 1 << (N - 1).bit_length()), "BLOCK_K": block_k(q, K)}


def emit_qgemm(name: str, q: QGemm, refs: dict, extents: dict, tiles: dict, *, source_line: str = "",
               num_warps: int = 4) -> KernelSpec:
    """The Triton kernel `name` computing `q`. refs: operand role -> the tensor it binds (IR name);
    extents: "M", "N", "K" -> the extent (an integer or a sympy expression over size symbols, which become
    the kernel's size arguments); tiles: BLOCK_M/N/K."""
    if q.w4 and q.group % tiles["BLOCK_K"]:
        raise ValueError(f"einfuse: {q.scheme} BLOCK_K {tiles['BLOCK_K']} does not divide the group {q.group}")
    extents = {d: sympy.sympify(extents[d]) for d in ("M", "N", "K")}
    sizes = sorted(set().union(*[e.free_symbols for e in extents.values()]), key=str)
    kb = KernelBuilder(RESERVED | {f"{r}_ptr" for r in q.operands} | {str(s) for s in sizes})
    M, N, K = (IndexCode({}).doprint(extents[d]) for d in ("M", "N", "K"))
    M, N, K = (x if x.isidentifier() or x.isdigit() else f"({x})" for x in (M, N, K))
    ptr = {r: f"{r}_ptr" for r in q.operands}
    kb.assign("pid", "tl.program_id(0)")
    kb.assign("num_n", f"({N} + BLOCK_N - 1) // BLOCK_N")
    kb.assign("pid_m", "pid // num_n")
    kb.assign("pid_n", "pid % num_n")
    kb.assign("rm", "pid_m * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]")  # [BLOCK_M, 1]: token rows
    kb.assign("rn", "pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]")  # [1, BLOCK_N]: output channels
    kb.assign("mmask", f"rm < {M}")
    kb.assign("nmask", f"rn < {N}")
    kb.assign("kx", "tl.arange(0, BLOCK_K)[None, :]")
    acc_t = "tl.int32" if q.scheme in ("w4a8", "w8a8") else "tl.float32"
    kb.assign("acc", f"tl.zeros([BLOCK_M, BLOCK_N], dtype={acc_t})")
    # fp8 tiles are loaded as bytes and reinterpreted (a masked load's 0 has no fp8 cast in the interpreter)
    as_bytes = ".to(tl.pointer_type(tl.uint8))" if q.scheme == "fp8" else ""
    fp8 = ".to(tl.float8e4nv, bitcast=True)" if q.scheme == "fp8" else ""
    x_row = kb.let("x_row", f"{ptr['x']}{as_bytes} + rm * {K}")
    if q.w4:
        kb.assign("kw", "tl.arange(0, BLOCK_K // 2)[:, None]")  # byte rows of the packed tile
        w_col = kb.let("w_col", f"{ptr['w']} + rn * ({K} // 2)")
        ngroups = f"(({K} + {q.group} - 1) // {q.group})"
        gs_col = kb.let("gs_col", f"{ptr['gs']} + rn * {ngroups}")
        gz_col = kb.let("gz_col", f"{ptr['gz']} + rn * {ngroups}")
    else:
        kb.assign("kw", "tl.arange(0, BLOCK_K)[:, None]")
        w_col = kb.let("w_col", f"{ptr['w']}{as_bytes} + rn * {K}")
    with kb.loop("k0", f"0, {K}, BLOCK_K"):
        x_tile = kb.let("x_tile", f"tl.load({x_row} + k0 + kx, mask=mmask & (k0 + kx < {K}), other=0){fp8}")
        if q.w4:
            packed = kb.let("w_bytes", f"tl.load({w_col} + k0 // 2 + kw, mask=nmask & (k0 // 2 + kw < {K} // 2), other=0)")
            lo, hi = kb.let("w_lo", f"{packed} & 15"), kb.let("w_hi", f"{packed} >> 4")
            # row k of the tile is byte k // 2's nibble k % 2: [BK/2, BN, 2] -> [BK/2, 2, BN] -> [BK, BN]
            w4 = kb.let("w4", f"tl.reshape(tl.permute(tl.join({lo}, {hi}), (0, 2, 1)), (BLOCK_K, BLOCK_N))")
            g = kb.let("group", f"k0 // {q.group}")
            s = kb.let("g_scale", f"tl.load({gs_col} + {g}, mask=nmask, other=0)")
            z = kb.let("g_zero", f"tl.load({gz_col} + {g}, mask=nmask, other=0)")
            if q.scheme == "w4a8":
                # QServe: w8 = w4 * s - (z * s) in 8-bit lanes; exact because the result lies in [-128, 127]
                su, zu = (kb.let(f"{v}_u8", f"{v}.to(tl.uint8)") for v in (s, z))
                w_tile = kb.let("w_tile", f"({w4} * {su} - {zu}).to(tl.int8, bitcast=True)")
            else:
                act = TL[q.x]
                wf = f"({w4}.to(tl.float32) - {z}.to(tl.float32)) * {s}.to(tl.float32)"
                w_tile = kb.let("w_tile", f"({wf}).to({act})")
        else:
            w_tile = kb.let("w_tile", f"tl.load({w_col} + k0 + kw, mask=nmask & (k0 + kw < {K}), other=0){fp8}")
        if q.scheme in ("w4a8", "w8a8"):
            kb.assign("acc", f"libm.dot({x_tile}, {w_tile}, acc, out_dtype=tl.int32)")
        else:
            kb.assign("acc", f"libm.dot({x_tile}, {w_tile}, acc)")
    res = "acc" if acc_t == "tl.float32" else kb.let("acc_f32", "acc.to(tl.float32)")
    if "xs" in q.operands:
        xs = kb.let("x_scale", f"tl.load({ptr['xs']} + rm, mask=mmask, other=0).to(tl.float32)")
        ws = kb.let("w_scale", f"tl.load({ptr['ws']} + rn, mask=nmask, other=0).to(tl.float32)")
        res = kb.let("y_tile", f"{res} * {xs} * {ws}")
    out = TL[q.out]
    kb.store(ptr["y"], f"rm * {N} + rn", f"{res}.to({out})" if out != "tl.float32" else res, "mmask & nmask")
    args = [Arg(ptr[r], "ptr", refs.get(r, r), q.dtype(r)) for r in q.operands]
    args += [Arg(str(s), "size", str(s)) for s in sizes]
    params = ", ".join([a.name for a in args] + [f"{k}: tl.constexpr" for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")])
    doc = (f'"""einfuse kernel {name}: a {q.scheme} GEMM (einfuse.kinds.qdot), y[m, n] = sum[k] x[m, k] * w[n, k]'
           f"{f', group {q.group}' if q.w4 else ''}.\n\n"
           f"Mapping: qdot tile BLOCK_M={tiles['BLOCK_M']} BLOCK_N={tiles['BLOCK_N']} BLOCK_K={tiles['BLOCK_K']}\n" + '"""')
    lines = [doc, "import triton", "import triton.language as tl", "", "from einfuse.codegen import libm", "", "",
             "@triton.jit", f"def {name}({params}):"]
    if source_line:
        lines.append(f"    # {source_line}")
    src = "\n".join(lines + kb.render()) + "\n"
    bm, bn = tiles["BLOCK_M"], tiles["BLOCK_N"]
    grid = [ix.FloorDiv(extents["M"] + bm - 1, bm) * ix.FloorDiv(extents["N"] + bn - 1, bn), sympy.Integer(1)]
    mp = Mapping("qdot", tiles=tuple((k, tiles[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")), num_warps=num_warps)
    return KernelSpec(name, (refs.get("y", "y"),), (refs.get("y", "y"),), src, args, dict(tiles), grid, mp,
                      meta={"scheme": q.scheme})


# ------------------------------------------------------------------------------------ the qdot kernel kind

@dataclass(frozen=True)
class PackedOperand:
    """A contraction operand computed from a packed 4-bit tensor read at [lead.., k] and group tensors
    (scales, zeros) read at [lead.., k // group]: the W4A8 / W4A16 weight formats of docs/quant.md."""

    packed: Access
    groups: tuple  # Access of each group tensor
    group: int


def packed_operand(e: Expr, k, types: dict) -> PackedOperand | None:
    """Recognize an operand (`e`, over the contraction's single K rank `k`) that dequantizes a packed
    4-bit tensor by group: every access that depends on k is the packed one at [lead.., k] or a group
    tensor at [lead.., k // g] with the same leading positions and one g (a multiple of 16: a K tile of
    the tensor cores lies inside a group). None otherwise."""
    packed, grouped, group = None, [], None
    for a in accesses(e):
        if not (index_symbols(a) & {k}):
            continue
        if any(isinstance(p, Expr) for p in a.indices):
            return None
        *lead, last = a.indices
        if any(k in sympy.sympify(p).free_symbols for p in lead):
            return None
        if types[a.tensor].dtype.packed:
            if last != k or (packed is not None and packed != a):
                return None
            packed = a
            continue
        last = sympy.sympify(last)
        if not (isinstance(last, ix.FloorDiv) and last.args[0] == k and last.args[1].is_Integer):
            return None
        g = int(last.args[1])
        if group not in (None, g):
            return None
        group = g
        if a not in grouped:
            grouped.append(a)
    if packed is None or group is None or group % 16 or any(a.indices[:-1] != packed.indices[:-1] for a in grouped):
        return None
    return PackedOperand(packed, tuple(grouped), group)


def _qserve_int8(e: Expr, op: PackedOperand, dtype_of) -> bool:
    """Whether `e` is exactly `i8(i16(q) * i16(s) - i16(zs))` with u8 scale and zero-times-scale: then
    8-bit lanes that wrap give the same int8 (the i8 cast keeps the result modulo 256)."""
    def cast_of(x, to):
        return isinstance(x, Call) and x.op == "cast" and x.attr == to and len(x.args) == 1

    if not (cast_of(e, dt.i8) and isinstance(e.args[0], Call) and e.args[0].op == "sub"):
        return False
    mul, zero = e.args[0].args
    if not (isinstance(mul, Call) and mul.op == "mul" and cast_of(zero, dt.i16) and all(cast_of(x, dt.i16) for x in mul.args)):
        return False
    q, s, z = mul.args[0].args[0], mul.args[1].args[0], zero.args[0]
    return (q == op.packed and s in op.groups and z in op.groups and s != z
            and dtype_of(s.tensor) == dt.u8 and dtype_of(z.tensor) == dt.u8 and dtype_of(q.tensor) == dt.u4)


class QDotKind(DotKind):
    """Contractions with an operand stored as packed 4-bit values with group scales/zeros (W4A8: the
    int8 level-1 weights; W4A16: 16-bit weights), with the dot kind's roles (accumulators, row
    statistics, epilogue). The packed tile is loaded once as bytes ([BLOCK_K/2, BLOCK_N]) and split into
    nibbles in registers; BLOCK_K divides the group, so each group's scale and zero are loaded once per
    K tile; the dequantization is the IR's own expression over those registers (for W4A8's
    `i8(i16(q) * i16(s) - i16(z*s))`: QServe's 8-bit multiply-then-subtract, which wraps to the same int8)."""

    name = "qdot"
    priority = 31  # before dot: a lone quantized contraction is a qdot kernel

    def _packed(self, m: Module, s: Statement) -> list | None:
        """The packed operands of a quantized contraction (a or b side), or None if it has none."""
        types = m.types()
        c = contraction(s, lambda n: types[n].dtype)
        if c is None or len(c.k) != 1 or c.operand not in (dt.i8, dt.bf16, dt.f16):
            return None
        found = [p for p in (packed_operand(x, c.k[0], types) for x in (c.a, c.b)) if p is not None]
        if not found or (c.int8 and any(p.group % 32 for p in found)):  # int8 tensor cores step 32 along K
            return None
        return found

    @staticmethod
    def _fp8(m: Module, s: Statement) -> bool:
        """A contraction reading an fp8 tensor (docs/quant.md's fp8 weights: `f32(W_q[n, k])`)."""
        types = m.types()
        return (contraction(s, lambda n: types[n].dtype) is not None
                and any(types[a.tensor].dtype in FP8 for a in accesses(s.expr)))

    def claims(self, m: Module, s: Statement) -> bool:
        return super().claims(m, s) and (self._packed(m, s) is not None or self._fp8(m, s))

    def group_roles(self, m: Module, members: list) -> tuple | None:
        roles = super().group_roles(m, members)
        if roles is None:
            return None
        prod = m.producers()
        dots = [prod[n] for n, r in zip(members, roles) if r == "acc"]
        return roles if all(self._packed(m, d) or self._fp8(m, d) for d in dots) else None

    def _tiles(self, g: Group, block_mn: int = 64, block_k: int | None = None) -> Mapping:
        groups = {p.group for s in g.statements if s.reduce is not None for p in (self._packed(g.module, s) or [])}
        bk = min(64, block_k or 64)
        while any(x % bk for x in groups):
            bk //= 2
        mp = super()._tiles(g, block_mn, bk)
        tiles = dict(mp.tiles)
        if block_mn == 64 and tiles["BLOCK_M"] <= 16 and tiles["BLOCK_N"] == 64:
            # decode (a few tokens): 128 output channels per program, so the activation rows, which every
            # program re-reads, are read half as often; the weight, read once, is unchanged
            tiles["BLOCK_N"] = 128
        return dataclasses.replace(mp, kind="qdot", tiles=tuple(tiles.items()))

    def _epilogue(self, em: Emitter, members: list, names: dict, values: dict, mask: str | None) -> None:
        """The dot kind's epilogue, except that a map over the contraction's own output positions (the
        dequantization `T(f32(acc) * x_scale[m] * w_scale[n])`) sees the tile's row and column variables:
        a per-token or per-channel scale is loaded once per row or column, not once per element."""
        anchor = next(s for s in members if contraction(s, em.dtype_of) is not None)
        maps = [s for s in members if contraction(s, em.dtype_of) is None and s.reduce is None]
        if not maps or any(tuple(m.type.shape) != tuple(anchor.type.shape) or len(m.index) != len(anchor.index)
                           or not all(isinstance(r, sympy.Symbol) for r in m.index) for m in maps):
            return super()._epilogue(em, members, names, values, mask)
        kb = em.kb
        out = {r: names[r] for r in anchor.index if r in names}
        if len(out) != len(anchor.index):
            return super()._epilogue(em, members, names, values, mask)
        if mask:
            kb.assign("emask", mask)  # the stores' mask; loads take their own rank's
        offset = em.store_offset(names, anchor)
        held = (lambda a: values[a.tensor][0] if a.tensor in values else None)
        c = contraction(anchor, em.dtype_of)
        ragged = {**{r: "mmask" for r in c.m if mask and "mmask" in mask},
                  **{r: "nmask" for r in c.n if mask and "nmask" in mask}}
        for s in maps:
            own = {r: out[a] for r, a in zip(s.index, anchor.index)}
            masks = {r: ragged[a] for r, a in zip(s.index, anchor.index) if a in ragged}
            t = Tile(em, {**names, **own}, masks, held=held)
            code, d = t.value(s.expr, s.name)
            kb.place(t.block)
            values[s.name] = (code, d)
            if s.name in em.stored:
                em.store(s, offset, code, d, "emask" if mask else None)

    def candidates(self, g: Group) -> list[Mapping]:
        """The dot kind's variants whose K tile still steps the tensor cores (32 for int8)."""
        least = 32 if any(contraction(s, g.info.dtype_of).int8 for s in g.statements if is_contraction(g.module, s)) else 16
        return [mp for mp in super().candidates(g) if dict(mp.tiles)["BLOCK_K"] >= least] or [self.mapping(g)]

    def operand(self, em: Emitter, tile: Tile, e, side: str, mp: Mapping) -> str:
        (k,) = mp.red
        op = packed_operand(e, k, em.types)
        if op is None:
            return self._fp8_operand(em, tile, e) or super().operand(em, tile, e, side, mp)
        hoist = tile.hoist
        lead = list(op.packed.indices[:-1])
        K = em.extents[k]
        t = em.types[op.packed.tensor]
        lead_shape = list(t.shape[:-1])
        lead_syms = set().union(*[sympy.sympify(p).free_symbols for p in lead]) if lead else set()
        lead_masks = sorted({tile.masks[r] for r in lead_syms if r in tile.masks and r not in em.unit_ranks})
        # bytes [BLOCK_K/2, BLOCK_N] (side b: K down the rows) or [BLOCK_M, BLOCK_K/2] (side a)
        kp = hoist.emit("tl.arange(0, BLOCK_K // 2)" + ("[:, None]" if side == "b" else "[None, :]"), f"kp_{side}")
        base = hoist.emit(f"{em.pointer(op.packed.tensor)} + "
                          f"({hoist.index(ix.flat_offset(lead + [0], lead_shape + [(t.shape[-1] + 1) // 2]))})",
                          f"{op.packed.tensor}_base")
        kmask = [f"(k0 + 2 * {kp} < {em.ext(K)})"] if em.ragged([k], dict(mp.tiles)["BLOCK_K"]) else []
        mask = " & ".join(lead_masks + kmask)
        nbytes = tile.emit(f"tl.load({base} + k0 // 2 + {kp}" + (f", mask={mask}, other=0)" if mask else ")"),
                           f"{op.packed.tensor}_bytes")
        lo, hi = tile.emit(f"{nbytes} & 15", f"{op.packed.tensor}_lo"), tile.emit(f"{nbytes} >> 4", f"{op.packed.tensor}_hi")
        if side == "b":  # row k of the tile is byte k // 2's nibble k % 2: [BK/2, BN, 2] -> [BK/2, 2, BN] -> [BK, BN]
            codes = tile.emit(f"tl.reshape(tl.permute(tl.join({lo}, {hi}), (0, 2, 1)), (BLOCK_K, BLOCK_N))", op.packed.tensor)
        else:
            codes = tile.emit(f"tl.reshape(tl.join({lo}, {hi}), (BLOCK_M, BLOCK_K))", op.packed.tensor)
        if t.dtype.signed:  # i4: two's complement nibbles
            codes = tile.emit(f"tl.where({codes} >= 8, {codes}.to(tl.int8) - 16, {codes}.to(tl.int8))", op.packed.tensor)
        held = {op.packed: codes}
        gmask = " & ".join(lead_masks)
        for a in op.groups:  # one scale / zero per (row, group): this K tile's group
            gt = em.types[a.tensor]
            gbase = hoist.emit(f"{em.pointer(a.tensor)} + ({hoist.index(ix.flat_offset(lead + [0], list(gt.shape)))})",
                               f"{a.tensor}_base")
            cd = compute_dtype(gt.dtype)  # registers hold a value in its compute type (16-bit floats in f32)
            widen = f".to({TL[cd.name]})" if cd != gt.dtype else ""
            held[a] = tile.emit(f"tl.load({gbase} + k0 // {op.group}" + (f", mask={gmask}, other=0)" if gmask else ")")
                                + widen, f"{a.tensor}_tile")
        if _qserve_int8(e, op, em.dtype_of):
            q, s, z = held[op.packed], held[e.args[0].args[0].args[1].args[0]], held[e.args[0].args[1].args[0]]
            return tile.emit(f"({q} * {s} - {z}).to(tl.int8, bitcast=True)", "w8_tile")
        inner = Tile(em, tile.ranks, tile.masks, held=lambda a: held.get(a), flats=tile.flats)
        inner.block = tile.block  # the dequantization runs in the K loop, on the registers above
        return inner.value(e, "dq_tile")[0]


    @staticmethod
    def _fp8_operand(em: Emitter, tile: Tile, e) -> str | None:
        """An operand reading fp8 tensors: each is loaded as bytes and reinterpreted (a masked load's 0 has
        no fp8 conversion in Triton's interpreter), then the IR's expression (`f32(W_q[n, k])`) computes on
        it. The product runs as the contraction's operand type (f32 here: the IR widens fp8 operands)."""
        reads = [a for a in accesses(e) if em.types[a.tensor].dtype in FP8]
        if not reads or any(isinstance(p, Expr) for a in reads for p in a.indices):
            return None
        held = {}
        for a in reads:
            t = em.types[a.tensor]
            offset = tile.index(ix.flat_offset(list(a.indices), list(t.shape)).xreplace(em.unit_ranks))
            syms = set().union(*[sympy.sympify(p).free_symbols for p in a.indices])
            masks = sorted({tile.masks[r] for r in syms if r in tile.masks and r not in em.unit_ranks})
            mask = f", mask={' & '.join(masks)}, other=0" if masks else ""
            raw = tile.emit(f"tl.load({em.pointer(a.tensor)}.to(tl.pointer_type(tl.uint8)) + ({offset}){mask})",
                            f"{a.tensor}_bytes")
            fp = tile.emit(f"{raw}.to({TL[t.dtype.name]}, bitcast=True)", a.tensor)
            held[a] = tile.emit(f"{fp}.to(tl.float32)", f"{a.tensor}_f32")  # registers hold f32 (compute_dtype)
        inner = Tile(em, tile.ranks, tile.masks, held=lambda a: held.get(a), flats=tile.flats)
        inner.block = tile.block
        return inner.value(e, "fp8_tile")[0]


FP8 = (dt.f8e4m3, dt.f8e5m2)
QDOT = register_kind(QDotKind())
