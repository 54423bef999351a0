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

from dataclasses import dataclass

import sympy

from ..ir import index as ix
from .builder import KernelBuilder
from .spec import Arg, KernelSpec, Mapping
from .tile import TL, IndexCode

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
