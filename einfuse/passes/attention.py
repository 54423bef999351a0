"""FuseMax attention: find the 3-pass softmax-attention cascade however a model wrote it, and rewrite it
into FuseMax's 1-pass cascade over an iterative rank (running max, denominator and numerator).

3-pass (what lowering produces from SDPA, or from matmul -> scale -> mask -> softmax -> matmul):
    qk[.., p, m] = sum[e] Q * K              mx[.., p] = max[m] S(qk)
    ex[.., p, m] = exp(S(qk) - mx)            sm[.., p] = sum[m] ex
    av[.., p, f] = sum[m] ex * V / sm
S is whatever map the model applies to the scores (scale, causal/padding/sliding-window masks, sinks,
ALiBi biases, soft-capping); V's index carries GQA's head sharing. With m = m1*M0 + m0:
    lm[.., p, m1] = max[m0] S                            rm[.., p, m1+1] = max(rm[m1], lm[m1])    init -inf
    sln[.., p, m1, m0] = exp(S - rm[m1+1])               prm[.., p, m1] = exp(rm[m1] - rm[m1+1])
    sld[.., p, m1] = sum[m0] sln                         rd[.., p, m1+1] = prm*rd[m1] + sld         init 0
    slnv[.., p, m1, f] = sum[m0] sln * V                 rnv[.., p, f, m1+1] = prm*rnv[m1] + slnv   init 0
    av[.., p, f] = rnv[M1] / rd[M1]
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import sympy

from ..ir import index as ix
from ..ir.contraction import contraction, flat_identity
from ..ir.expr import (Access, Call, Const, Expr, IndexValue, accesses, index_symbols, map_indices, rewrite,
                       substitute, walk)
from ..ir.module import Iterate, Kernel, Module, Reduce, Statement, TensorType
from ..ir.ops import infer
from ..kinds.attention import CHUNK_ROLES, STEP_ROLES, key_tile, supported
from .base import Pass, fresh_name
from .cascade import is_map, monomial, passes_over, read_through
from .instruments import register_dump_note

NEG_INF = Const(-math.inf)


@dataclass
class Cascade:
    """A matched 3-pass attention, described in the ranks of its output statement `av`."""

    qk: Statement
    mx: Statement
    sm: Statement
    av: Statement
    ex: Statement | None  # the exp statement, when lowering left it as one
    key: sympy.Symbol  # av's reduced rank (the key axis)
    lead: list  # av's ranks shared by scores and values (batch, heads)
    p: sympy.Symbol  # av's query rank
    f: sympy.Symbol  # av's value-feature rank
    score: Expr  # S, reading qk, in av's ranks
    value: Expr  # V, in av's ranks
    safe: bool  # an all-masked query gives 0 (torch's SDPA) rather than NaN

    @property
    def statements(self) -> list[str]:
        return [s.name for s in (self.qk, self.mx, self.ex, self.sm, self.av) if s is not None]

    def key_ranks(self) -> dict:
        """Each statement's ranks along the key axis, for `passes_over`."""
        out = {self.qk.name: {self.qk.index[-1]}, self.mx.name: {r for r, _ in self.mx.reduce.ranks},
               self.sm.name: {r for r, _ in self.sm.reduce.ranks}, self.av.name: {self.key}}
        if self.ex is not None:
            out[self.ex.name] = {p for p in self.ex.index[-1:]}
        return out


def _is_contraction(s) -> bool:
    return isinstance(s, Statement) and s.reduce is not None and s.reduce.op == "sum" and s.iterate is None


def _reads(e: Expr, name: str) -> list[Access]:
    return [a for a in accesses(e) if a.tensor == name]


def _in_ranks_of(s: Statement, access: Access, inner: dict) -> Expr:
    """`s`'s expression as seen from `access` (its output ranks replaced by the access positions)."""
    return substitute(s.expr, {**dict(zip(s.index, access.indices)), **inner})


def _unsafe(e: Expr) -> tuple[Expr, bool]:
    """where(x == -inf, 0, x) -> (x, True); anything else -> (e, False)."""
    if (isinstance(e, Call) and e.op == "where" and isinstance(e.args[0], Call) and e.args[0].op == "eq"
            and e.args[0].args[1] == NEG_INF and e.args[2] == e.args[0].args[0] and e.args[1] == Const(0.0)):
        return e.args[2], True
    return e, False


def _drop_rounding(e: Expr, dtype_of) -> Expr:
    """f32(bf16(x)) -> x for an f32 x: softmax probabilities rounded to the value operand's type before
    the second matmul (transformers' eager bf16 attention) are matched without the rounding, which the
    rewrite drops (it only adds error); the kernel rounds its unnormalized probability tile to V's type
    for the tensor-core dot instead."""

    def visit(n: Expr):
        if (isinstance(n, Call) and n.op == "cast" and isinstance(n.args[0], Call) and n.args[0].op == "cast"
                and n.args[0].attr.is_float and n.args[0].attr.bits < n.attr.bits
                and infer(n.args[0].args[0], dtype_of)[0] == n.attr):
            return _drop_rounding(n.args[0].args[0], dtype_of)
        return None

    return rewrite(e, visit)


def match(m: Module, av: Statement) -> Cascade | None:
    """The cascade ending in `av`, or None."""
    if not _is_contraction(av) or len(av.reduce.ranks) != 1:
        return None
    prod = m.producers()
    key = av.reduce.ranks[0][0]
    types = m.types()
    num, den = monomial(_drop_rounding(read_through(av.expr, prod), lambda t: types[t].dtype))
    if len(den) != 1:
        return None
    g, safe_den = den[0], False
    if isinstance(g, Call) and g.op == "max" and g.args[1] == Const(1.0):
        g, safe_den = g.args[0], True
    if not isinstance(g, Access) or not _is_contraction(prod.get(g.tensor)):
        return None
    sm = prod[g.tensor]
    exps = [f for f in num if isinstance(f, Call) and f.op == "exp"]
    if len(exps) != 1:
        return None
    e = exps[0]
    vfactors = [f for f in num if f is not e]
    arg = e.args[0]
    if not (isinstance(arg, Call) and arg.op == "sub"):
        return None
    score, shift = arg.args
    mx_access, safe_shift = _unsafe(shift)
    if not isinstance(mx_access, Access):
        return None
    mx = prod.get(mx_access.tensor)
    if not (isinstance(mx, Statement) and mx.reduce and mx.reduce.op == "max" and len(mx.reduce.ranks) == 1):
        return None
    dtype_of = lambda t: types[t].dtype  # noqa: E731
    qks = {a.tensor for a in accesses(score)
           if isinstance(prod.get(a.tensor), Statement) and contraction(prod[a.tensor], dtype_of) is not None}
    if len(qks) != 1:
        return None
    qk = prod[qks.pop()]
    # the max and the sum must range over the same scores S
    if read_through(_in_ranks_of(mx, mx_access, {mx.reduce.ranks[0][0]: key}), prod) != score:
        return None
    sm_body = read_through(_in_ranks_of(sm, g, {sm.reduce.ranks[0][0]: key}), prod)
    if sm_body != e:
        return None
    if any(_reads(f, qk.name) or _reads(f, mx.name) or _reads(f, sm.name) for f in vfactors) or not vfactors:
        return None
    value = vfactors[0]
    for f in vfactors[1:]:
        value = Call("mul", (value, f))
    out = [r for r in av.index]
    in_s, in_v = index_symbols(score), index_symbols(value)
    ps = [r for r in out if r in in_s and r not in in_v]
    fs = [r for r in out if r in in_v and r not in in_s]
    if not ps or len(fs) != 1 or key not in in_v or key not in in_s:
        return None
    # rows of the scores that V does not read: the innermost is the query rank; others (the head rank
    # when every head shares one K/V, multi-query attention) index programs like batch ranks
    ps = ps[-1:]
    lead = [r for r in out if r not in ps and r not in fs]
    shared = {a.tensor for a in accesses(av.expr)} & {a.tensor for a in accesses(sm.expr)}
    ex = next((prod[t] for t in shared if is_map(prod.get(t))), None)
    return Cascade(qk, mx, sm, av, ex, key, lead, ps[0], fs[0], score, value, safe_den or safe_shift)


def find(m: Module) -> list[Cascade]:
    """Every 3-pass attention cascade in the module."""
    candidates = _softmax_readers(m)  # cheap: most matmuls read no softmax, and matching inlines maps
    return [c for c in (match(m, s) for s in m.statements if s.name in candidates) if c is not None]


def _softmax_readers(m: Module) -> set:
    """Statements whose expression reads, itself or through map statements (not through a gather), a sum
    of something that computes an `exp` through maps: softmax's denominator. One walk of the module."""
    prod = m.producers()
    exp: dict = {}  # name -> computes an exp, itself or through the maps it reads
    reads_sum: dict = {}  # name -> reads a sum that computes an exp

    def plain(a: Access) -> bool:
        return not any(isinstance(p, Expr) for p in a.indices)

    for s in m.statements:
        nodes = list(walk(s.expr))
        read = [(a, prod.get(a.tensor)) for a in nodes if isinstance(a, Access)]
        exp[s.name] = (any(isinstance(n, Call) and n.op == "exp" for n in nodes)
                       or any(exp.get(a.tensor) and is_map(t) and plain(a) for a, t in read))
        reads_sum[s.name] = any((exp.get(a.tensor) and _is_contraction(t))
                                or (reads_sum.get(a.tensor) and is_map(t) and plain(a)) for a, t in read)
    return {n for n, r in reads_sum.items() if r}


# ---------------------------------------------------------------- the 1-pass rewrite

def _rank(avoid: set, base: str) -> sympy.Symbol:
    name, n = base, 1
    while ix.rank(name) in avoid:
        name, n = f"{base}_{n}", n + 1
    return ix.rank(name)


@dataclass
class OnePass:
    """Names of the statements of a rewritten cascade, in order (the attention kernel group)."""

    qk: str
    lm: str
    rm: str
    sln: str
    prm: str
    sld: str
    rd: str
    slnv: str
    rnv: str
    finals: tuple  # what the kernel writes after the loop: the output, or a chunk's partial results
    m1: sympy.Symbol
    m0: sympy.Symbol
    tile: int

    @property
    def members(self) -> list[str]:
        return [self.qk, self.lm, self.rm, self.sln, self.prm, self.sld, self.rd, self.slnv, self.rnv, *self.finals]

    @property
    def roles(self) -> list[str]:
        """The attention kind's role of each member: the steps, then `out` (or a key chunk's partial
        max, denominator and numerator in split-KV decode)."""
        finals = ["out"] if len(self.finals) == 1 else list(CHUNK_ROLES)
        return list(STEP_ROLES) + finals

    @property
    def av(self) -> str:
        return self.finals[-1]


def _cdiv(n, d: int):
    return sympy.Integer(-(-int(n) // d)) if sympy.sympify(n).is_Integer else ix.FloorDiv(n + d - 1, d)


def rewrite_one_pass(m: Module, c: Cascade, tile: int = 64, chunk: int | None = None) -> tuple[Module, OnePass]:
    """Replace the cascade's max/exp/sum/normalize statements by FuseMax's 1-pass cascade. With `chunk`
    (decode: one query, a long key axis) the keys split into chunks c run in parallel, each ending in
    partial (max, denominator, numerator), and a combine step merges the chunks."""
    ext = c.av.ranks()
    n = sympy.sympify(ext[c.key])
    tile = min(tile, max(16, 1 << max(0, (int(n) - 1).bit_length()))) if n.is_Integer else tile
    used = set(ext) | {c.key}
    m1, m0, cr = _rank(used, "m1"), _rank(used, "m0"), _rank(used, "c")
    m1n = sympy.Integer(chunk // tile) if chunk else _cdiv(n, tile)
    kk = (chunk * cr if chunk else 0) + tile * m1 + m0
    ragged = not (n.is_Integer and int(n) % (chunk or tile) == 0)
    types = m.types()
    acc = infer(c.score, lambda t: types[t].dtype)[0]
    # One key: lowering simplified the cascade's indices knowing the key rank is 0 (`(j + r) // 2` for
    # `j // 2`), so the key is 0 in them, not the tile position (lanes past it are masked off anyway).
    key = sympy.Integer(0) if n == 1 else kk
    S = substitute(c.score, {c.key: key})
    V = substitute(c.value, {c.key: key})

    def valid(e: Expr, other: Expr) -> Expr:
        return Call("where", (Call("lt", (IndexValue(kk), IndexValue(n))), e, other)) if ragged else e

    nchunks = _cdiv(n, chunk) if chunk else None
    lead = list(c.lead) + ([cr] if chunk else []) + [c.p]
    lead_ext = [nchunks if r == cr else ext[r] for r in lead]
    f, fx = c.f, ext[c.f]
    names = {k: fresh_name(set(m.types()), f"{c.av.name}_{k}") for k in ("lm", "rm", "sln", "prm", "sld", "rd", "slnv", "rnv")}

    def at(name, *extra):
        return Access(names[name], tuple(lead) + tuple(extra))

    def typ(*extra):
        return TensorType(acc, tuple(lead_ext) + tuple(extra))

    def isinf(e):
        return Call("eq", (e, NEG_INF))

    zero = Const(0.0)
    loc = c.av.loc
    rm_prev, rm_next = at("rm", m1), at("rm", m1 + 1)
    new = [
        Statement(names["lm"], typ(m1n), tuple(lead) + (m1,), valid(S, NEG_INF),
                  Reduce("max", ((m0, sympy.Integer(tile)),)), loc=loc),
        Statement(names["rm"], typ(m1n + 1), tuple(lead) + (m1 + 1,), Call("max", (rm_prev, at("lm", m1))),
                  iterate=Iterate(m1, m1n, NEG_INF), loc=loc),
        Statement(names["sln"], typ(m1n, tile), tuple(lead) + (m1, m0), Call("where", (
            isinf(rm_next), zero, valid(Call("exp", (Call("sub", (S, rm_next)),)), zero))), loc=loc),
        Statement(names["prm"], typ(m1n), tuple(lead) + (m1,), Call("where", (
            isinf(rm_prev), zero, Call("exp", (Call("sub", (rm_prev, rm_next)),)))), loc=loc),
        Statement(names["sld"], typ(m1n), tuple(lead) + (m1,), at("sln", m1, m0),
                  Reduce("sum", ((m0, sympy.Integer(tile)),)), loc=loc),
        Statement(names["rd"], typ(m1n + 1), tuple(lead) + (m1 + 1,), Call("add", (
            Call("mul", (at("prm", m1), at("rd", m1))), at("sld", m1))), iterate=Iterate(m1, m1n, Const(0.0)), loc=loc),
        Statement(names["slnv"], typ(m1n, fx), tuple(lead) + (m1, f), Call("mul", (
            at("sln", m1, m0), valid(V, zero))), Reduce("sum", ((m0, sympy.Integer(tile)),)), loc=loc),
        Statement(names["rnv"], typ(fx, m1n + 1), tuple(lead) + (f, m1 + 1), Call("add", (
            Call("mul", (at("prm", m1), at("rnv", f, m1))), at("slnv", m1, f))),
            iterate=Iterate(m1, m1n, Const(0.0)), loc=loc),
    ]
    def finish(num: Expr, den: Expr) -> Statement:
        out = Call("div", (num, Call("max", (den, Const(1.0))) if c.safe else den))
        if c.av.type.dtype != acc:
            out = Call("cast", (out,), c.av.type.dtype)
        return Statement(c.av.name, c.av.type, c.av.index, out, loc=c.av.loc)

    if not chunk:
        finals = [finish(at("rnv", f, m1n), at("rd", m1n))]
        combine = []
    else:
        finals, combine = _combine(m, c, names, at, typ, lead, cr, nchunks, m1n, acc, finish)
    body = []
    for op in m.body:
        if op is c.av:
            body += new + finals + combine
        else:
            body.append(op)
    one = OnePass(c.qk.name, names["lm"], names["rm"], names["sln"], names["prm"], names["sld"], names["rd"],
                  names["slnv"], names["rnv"], tuple(s.name for s in finals), m1, m0, tile)
    return m.replace(body=tuple(body)), one


def _combine(m: Module, c: Cascade, names, at, typ, lead, cr, nchunks, m1n, acc, finish):
    """Split-KV: each chunk's final (max, denominator, numerator), and the statements merging them:
    M = max_c m_c,  w_c = exp(m_c - M),  out = sum_c w_c n_c / sum_c w_c d_c."""
    f = c.f
    fx = c.av.ranks()[f]
    part = {k: fresh_name(set(m.types()), f"{c.av.name}_{k}") for k in ("cmax", "cden", "cnum", "gmax", "den", "num")}
    finals = [
        Statement(part["cmax"], typ(), tuple(lead), at("rm", m1n), loc=c.av.loc),
        Statement(part["cden"], typ(), tuple(lead), at("rd", m1n), loc=c.av.loc),
        Statement(part["cnum"], typ(fx), tuple(lead) + (f,), at("rnv", f, m1n), loc=c.av.loc),
    ]
    rows = [r for r in lead if r != cr]
    row_ext = [x for r, x in zip(lead, typ().shape) if r != cr]
    red = ((cr, nchunks),)

    def chunk(name, *extra):
        return Access(part[name], tuple(lead) + tuple(extra))

    gmax = Access(part["gmax"], tuple(rows))
    weight = Call("where", (Call("eq", (chunk("cmax"), NEG_INF)), Const(0.0),
                            Call("exp", (Call("sub", (chunk("cmax"), gmax)),))))
    combine = [
        Statement(part["gmax"], TensorType(acc, tuple(row_ext)), tuple(rows), chunk("cmax"), Reduce("max", red),
                  loc=c.av.loc),
        Statement(part["den"], TensorType(acc, tuple(row_ext)), tuple(rows), Call("mul", (weight, chunk("cden"))),
                  Reduce("sum", red), loc=c.av.loc),
        Statement(part["num"], TensorType(acc, tuple(row_ext) + (fx,)), tuple(rows) + (f,),
                  Call("mul", (weight, chunk("cnum", f))), Reduce("sum", red), loc=c.av.loc),
        finish(Access(part["num"], tuple(rows) + (f,)), Access(part["den"], tuple(rows))),
    ]
    return finals, combine


def one_pass_key_ranks(m: Module, one: OnePass) -> dict:
    """Key-axis ranks of a rewritten cascade's statements, for `passes_over` (it comes out 1)."""
    prod = m.producers()
    k = {one.m1, one.m0}
    out = {one.qk: {prod[one.qk].index[-1]}}
    out.update({n: k for n in one.members[1:9]})
    out.update({n: set() for n in one.finals})
    return out


def report(m: Module) -> list[tuple[str, int]]:
    """(output statement, FuseMax pass count over the key axis) for every attention cascade."""
    rows = [(c.av.name, passes_over(m, c.key_ranks())) for c in find(m)]
    for g in getattr(m, "kernels", ()):
        if g.kind == "attention":
            one = one_pass_from_group(m, g)
            rows.append((one.av, passes_over(m, one_pass_key_ranks(m, one))))
    return rows


@register_dump_note
def pass_counts(m: Module) -> list[str]:
    """Dump header lines: how many passes each attention makes over its key rank (3, then 1 after fusion)."""
    return [f"attention {name!r}: {n} pass{'es' if n != 1 else ''} over the key rank" for name, n in report(m)]


def one_pass_from_group(m: Module, g) -> OnePass:
    """The statements of an attention kernel group, by the roles its `kernel` line names."""
    prod = m.producers()
    rm, lm = prod[g.member("rm")], prod[g.member("lm")]
    finals = g.with_role("out") or [g.member(r) for r in CHUNK_ROLES]
    return OnePass(*(g.member(r) for r in STEP_ROLES), tuple(finals), rm.iterate.rank, lm.reduce.ranks[0][0],
                   int(lm.reduce.ranks[0][1]))


def _needed_elsewhere(m: Module, c: Cascade) -> bool:
    """Is a value of the cascade (scores, max, sum, exp, or a map between them such as a scale, a mask
    add or softmax's division) read by anything but the cascade itself? Maps that only feed the
    cascade are dead once it is rewritten (the rewrite reads through them)."""
    inner = set(c.statements)
    users = m.users()
    frontier = [c.qk.name, c.mx.name, c.sm.name] + ([c.ex.name] if c.ex else [])
    seen = set(frontier)
    while frontier:
        name = frontier.pop()
        if name in m.outputs:
            return True
        for u in users.get(name, []):
            n = u.outputs[0]
            if n in inner or n in seen:
                continue
            if not is_map(u):
                return True
            seen.add(n)
            frontier.append(n)
    return False


def _into_copy(m: Module, c: Cascade) -> Module | None:
    """When the cascade's result is only copied into another layout (matmul's reshape back to
    [batch, heads, queries, features], a module output), compute it there directly: the copy becomes
    the contraction (its ranks in the copy's), so the attention kernel writes the output itself."""
    users = m.users().get(c.av.name, [])
    if c.av.name in m.outputs or len(users) != 1 or not is_map(users[0]):
        return None
    cp: Statement = users[0]
    a = cp.expr
    if not isinstance(a, Access) or a.tensor != c.av.name or cp.type.dtype != c.av.type.dtype:
        return None
    if not flat_identity(m.types(), a, cp):
        return None
    taken = set(cp.ranks()) | set(c.av.ranks())
    red = {r: _rank(taken, f"{r}") if r in cp.ranks() else r for r, _ in c.av.reduce.ranks}
    rng = {r: (sympy.Integer(0), sympy.sympify(n) - 1) for r, n in cp.ranks().items()}
    expr = substitute(c.av.expr, {**dict(zip(c.av.index, a.indices)), **red})
    expr = map_indices(expr, lambda p: ix.simplify(p, rng))
    new = Statement(cp.name, cp.type, cp.index, expr, Reduce("sum", tuple((red[r], n) for r, n in c.av.reduce.ranks)),
                    loc=c.av.loc)
    return m.replace(body=tuple(new if op is cp else op for op in m.body if op is not c.av))


class FuseAttention(Pass):
    """Rewrites every 3-pass attention cascade to FuseMax's 1-pass form (`tile` keys per step)."""

    name = "fuse_attention"

    def __init__(self, tile: int | None = None, decode_chunk: int = 256):
        self.tile = tile  # keys per step; None: the attention kind's choice for the operand type (key_tile)
        self.decode_chunk = decode_chunk  # keys per program when a single query meets a long key axis

    def run(self, m: Module) -> Module:
        for c in find(m):
            if _needed_elsewhere(m, c):
                continue  # a cascade value is used elsewhere: it must be materialized, leave the cascade
            moved = _into_copy(m, c)
            if moved is not None:
                c2 = match(moved, moved.producers()[m.users()[c.av.name][0].outputs[0]])
                if c2 is not None:
                    m, c = moved, c2
            types = m.types()
            scores = contraction(c.qk, lambda t: types[t].dtype)
            if scores is None or not supported(scores.operand):
                continue  # the attention kernel takes no such scores: the cascade stays as it is
            tile = self.tile or key_tile(scores.operand)
            ext = c.av.ranks()
            keys, queries = sympy.sympify(ext[c.key]), sympy.sympify(ext[c.p])
            split = queries == 1 and keys.is_Integer and int(keys) >= 2 * self.decode_chunk
            m, one = rewrite_one_pass(m, c, tile, self.decode_chunk if split else None)
            group = Kernel(f"attn_{one.av}", "attention", tuple(one.members), (("tile", one.tile),), tuple(one.roles))
            m = m.replace(kernels=m.kernels + (group,))
        return m
