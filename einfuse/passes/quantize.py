"""Quantization passes: weights, activations and the KV cache as ordinary IR (see docs/quant.md for the
exact statements each one writes; kernel kinds match those shapes).

* `QuantizeWeights(bits=4, group=128, progressive=True)` (or `bits=8`, or `fmt="fp8"`): a Linear's weight
  param `W[n, k]` becomes packed codes and scales (new params `W_q`, `W_s`, `W_gs`, `W_gz`) and a
  dequantization statement the contraction reads.
* `QuantizeActivations(bits=8, per="token")`: a contraction over an 8-bit weight quantizes its activation
  per token (dynamic amax) and becomes an integer GEMM with the scales in its epilogue.
* `QuantizeKV(bits=4|8)`: asymmetric per token and head; over a serving program's paged cache (after
  `cache_kv`) the cache states themselves become 4-bit (two codes a byte) with f16 scale/zero states.
* `RotateKeys()`: a Hadamard rotation of queries and keys over the head dim (scores unchanged), so 4-bit
  keys lose less (QuaRot's online rotation, head dim only); `center=True` also centres and smooths the
  rotated keys with calibrated per-channel params `W_kc`, `W_kl` of the key projection's weight `W`.
* `QuantizeKV(bits, key_group=32)`: keys per token in groups of 32 channels (values per head).
* `RotateInputs()`: each quantized Linear reads its activation rotated by a block Hadamard matrix (param
  `W_hb`), its weight calibrated as `W Hb` (QuaRot's online Hadamard / QuIP#'s incoherence, per Linear).

A pass only rewrites the IR; the values of the params it adds come from the model: a param named
`<W>_<suffix>` is bound to the model's attribute `<target of W>_<suffix>` (`einfuse.quant` registers
those buffers on each quantized Linear; `runtime.compiled.bind_derived` binds them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import sympy

from ..ir import dtypes as dt
from ..ir import index as ix
from ..ir.contraction import mul_factors, peel_invariant, product
from ..ir.expr import Access, Call, Const, Expr, IndexValue, accesses, index_symbols, rewrite, substitute
from ..ir.module import Input, Module, Reduce, Statement, TensorType, Update
from ..ir.ops import infer
from .base import Pass, PassError, fresh_name

WEIGHT_SUFFIXES = ("q", "s", "gs", "gz")  # the params quantize_weights derives from a weight `W`: W_q, ...


def check_group(group: int) -> int:
    """A group size must be a positive multiple of 8 (whole bytes of packed codes per group)."""
    if isinstance(group, bool) or not isinstance(group, int) or group <= 0 or group % 8:
        raise ValueError(f"einfuse quantize_weights: group={group!r} is not a positive multiple of 8; "
                         f"use group=128 (QServe's), 64 or 32")
    return group


def cast(x: Expr, d: dt.DType) -> Expr:
    return Call("cast", (x,), d)


def call(op: str, *args) -> Expr:
    return Call(op, tuple(a if isinstance(a, Expr) else Const(a) for a in args))


def clamp(x: Expr, lo, hi) -> Expr:
    return call("min", call("max", x, lo), hi)


def insert_before(body: list, anchor, ops: list) -> list:
    """`ops` placed right before `anchor` in `body`."""
    i = next(n for n, op in enumerate(body) if op is anchor)
    return body[:i] + list(ops) + body[i:]


# ---------------------------------------------------------------- Linear contractions

@dataclass
class Linear:
    """`y[.., n] = sum[k:K] X(.., k) * W[n, k] (* post)`: a contraction reading a rank-2 weight."""

    stmt: Statement
    weight: str  # the tensor read as W[n, k]
    x: Expr  # the activation factor(s), over the output ranks but n, and k
    n: sympy.Symbol
    k: sympy.Symbol
    post: list  # [(op, factor)] applied to the sum


def match_linear(s, types: dict) -> Linear | None:
    """`s` as a Linear contraction (one reduced rank, one factor `W[n, k]` of a rank-2 tensor), or None."""
    if not isinstance(s, Statement) or s.reduce is None or s.reduce.op != "sum" or s.iterate is not None:
        return None
    if len(s.reduce.ranks) != 1:
        return None
    k = s.reduce.ranks[0][0]
    body, post = peel_invariant(s.expr, {k})
    factors = mul_factors(body)
    found = [f for f in factors if isinstance(f, Access) and len(f.indices) == 2 and f.indices[1] == k
             and isinstance(f.indices[0], sympy.Symbol) and f.indices[0] in s.index
             and types[f.tensor].rank == 2]
    # x[m, k] * W[n, k] has two such factors: the weight's n is the output's feature (last) rank
    found.sort(key=lambda f: f.indices[0] != s.index[-1])
    for w in found:
        n = w.indices[0]
        rest = [f for f in factors if f is not w]
        if not rest or any(n in index_symbols(f) for f in rest) or k not in index_symbols(product(rest)):
            continue
        return Linear(s, w.tensor, product(rest), n, k, post)
    return None


def weight_inputs(m: Module, skip: tuple) -> dict:
    """Weight params read only as the W of Linear contractions (not by a gather: a tied embedding is
    kept), named by no entry of `skip`: {weight name: [Linear]}."""
    types = m.types()
    kinds = {i.name: i.kind for i in m.inputs}
    out: dict = {}
    bad = set()
    for op in m.body:
        lin = match_linear(op, types)
        for r in op.reads():
            if kinds.get(r) not in ("param", "buffer", "const"):
                continue
            if lin is not None and lin.weight == r and sum(a.tensor == r for a in accesses(op.expr)) == 1:
                out.setdefault(r, []).append(lin)
            else:
                bad.add(r)
    return {w: ls for w, ls in out.items()
            if w not in bad and types[w].dtype.is_float and not any(s in w for s in skip)}


# ---------------------------------------------------------------- quantize_weights

class QuantizeWeights(Pass):
    """Each Linear weight `W[N, K]` (a float param read only by contractions; names containing an entry of
    `skip` are left: the LM head by default) becomes stored codes + scales and a dequantization statement
    `W_dq` (or `W_w8`, W4A8's level-1 int8 values) that the contraction reads. bits=4: `progressive`
    (QServe: int8 per channel, then u4 per group with u8 scale and zero*scale) or asymmetric u4 with f16
    scale/zero per group; bits=8: symmetric int8 per channel; fmt="fp8": e4m3 per channel."""

    name = "quantize_weights"

    def __init__(self, bits: int = 4, group: int = 128, progressive: bool = True, fmt: str = "int",
                 skip: tuple = ("lm_head",)):
        if fmt not in ("int", "fp8"):
            raise ValueError(f"einfuse quantize_weights: fmt={fmt!r}; use 'int' or 'fp8'")
        if fmt == "int" and bits not in (4, 8):
            raise ValueError(f"einfuse quantize_weights: bits={bits!r}; use 4 or 8 (or fmt='fp8')")
        self.bits, self.fmt, self.progressive, self.skip = bits, fmt, progressive, tuple(skip)
        self.group = check_group(group) if fmt == "int" and bits == 4 else 0

    def run(self, m: Module) -> Module:
        types = m.types()
        taken = set(types)
        weights = weight_inputs(m, self.skip)
        if not weights:
            return m
        inputs = []
        body = list(m.body)
        replaced = {}
        for i in m.inputs:
            if i.name not in weights:
                inputs.append(i)
                continue
            new_inputs, stmts, read = self._weight(i, types[weights[i.name][0].stmt.name].dtype, taken)
            inputs += new_inputs
            first = next(op for op in body if i.name in op.reads())
            body = insert_before(body, first, stmts)
            replaced[i.name] = read
        body = [self._reader(op, replaced, types) for op in body]
        return m.replace(inputs=tuple(inputs), body=tuple(body))

    def _reader(self, op, replaced: dict, types: dict):
        lin = match_linear(op, types)
        if lin is None or lin.weight not in replaced:
            return op
        name = replaced[lin.weight]
        return op.replace(expr=rewrite(op.expr, lambda e: Access(name, e.indices)
                                       if isinstance(e, Access) and e.tensor == lin.weight else None))

    def _weight(self, w: Input, out_dtype: dt.DType, taken: set):
        """(new inputs, statements, the tensor the contraction reads as W[n, k])."""
        N, K = w.type.shape
        n, k = ix.rank("n"), ix.rank("k")
        kind = w.kind if w.kind != "const" else "buffer"
        T = w.type.dtype

        def param(suffix, d, shape):
            name = f"{w.name}_{suffix}"
            if name in taken:
                raise PassError(self.name, f"{name!r} already exists; rename the model's tensor")
            taken.add(name)
            return Input(name, TensorType(d, shape), kind)

        dq = fresh_name(taken, f"{w.name}_dq")
        if self.fmt == "fp8" or self.bits == 8:
            q = param("q", dt.f8e4m3 if self.fmt == "fp8" else dt.i8, (N, K))
            s = param("s", dt.f32, (N,))
            stmt = Statement(dq, TensorType(T, (N, K)), (n, k),
                             cast(call("mul", cast(Access(q.name, (n, k)), dt.f32), Access(s.name, (n,))), T))
            return [q, s], [stmt], dq
        g = self.group
        G = (sympy.sympify(K) + g - 1) // g
        grp = ix.FloorDiv(k, g)
        q = param("q", dt.u4, (N, K))
        if self.progressive:
            s = param("s", dt.f32, (N,))
            gs, gz = param("gs", dt.u8, (N, G)), param("gz", dt.u8, (N, G))
            w8 = fresh_name(taken, f"{w.name}_w8")
            level1 = Statement(w8, TensorType(dt.i8, (N, K)), (n, k), cast(call(
                "sub", call("mul", cast(Access(q.name, (n, k)), dt.i16), cast(Access(gs.name, (n, grp)), dt.i16)),
                cast(Access(gz.name, (n, grp)), dt.i16)), dt.i8))
            stmt = Statement(dq, TensorType(T, (N, K)), (n, k),
                             cast(call("mul", cast(Access(w8, (n, k)), dt.f32), Access(s.name, (n,))), T))
            return [q, s, gs, gz], [level1, stmt], dq
        gs, gz = param("gs", dt.f16, (N, G)), param("gz", dt.f16, (N, G))
        stmt = Statement(dq, TensorType(T, (N, K)), (n, k), cast(call(
            "mul", call("sub", cast(Access(q.name, (n, k)), dt.f32), cast(Access(gz.name, (n, grp)), dt.f32)),
            cast(Access(gs.name, (n, grp)), dt.f32)), T))
        return [q, gs, gz], [stmt], dq


# ---------------------------------------------------------------- rotate_inputs (beyond QServe)

HB_SUFFIX = "hb"  # the param RotateInputs derives from a weight `W`: W_hb, the block's normalized Hadamard


def hadamard_block(K: int, most: int = 128) -> int:
    """The block RotateInputs (and einfuse.quant.calibrate) rotates a Linear's K in-features by: the largest
    power of two <= `most` dividing K (384, 1536 -> 128; 576 -> 64)."""
    B = 1
    while B < most and K % (2 * B) == 0:
        B *= 2
    return B


def input_block(K, what: str, least: int = 8) -> int:
    """hadamard_block(K), refusing a K (symbolic, or with no power-of-two block >= `least`) it cannot rotate."""
    K = sympy.sympify(K)
    if not K.is_Integer:
        raise PassError("rotate_inputs", f"einfuse: {what}: {K} in-features are not a fixed number; the input "
                                         "rotation needs a concrete K (use a scheme without rotate_inputs)")
    B = hadamard_block(int(K))
    if B < least:
        raise PassError("rotate_inputs", f"einfuse: {what}: {int(K)} in-features have no power-of-two block >= "
                                         f"{least} dividing them (the largest is {B}); the input rotation needs K a "
                                         f"multiple of {least} (use a scheme without rotate_inputs)")
    return B


class RotateInputs(Pass):
    """Each Linear `y = sum[k:K] X(.., k) * W[n, k]` that quantize_weights will quantize (the same weights,
    `skip` alike) reads its activation rotated by a block-diagonal normalized Hadamard matrix Hb (blocks of
    B = hadamard_block(K)): `x_rot[.., j] = sum[r:B] X(.., B*(j // B) + r) * W_hb[r, j % B]`, and W is the
    calibrated `W Hb` (y = (x Hb) (W Hb)^T). `W_hb: f32[B, B]` is a param bound to the Linear's `weight_hb`
    (einfuse.quant.calibrate registers it with rotate_inputs). The activation's outliers are spread over each
    block before quantize_activations sees them (QuaRot's online Hadamard, per Linear). Linears reading the same
    activation share one rotation. The rotation keeps the blocks as a dim of its own — `x_rot[.., a, b] =
    sum[r:B] X(.., B*a + r) * W_hb[r, b]`, read as `x_rot[.., k // B, k % B]` — so that it is a plain matmul
    (one flat output dim would make it a product broadcast over every block, 6x slower on CPU)."""

    name = "rotate_inputs"

    def __init__(self, skip: tuple = ("lm_head",)):
        self.skip = tuple(skip)

    def run(self, m: Module) -> Module:
        types = m.types()
        taken = set(types)
        weights = weight_inputs(m, self.skip)
        if not weights:
            return m
        kinds = {i.name: i.kind for i in m.inputs}
        dtype_of = lambda t: types[t].dtype
        body = list(m.body)
        new_inputs = []
        shared: dict = {}  # (the rotation's text with its table left out, B) -> x_rot
        for w, lins in weights.items():
            B = input_block(types[w].shape[1], f"Linear weight {w!r}")
            hb = f"{w}_{HB_SUFFIX}"
            if hb in taken:
                raise PassError(self.name, f"{hb!r} already exists; rename the model's tensor")
            taken.add(hb)
            new_inputs.append(Input(hb, TensorType(dt.f32, (B, B)), kinds[w] if kinds[w] != "const" else "buffer"))
            for lin in lins:
                s, k = lin.stmt, lin.k  # each Linear is rewritten once (its own weight): body still holds `s`
                at = body.index(s)
                K = dict(s.reduce.ranks)[k]
                ext = dict(zip(s.index, s.type.shape))
                xranks = [r for r in s.index if r in index_symbols(lin.x)]
                canon = [ix.rank(f"x{d}") for d in range(len(xranks))]
                # blocks as a dim of their own: x_rot[.., a, b] = sum[r:B] X(.., B*a + r) * W_hb[r, b] is a plain
                # matmul for every backend, and the Linear reads it as x_rot[.., k // B, k % B] (a view)
                a, b, r = ix.rank(f"x{len(xranks)}"), ix.rank(f"x{len(xranks) + 1}"), ix.rank("r")
                nb = int(K) // B
                x = substitute(lin.x, {**dict(zip(xranks, canon)), k: a * B + r if nb > 1 else r})
                xd = infer(lin.x, dtype_of)[0]
                key = (str(x), B)
                if key not in shared:
                    xf = cast(x, dt.f32) if xd != dt.f32 else x
                    rot = fresh_name(taken, f"{s.name}_xrot")
                    body.insert(at, Statement(rot, TensorType(xd, tuple(ext[q] for q in xranks) + (nb, B)),
                                              tuple(canon) + (a, b), call("mul", xf, Access(hb, (r, b))),
                                              Reduce("sum", ((r, B),)), loc=s.loc))
                    at += 1
                    shared[key] = rot
                read = Access(shared[key], tuple(xranks) + (ix.FloorDiv(k, B), ix.Mod(k, B)))
                e = call("mul", Access(lin.weight, (lin.n, k)), read)
                for op, f in lin.post:
                    e = call(op, e, f)
                body[at] = s.replace(expr=e)
        return m.replace(inputs=tuple(m.inputs) + tuple(new_inputs), body=tuple(body))


# ---------------------------------------------------------------- quantize_activations

def dequant_parts(s, types: dict):
    """`s` as `W_dq[n, k] = T(f32(A[n, k]) * S[n])` with A 8-bit (i8 or f8e4m3): (A, S, A's dtype), else None."""
    if not isinstance(s, Statement) or s.reduce is not None:
        return None
    e = s.expr
    if not (isinstance(e, Call) and e.op == "cast"):
        return None
    e = e.args[0]
    if not (isinstance(e, Call) and e.op == "mul" and len(e.args) == 2):
        return None
    a, sc = e.args
    if not (isinstance(a, Call) and a.op == "cast" and isinstance(a.args[0], Access) and isinstance(sc, Access)):
        return None
    acc, n, k = a.args[0], s.index[0], s.index[1]
    if tuple(acc.indices) != (n, k) or tuple(sc.indices) != (n,):
        return None
    d = types[acc.tensor].dtype
    if d not in (dt.i8, dt.f8e4m3):
        return None
    return acc.tensor, sc.tensor, d


class QuantizeActivations(Pass):
    """Every contraction reading an 8-bit weight (`W_dq` of quantize_weights with bits=8, progressive 4
    bits, or fp8) quantizes its activation per token, dynamically (amax over K / 127, or / 448 for fp8),
    and becomes `acc = sum[k] i32(xq) * i32(w8)` (f32 of fp8 values) with `T(f32(acc) * xs * ws)` as its
    epilogue. Contractions over float weights are left as they are."""

    name = "quantize_activations"

    def __init__(self, bits: int = 8, per: str = "token", fmt: str = "int"):
        if per != "token":
            raise ValueError(f"einfuse quantize_activations: per={per!r}; only per='token' (dynamic) is built")
        if fmt not in ("int", "fp8") or (fmt == "int" and bits != 8):
            raise ValueError(f"einfuse quantize_activations: bits={bits!r}, fmt={fmt!r}; use bits=8 or fmt='fp8'")
        self.bits, self.per, self.fmt = bits, per, fmt

    def run(self, m: Module) -> Module:
        types = m.types()
        taken = set(types)
        producers = m.producers()
        dtype_of = lambda t: types[t].dtype
        body = []
        for op in m.body:
            lin = match_linear(op, types)
            parts = dequant_parts(producers.get(lin.weight), types) if lin is not None else None
            if parts is None:
                body.append(op)
                continue
            body += self._gemm(lin, parts, taken, dtype_of)
        return m.replace(body=tuple(body))

    def _gemm(self, lin: Linear, parts, taken: set, dtype_of) -> list:
        s, k, n = lin.stmt, lin.k, lin.n
        a, scale, wdtype = parts
        K = dict(s.reduce.ranks)[k]
        xranks = [r for r in s.index if r in index_symbols(lin.x)]
        ext = dict(zip(s.index, s.type.shape))
        rows = tuple(ext[r] for r in xranks)
        x = cast(lin.x, dt.f32) if infer(lin.x, dtype_of)[0] != dt.f32 else lin.x
        fp8 = self.fmt == "fp8" or wdtype == dt.f8e4m3
        if fp8 != (wdtype == dt.f8e4m3):
            return [s]  # an int8 weight with fp8 activations (or the reverse): no kernel computes it
        xa, xs, xq, acc = (fresh_name(taken, f"{s.name}_{x}") for x in ("xa", "xs", "xq", "acc"))
        out = [
            Statement(xa, TensorType(dt.f32, rows), tuple(xranks), call("abs", x), Reduce("max", ((k, K),)), loc=s.loc),
            Statement(xs, TensorType(dt.f32, rows), tuple(xranks),
                      call("mul", call("max", Access(xa, tuple(xranks)), 1e-08), 1 / (448.0 if fp8 else 127.0)),
                      loc=s.loc),
        ]
        xsv = Access(xs, tuple(xranks))
        if fp8:
            code = cast(call("div", x, xsv), dt.f8e4m3)
            qd, accd, op_cast = dt.f8e4m3, dt.f32, dt.f32
        else:
            code = cast(clamp(call("round", call("div", x, xsv)), -127.0, 127.0), dt.i8)
            qd, accd, op_cast = dt.i8, dt.i32, dt.i32
        out.append(Statement(xq, TensorType(qd, rows + (K,)), tuple(xranks) + (k,), code, loc=s.loc))
        out.append(Statement(acc, TensorType(accd, s.type.shape), s.index,
                             call("mul", cast(Access(xq, tuple(xranks) + (k,)), op_cast), cast(Access(a, (n, k)), op_cast)),
                             Reduce("sum", ((k, K),)), loc=s.loc))
        y = call("mul", call("mul", cast(Access(acc, s.index), dt.f32), xsv), Access(scale, (n,)))
        for op, f in lin.post:
            y = call(op, y, f)
        out.append(s.replace(expr=y if s.type.dtype == dt.f32 else cast(y, s.type.dtype), reduce=None))
        return out


# ---------------------------------------------------------------- the KV cache

def _kv_sources(m: Module, key_group: int | None = None) -> dict:
    """{source tensor: (quantization group, {statements reading it as keys or values})} of every attention in
    a module without a cache: the head dim, or `key_group` for keys."""
    from .attention import find

    types = m.types()
    out: dict = {}
    for c in find(m):
        (e, D), = c.qk.reduce.ranks
        for stmt, expr, ranks, ext, key in ((c.qk, c.qk.expr, {e, c.qk.index[-1]}, D, True),
                                            (c.av, c.av.expr, {c.f, c.key}, dict(c.av.ranks())[c.f], False)):
            for a in accesses(expr):
                if ranks <= index_symbols(a) and a.tensor != c.qk.name and types[a.tensor].dtype.is_float:
                    g = _group_of(int(ext), key_group if key else None, c.av.name)
                    if a.tensor in out and out[a.tensor][0] != g:
                        raise PassError("quantize_kv", f"attention {c.av.name!r}: {a.tensor} is read as keys and "
                                                       f"values, in groups of {g} and {out[a.tensor][0]}")
                    out.setdefault(a.tensor, (g, set()))[1].add(stmt.name)
    return out


def _group_of(D: int, key_group: int | None, attention: str) -> int:
    """The quantization group along a head of D channels: the head, or `key_group` (dividing D)."""
    if key_group is None or key_group == D:
        return D
    if D % key_group:
        raise PassError("quantize_kv", f"attention {attention!r}: key_group={key_group} does not divide the head "
                                       f"dim {D}")
    return key_group


def _stats(src: str, t: TensorType, D: int, bits: int, taken: set, loc=None,
           sdtype: dt.DType = dt.f16) -> tuple[list, str, str, str]:
    """The per-(token, group) statements over `src` (groups of D channels along its last dim: a head, or a
    key group): (statements, scale, zero, codes) names; scale and zero in `sdtype` (f16 when a cache stores
    them)."""
    shape = tuple(t.shape)
    L = sympy.sympify(shape[-1])
    if (L % D) != 0:
        raise PassError("quantize_kv", f"{src}'s last dimension {L} is not a multiple of the group {D}")
    lead = [ix.rank(f"x{d}") for d in range(len(shape) - 1)]
    h, e, l_ = ix.rank("h"), ix.rank("e"), ix.rank("l")
    gshape = shape[:-1] + (L // D,)
    names = [fresh_name(taken, f"{src}_{x}") for x in ("kmax", "kmin", "ks", "kz", "kq")]
    kmax, kmin, ks, kz, kq = names
    elem = cast(Access(src, tuple(lead) + (h * D + e,)), dt.f32)
    levels = float(2 ** bits - 1)
    gi = tuple(lead) + (h,)
    grp = tuple(lead) + (ix.FloorDiv(l_, D),)
    stmts = [
        Statement(kmax, TensorType(dt.f32, gshape), gi, elem, Reduce("max", ((e, D),)), loc=loc),
        Statement(kmin, TensorType(dt.f32, gshape), gi, elem, Reduce("min", ((e, D),)), loc=loc),
        Statement(ks, TensorType(sdtype, gshape), gi,
                  _as(call("div", call("max", call("sub", Access(kmax, gi), Access(kmin, gi)), 1e-05), levels), sdtype),
                  loc=loc),
        Statement(kz, TensorType(sdtype, gshape), gi, _as(Access(kmin, gi), sdtype), loc=loc),
        Statement(kq, TensorType(dt.u8, shape), tuple(lead) + (l_,), cast(clamp(call("round", call(
            "div", call("sub", cast(Access(src, tuple(lead) + (l_,)), dt.f32), _f32(Access(kz, grp), sdtype)),
            _f32(Access(ks, grp), sdtype))), 0.0, levels), dt.u8), loc=loc),
    ]
    return stmts, ks, kz, kq


def _as(x: Expr, d: dt.DType) -> Expr:
    """An f32 value `x` as `d`."""
    return x if d == dt.f32 else cast(x, d)


def _f32(x: Expr, d: dt.DType) -> Expr:
    """A `d` value `x` as f32."""
    return x if d == dt.f32 else cast(x, dt.f32)


def _dequant(codes: Expr, scale: Expr, zero: Expr, d: dt.DType) -> Expr:
    return cast(call("add", call("mul", cast(codes, dt.f32), cast(scale, dt.f32)), cast(zero, dt.f32)), d)


class QuantizeKV(Pass):
    """Keys and values quantized asymmetrically per token and head (`bits` 4 or 8; f16 scale and zero); with
    `key_group`, keys per token in groups of that many channels (dividing the head dim; values stay per head).
    In a serving program (states written by cache_kv's Updates) the cache states become the codes (4 bits:
    two a byte) plus scale and zero states, and the attention dequantizes what it reads; in a whole-sequence
    program the attention reads the dequantized codes."""

    name = "quantize_kv"

    def __init__(self, bits: int = 4, key_group: int | None = None):
        if bits not in (4, 8):
            raise ValueError(f"einfuse quantize_kv: bits={bits!r}; use 4 or 8")
        if key_group is not None:
            check_group(key_group)
        self.bits, self.key_group = bits, key_group

    def run(self, m: Module) -> Module:
        if any(isinstance(op, Update) for op in m.body):
            return self._cached(m)
        types = m.types()
        taken = set(types)
        body = list(m.body)
        readers: dict = {}
        for src, (D, users) in _kv_sources(m, self.key_group).items():
            stmts, ks, kz, kq = _stats(src, types[src], D, self.bits, taken, sdtype=dt.f32)
            shape = types[src].shape
            idx = tuple(ix.rank(f"x{d}") for d in range(len(shape)))
            grp = idx[:-1] + (ix.FloorDiv(idx[-1], D),)
            dq = fresh_name(taken, f"{src}_kdq")
            stmts.append(Statement(dq, TensorType(types[src].dtype, shape), idx,
                                   _dequant(Access(kq, idx), Access(ks, grp), Access(kz, grp), types[src].dtype)))
            producer = m.producers().get(src)
            at = body.index(producer) + 1 if producer is not None else 0
            body[at:at] = stmts
            for u in users:
                readers.setdefault(u, {})[src] = dq
        return m.replace(body=tuple(op.rename_reads(readers[op.name]) if isinstance(op, Statement)
                                    and op.name in readers else op for op in body))

    def _cached(self, m: Module) -> Module:
        types = m.types()
        taken = set(types)
        states = {i.name: i for i in m.inputs if i.kind == "state"}
        inputs = [i for i in m.inputs]
        body = list(m.body)
        outputs = list(m.outputs)
        reads = {}  # state version name -> (codes version, scale version, zero version, D, dtype)
        D_of = _head_dims(m, self.key_group)
        for u in [op for op in m.body if isinstance(op, Update) and op.target in states]:
            st = states[u.target]
            src = next(iter(a.tensor for a in accesses(u.expr)))
            if not isinstance(u.expr, Access) or u.expr.tensor != src:
                raise PassError(self.name, f"update {u.name!r} does not copy one tensor into the cache")
            D = D_of.get(u.name)
            if D is None:
                raise PassError(self.name, f"no attention reads the cache {u.target!r}")
            stmts, ks, kz, kq = _stats(src, types[src], D, self.bits, taken, u.loc)
            NB, BS = st.type.shape[:2]
            rest = tuple(st.type.shape[2:])
            L = sympy.sympify(rest[-1])
            per = 2 if self.bits == 4 else 1
            codes = Input(u.target, TensorType(dt.u8, (NB, BS) + rest[:-1] + (L // per,)), "state")
            scale = Input(fresh_name(taken, f"{u.target}_scale"), TensorType(dt.f16, (NB, BS) + rest[:-1] + (L // D,)), "state")
            zero = Input(fresh_name(taken, f"{u.target}_zero"), TensorType(dt.f16, scale.type.shape), "state")
            inputs = [codes if i.name == u.target else i for i in inputs] + [scale, zero]
            last_rank = u.ranks[-1][0]
            src_pos = list(u.expr.indices)
            if src_pos[-1] != last_rank:
                raise PassError(self.name, f"update {u.name!r}: the source's last index is not the cached feature")
            j = ix.rank("j")
            lead_ranks = tuple(u.ranks[:-1])

            def src_at(p, table, lead=tuple(src_pos[:-1])):
                return Access(table, lead + (p,))

            if per == 2:
                value = call("bitor", src_at(2 * j, kq), call("shl", src_at(2 * j + 1, kq), 4))
            else:
                value = src_at(j, kq)
            new_u = u.replace(index=tuple(u.index[:-1]) + (j,), ranks=lead_ranks + ((j, L // per),), expr=value)
            us, zs = fresh_name(taken, f"{scale.name}_1"), fresh_name(taken, f"{zero.name}_1")
            hq = ix.rank("hq")
            ranks_g = lead_ranks + ((hq, L // D),)
            u_s = Update(us, scale.name, tuple(u.index[:-1]) + (hq,), ranks_g, src_at(hq, ks), u.loc)
            u_z = Update(zs, zero.name, tuple(u.index[:-1]) + (hq,), ranks_g, src_at(hq, kz), u.loc)
            at = body.index(u)
            body[at:at + 1] = stmts + [new_u, u_s, u_z]
            outputs += [us, zs]
            reads[u.name] = (us, zs, D, st.type.dtype)
        out = []
        for op in body:
            if isinstance(op, Statement) and reads:
                op = op.replace(expr=rewrite(op.expr, lambda e: _cache_read(e, reads, per)))
            out.append(op)
        return m.replace(inputs=tuple(inputs), body=tuple(out), outputs=tuple(outputs))


def _cache_read(e: Expr, reads: dict, per: int):
    if not (isinstance(e, Access) and e.tensor in reads):
        return None
    us, zs, D, d = reads[e.tensor]
    *lead, p = e.indices
    if isinstance(p, Expr):
        raise PassError("quantize_kv", f"a cache read {e.tensor}[..] gathers its feature index")
    if per == 2:
        byte = Access(e.tensor, tuple(lead) + (ix.FloorDiv(p, 2),))
        codes = call("bitand", call("shr", byte, IndexValue(4 * ix.Mod(p, 2))), 15)
    else:
        codes = e
    grp = tuple(lead) + (ix.FloorDiv(p, D),)
    return _dequant(codes, Access(us, grp), Access(zs, grp), d)


def _cascades(m: Module) -> list:
    from .attention import find

    return find(m)


def _head_dims(m: Module, key_group: int | None = None) -> dict:
    """Cache version name -> the quantization group of the attention reading it (serving programs): the head
    dim, or `key_group` for keys."""
    out = {}
    for c in _cascades(m):
        (_, D), = c.qk.reduce.ranks
        for a in accesses(c.qk.expr):
            out.setdefault(a.tensor, _group_of(int(D), key_group, c.av.name))
        f_ext = dict(c.av.ranks())[c.f]
        for a in accesses(c.av.expr):
            if c.f in index_symbols(a):
                out.setdefault(a.tensor, int(f_ext))
    return out


# ---------------------------------------------------------------- rotate_keys (beyond QServe)

def hadamard_entry(d: sympy.Expr, e: sympy.Expr, D: int) -> sympy.Expr:
    """H[d, e] * sqrt(D) of the Sylvester-Hadamard matrix as index arithmetic: prod over bits b of
    (1 - 2 * d_b * e_b)."""
    v = sympy.Integer(1)
    for b in range(int(math.log2(D))):
        v = v * (1 - 2 * ix.Mod(ix.FloorDiv(d, 2 ** b), 2) * ix.Mod(ix.FloorDiv(e, 2 ** b), 2))
    return v


CENTER_SUFFIXES = ("kc", "kl")  # the params RotateKeys(center=True) derives from a key projection's weight `W`


class RotateKeys(Pass):
    """Each attention's query and key operands rotated by the normalized Hadamard matrix of the head dim
    (`x_rot[.., e] = sum[d:D] x[.., d] * H[d, e]`, H a table statement): the scores are unchanged (H is
    orthogonal), and the keys a cache stores are rotated, their outlier channels spread over the head
    (QuaRot). The head dim must be a power of two.

    With `center=True` the rotated keys are also centred and smoothed: `k' = (k_rot - mu) / lam` and
    `q' = q_rot * lam` (a query head uses its KV head's lam), mu and lam per (KV head, channel) as new params
    `W_kc`, `W_kl` of `W`, the weight of the key projection the keys come from (found by walking the key
    operand's producers back, through RoPE and the GQA repeat, to the contraction reading a weight param;
    einfuse.quant.calibrate registers `weight_kc`, `weight_kl` on it). q'.k' = q.k - q.mu: the same shift for
    every key of a query, so the softmax is unchanged."""

    name = "rotate_keys"

    def __init__(self, center: bool = False):
        self.center = bool(center)

    def run(self, m: Module) -> Module:
        from .attention import find

        types = m.types()
        taken = set(types)
        body = list(m.body)
        tables = {}
        derived: dict = {}  # key projection weight -> (mu input, lam input)
        new_inputs = []
        for c in find(m):
            (e, D), = c.qk.reduce.ranks
            D = int(D)
            if D & (D - 1):
                raise PassError(self.name, f"attention {c.av.name!r}: head dim {D} is not a power of two")
            if D not in tables:
                name = fresh_name(taken, f"hadamard_{D}")
                d1, d2 = ix.rank("d"), ix.rank("e")
                tables[D] = name
                body.insert(0, Statement(name, TensorType(dt.f32, (D, D)), (d1, d2),
                                         call("mul", cast(IndexValue(hadamard_entry(d1, d2, D)), dt.f32),
                                              1.0 / math.sqrt(D))))
            plan = self._center_plan(m, c, types, D, derived, new_inputs, taken) if self.center else None
            mapping = {}
            for a in accesses(c.qk.expr):
                if a.tensor in mapping or e not in index_symbols(a) or a.indices[-1] != e:
                    continue
                src = a.tensor
                t = types[src]
                idx = tuple(ix.rank(f"x{d}") for d in range(t.rank))
                r = ix.rank("r")
                if sympy.sympify(t.shape[-1]) != D:
                    raise PassError(self.name, f"attention {c.av.name!r}: {src} is not read with the head dim last")
                rot = fresh_name(taken, f"{src}_rot")
                expr = call("mul", cast(Access(src, idx[:-1] + (r,)), dt.f32), Access(tables[D], (r, idx[-1])))
                st = Statement(rot, t, idx, expr, Reduce("sum", ((r, D),)), loc=c.qk.loc)
                at = body.index(c.qk)
                body.insert(at, st)
                mapping[src] = rot
                if plan is not None and src in plan:
                    mu, lam, head_of = plan[src]
                    v = cast(Access(rot, idx), dt.f32) if t.dtype != dt.f32 else Access(rot, idx)
                    h = head_of(idx)
                    lam_at = Access(lam, (h, idx[-1]))
                    if mu is not None:  # the key
                        v = call("div", call("sub", v, Access(mu, (h, idx[-1]))), lam_at)
                        suffix = "c"
                    else:  # the query
                        v = call("mul", v, lam_at)
                        suffix = "s"
                    out = fresh_name(taken, f"{src}_{suffix}")
                    body.insert(at + 1, Statement(out, t, idx, v if t.dtype == dt.f32 else cast(v, t.dtype),
                                                  loc=c.qk.loc))
                    mapping[src] = out
            at = body.index(c.qk)
            body[at] = c.qk.rename_reads(mapping)
        return m.replace(inputs=tuple(m.inputs) + tuple(new_inputs), body=tuple(body))

    def _center_plan(self, m: Module, c, types: dict, D: int, derived: dict, new_inputs: list, taken: set) -> dict:
        """{query tensor: (None, lam, head), key tensor: (mu, lam, head)} for attention `c`: head(idx) the KV
        head (an index expression) of the element idx of that tensor."""
        (e, _), = c.qk.reduce.ranks
        kpos = c.qk.index[-1]
        ops = [a for a in accesses(c.qk.expr) if a.indices and a.indices[-1] == e]
        keys = [a for a in ops if kpos in index_symbols(a)]
        queries = [a for a in ops if kpos not in index_symbols(a)]
        if len(keys) != 1 or len(queries) != 1 or keys[0].tensor == queries[0].tensor:
            raise PassError(self.name, f"einfuse: attention {c.av.name!r}: no single query and key operand in "
                                       f"{c.qk.name!r} to centre the keys of")
        key, query = keys[0], queries[0]
        weight = self._key_weight(m, key.tensor, c, types)
        W = types[weight]
        rows = sympy.sympify(W.shape[0])
        if not rows.is_Integer or int(rows) % D:
            raise PassError(self.name, f"einfuse: attention {c.av.name!r}: the key projection {weight} has {rows} rows, "
                                       f"not a multiple of the head dim {D}")
        kvh = int(rows) // D
        if weight not in derived:
            pair = []
            for suffix in CENTER_SUFFIXES:
                name = f"{weight}_{suffix}"
                if name in taken:
                    raise PassError(self.name, f"{name!r} already exists; rename the model's tensor")
                taken.add(name)
                new_inputs.append(Input(name, TensorType(dt.f32, (kvh, D)), next(
                    i.kind for i in m.inputs if i.name == weight)))
                pair.append(name)
            derived[weight] = tuple(pair)
        mu, lam = derived[weight]
        if kvh == 1:
            return {key.tensor: (mu, lam, lambda idx: sympy.Integer(0)),
                    query.tensor: (None, lam, lambda idx: sympy.Integer(0))}
        # the KV head: the key's index that reads a query-side rank (the head, e.g. h // 3) over KV-head many rows
        qranks = {x for x in query.indices if isinstance(x, sympy.Symbol)} - {e}
        kshape = types[key.tensor].shape
        cands = [p for p, x in enumerate(key.indices[:-1]) if not isinstance(x, Expr)
                 and sympy.sympify(kshape[p]) == kvh and kpos not in sympy.sympify(x).free_symbols
                 and sympy.sympify(x).free_symbols and sympy.sympify(x).free_symbols <= qranks]
        plain = [p for p in cands if not isinstance(key.indices[p], sympy.Symbol)]
        pick = plain or cands
        if len(pick) != 1 and len(cands):
            pick = pick[-1:]  # [batch, heads, tokens, dim]: the heads follow the batch
        if not pick:
            raise PassError(self.name, f"einfuse: attention {c.av.name!r}: no index of the keys {key.tensor} reads the KV "
                                       f"head ({kvh} heads) in {c.qk.name!r}")
        pk = pick[0]
        hexpr = sympy.sympify(key.indices[pk])
        qpos = {}
        for s_ in hexpr.free_symbols:
            at = [p for p, x in enumerate(query.indices) if x == s_]
            if not at:
                raise PassError(self.name, f"einfuse: attention {c.av.name!r}: the KV head {hexpr} is not read from the "
                                           f"query {query.tensor}'s own indices")
            qpos[s_] = at[0]
        return {key.tensor: (mu, lam, lambda idx: idx[pk]),
                query.tensor: (None, lam, lambda idx: hexpr.xreplace({s_: idx[p] for s_, p in qpos.items()}))}

    def _key_weight(self, m: Module, key: str, c, types: dict) -> str:
        """The weight param of the key projection `key` is computed from (the first contraction reading a
        weight on the way back through its producers)."""
        producers = m.producers()
        kinds = {i.name: i.kind for i in m.inputs}
        found, seen, todo = set(), set(), [key]
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            op = producers.get(t)
            if op is None or not isinstance(op, Statement):
                continue
            lin = match_linear(op, types)
            if lin is not None and kinds.get(lin.weight) in ("param", "buffer", "const"):
                found.add(lin.weight)
                continue
            todo += [r for r in op.reads() if r not in kinds]
        if len(found) != 1:
            what = "no contraction reading a weight" if not found else f"several weights ({', '.join(sorted(found))})"
            raise PassError(self.name, f"einfuse: attention {c.av.name!r}: the keys {key} come from {what}; centring the "
                                       "keys needs one key projection (its weight_kc / weight_kl buffers)")
        return found.pop()


__all__ = [
    "WEIGHT_SUFFIXES",
    "Linear",
    "QuantizeActivations",
    "QuantizeKV",
    "QuantizeWeights",
    "RotateInputs",
    "RotateKeys",
    "check_group",
    "hadamard_block",
    "match_linear",
]
