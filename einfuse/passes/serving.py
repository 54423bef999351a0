"""Serving from a paged KV cache, derived from one capture of a decoder's forward pass.

`CacheKV` finds every attention cascade (what `fuse_attention` recognizes), the tensors its keys and
values are read from, and the positions that feed the model (its `position_ids` input), and rewrites the
module so that it serves from a paged cache:

- each key and value source gets a *state*, `<source>_cache: dtype[NB, BS, ...]` — blocks of BS token
  slots, holding per token the slice of the source that token produced (a rotated key row, a value row);
- an Update writes the new tokens' slices into their slots, `pos[b, t]` of the block that
  `block_table[b, pos[b, t] // BS]` names — straight from the source, no step copies the cache;
- the cascade is rebuilt over the cache: keys 0 .. NBT*BS - 1 read through the block table, the
  model's mask re-expressed in absolute positions (a key is visible to a query at position P when it is
  at most P, its block is live — a table entry of -1 is an evicted block — and it is inside the model's
  window when it has one).

Sizes: B sequences of T new tokens (symbolic, from the capture), NBT block-table columns, NB blocks.
The same module is a prefill program (B = 1, T tokens of one prompt, after a cached prefix of any
length) and a decode program (T = 1, B sequences): `Specialize` fixes one size and the pipeline then
optimizes each program for its shape.

The capture must pass `position_ids` (positions of consecutive tokens: a model computes RoPE and its
masks from them). Mask conditions are rewritten by what they say about positions: the query's own index
becomes its absolute position `pos[b, p]`, a key's position is its slot; a condition on other tensors (a
packed-sequence check) holds for one sequence of consecutive positions and is dropped —
`einfuse.api.compile_cached` runs the derived programs against the model before handing them out.
"""
from __future__ import annotations

import math

import sympy
from ..ir import dtypes as dt
from ..ir import index as ix
from ..ir.contraction import contraction
from ..ir.expr import Access, Call, Const, Expr, IndexValue, accesses, index_symbols, rewrite, substitute
from ..ir.module import Input, Iterate, Module, Reduce, Statement, TensorType, Update
from .attention import Cascade, find
from .base import Pass, PassError, fresh_name

NEG_INF = Const(-math.inf)
POSITIONS, TABLE = "position_ids", "block_table"


class CacheKV(Pass):
    """Rewrites every attention to read its keys and values from a paged cache it writes (see the module
    docstring); `block_size` tokens per block."""

    name = "cache_kv"

    def __init__(self, block_size: int = 16):
        self.block_size = block_size

    def run(self, m: Module) -> Module:
        cascades = find(m)
        if not cascades:
            return m
        pos = next((i for i in m.inputs if i.name == POSITIONS), None)
        if pos is None or pos.type.rank != 2:
            raise PassError(self.name, f"a cached program needs the model's `{POSITIONS}` input [batch, tokens]; "
                                       f"capture the forward with position_ids=... (einfuse.LLM does)")
        B, T = pos.type.shape
        nbt, nb = ix.size("NBT"), ix.size("NB")
        m = m.replace(sizes=m.sizes + tuple(s for s in (nbt, nb) if s not in m.sizes),
                      inputs=m.inputs + (Input(TABLE, TensorType(dt.i32, (B, nbt))),),
                      size_hints=m.size_hints + ((nbt, 4), (nb, 16)))
        original = m
        for c in cascades:
            m = _cache_one(m, match_again(m, c), B, T, nbt, nb, self.block_size, original)
        return m


def match_again(m: Module, c: Cascade) -> Cascade:
    """The cascade of `c`'s output in `m` (earlier rewrites changed the module, not this cascade)."""
    from .attention import match

    again = match(m, m.producers()[c.av.name])
    if again is None:
        raise PassError("cache_kv", f"attention {c.av.name!r} no longer matches")
    return again


class _Rewrite:
    """Replaces, in an expression over a cascade's ranks, the one tensor its token axis is read from by
    the cache, and writes the new tokens into that cache."""

    def __init__(self, m: Module, expr: Expr, key, batch, label: str):
        reads = [a for a in accesses(expr) if key in _syms(a)]
        names = {a.tensor for a in reads}
        if len(names) != 1:
            raise PassError("cache_kv", f"{label}: the keys are read from {sorted(names) or 'nothing'}; "
                                        "one tensor expected")
        self.source = names.pop()
        src = m.types()[self.source]
        a = reads[0]
        if any(r.indices != a.indices for r in reads):
            raise PassError("cache_kv", f"{label}: {self.source} is read at different token positions")
        self.token, self.batch_only, self.rest = [], [], []
        for d, p in enumerate(a.indices):
            syms = _syms_of(p)
            if key in syms:
                if syms - {key, batch} or isinstance(p, Expr):
                    raise PassError("cache_kv", f"{label}: {self.source}'s token index {ix.to_str(p)} is not "
                                                "a function of the sequence and the key alone")
                self.token.append(d)
            elif batch in syms:
                if syms != {batch} or p != batch:
                    raise PassError("cache_kv", f"{label}: {self.source}'s index {d} mixes the sequence with "
                                                "other ranks")
                self.batch_only.append(d)
            else:
                self.rest.append(d)
        self.access, self.key, self.batch, self.type = a, key, batch, src
        self.cache = fresh_name(set(m.types()), f"{self.source}_cache")
        self.version = fresh_name(set(m.types()), f"{self.source}_cache_1")

    def state(self, nb, bs: int) -> Input:
        shape = (nb, bs) + tuple(self.type.shape[d] for d in self.rest)
        return Input(self.cache, TensorType(self.type.dtype, shape), "state")

    def update(self, B, T, bs: int, loc) -> Update:
        """The new tokens' slices into their slots."""
        b, t = ix.rank("b"), ix.rank("t")
        rest = [ix.rank(f"x{d}") for d in self.rest]
        p = Access(POSITIONS, (b, t))
        index = [Access(TABLE, (b, Call("floordiv", (p, Const(bs))))), Call("mod", (p, Const(bs)))] + rest
        pos = list(self.access.indices)
        for d in self.token:
            pos[d] = sympy.sympify(pos[d]).xreplace({self.key: t, self.batch: b})
        for d in self.batch_only:
            pos[d] = b
        for d, r in zip(self.rest, rest):
            pos[d] = r
        ranks = [(b, B), (t, T)] + [(r, self.type.shape[d]) for d, r in zip(self.rest, rest)]
        return Update(self.version, self.cache, tuple(index), tuple(ranks), Access(self.source, tuple(pos)), loc)

    def read(self, expr: Expr, bs: int) -> Expr:
        """`expr` with the source read from the cache: slot `key` of the block the table names."""
        block = Access(TABLE, (self.batch, ix.FloorDiv(self.key, bs)))

        def visit(n: Expr):
            if isinstance(n, Access) and n.tensor == self.source:
                return Access(self.version, (block, ix.Mod(self.key, bs)) + tuple(n.indices[d] for d in self.rest))
            return None

        return rewrite(expr, visit)


def _cache_one(m: Module, c: Cascade, B, T, nbt, nb, bs: int, original: Module) -> Module:
    types = m.types()
    dtype_of = lambda n: types[n].dtype  # noqa: E731
    qk = contraction(c.qk, dtype_of)
    if qk is None or len(c.qk.index) != len(c.qk.type.shape):
        raise PassError("cache_kv", f"attention {c.av.name!r}: its scores are not a contraction")
    key_qk = c.qk.index[-1]
    lead_qk = list(c.qk.index[:-2])
    batch_av = next((r for r in c.lead if sympy.simplify(c.av.ranks()[r] - B) == 0), None)
    if batch_av is None:
        raise PassError("cache_kv", f"attention {c.av.name!r}: no rank of it runs over the batch")
    batch_qk = lead_qk[c.lead.index(batch_av)]
    k_side = qk.b if c.qk.index[-2] not in index_symbols(qk.b) else qk.a
    q_side = qk.a if k_side is qk.b else qk.b
    keys = _Rewrite(m, k_side, key_qk, batch_qk, f"attention {c.av.name!r} keys")
    value = _value_read(m, c)
    values = _Rewrite(m, value, c.key, batch_av, f"attention {c.av.name!r} values")
    S = nbt * bs
    # the scores over the cache: qk'[.., p, key] = sum[e] Q * K(cache)
    qk_name = fresh_name(set(m.types()), f"{c.av.name}_cqk")
    expr = Call("mul", (q_side, keys.read(k_side, bs)))
    for op, y in qk.post:
        expr = Call(op, (expr, y))
    red = Reduce("sum", tuple((r, c.qk.ranks()[r]) for r in qk.k))
    qk_t = TensorType(c.qk.type.dtype, tuple(c.qk.type.shape[:-1]) + (S,))
    new_qk = Statement(qk_name, qk_t, c.qk.index, expr, red, loc=c.qk.loc)
    score = _cached_score(original, c, qk_name, batch_av, bs)
    new = _cascade(c, new_qk, score, values.read(value, bs), S)
    m = m.replace(inputs=m.inputs + (keys.state(nb, bs), values.state(nb, bs)),
                  outputs=m.outputs + (keys.version, values.version))
    writes = {keys.source: keys.update(B, T, bs, c.qk.loc), values.source: values.update(B, T, bs, c.av.loc)}
    body = []
    for op in m.body:
        if op is c.av:
            body += new
            continue
        body.append(op)
        for o in op.outputs:
            if o in writes:
                body.append(writes.pop(o))
    if writes:
        raise PassError("cache_kv", f"attention {c.av.name!r}: {sorted(writes)} are not computed by the module")
    return m.replace(body=tuple(body))


def _value_read(m: Module, c: Cascade) -> Expr:
    """The values as the cascade reads them through maps (`c.value`); when that reads several tensors along
    the keys (a quantized projection's epilogue: integer accumulator times per-token scales), the one tensor
    the attention reads directly."""
    if len({a.tensor for a in accesses(c.value) if c.key in _syms(a)}) <= 1:
        return c.value
    direct = [a for a in accesses(c.av.expr) if {c.key, c.f} <= _syms(a)]
    return direct[0] if len(direct) == 1 else c.value


def _cascade(c: Cascade, qk: Statement, score: Expr, value: Expr, S) -> list:
    """The 3-pass softmax cascade over the cache's keys, in the form lowering gives SDPA (so
    fuse_attention rewrites it to one pass), named after `c`'s output."""
    base = c.av.name
    ranks = list(c.av.index)
    key, f = c.key, c.f
    rows = [r for r in ranks if r != f]
    ext = c.av.ranks()
    acc = c.qk.type.dtype
    mx = Statement(f"{base}_cmax", TensorType(acc, tuple(ext[r] for r in rows)), tuple(rows), score,
                   Reduce("max", ((key, S),)), loc=c.av.loc)
    shift = Access(mx.name, tuple(rows))
    ex = Call("exp", (Call("sub", (score, Call("where", (Call("eq", (shift, NEG_INF)), Const(0.0), shift)))),))
    sm = Statement(f"{base}_csum", TensorType(acc, tuple(ext[r] for r in rows)), tuple(rows), ex,
                   Reduce("sum", ((key, S),)), loc=c.av.loc)
    den = Call("max", (Access(sm.name, tuple(rows)), Const(1.0)))
    out = Call("div", (Call("mul", (ex, value)), den))
    if c.av.type.dtype != acc:
        out = Call("cast", (out,), c.av.type.dtype)
    av = Statement(c.av.name, c.av.type, c.av.index, out, Reduce("sum", ((key, S),)), loc=c.av.loc)
    return [qk, mx, sm, av]


def _cached_score(m: Module, c: Cascade, qk_name: str, batch, bs: int) -> Expr:
    """The score map over the cache: the model's map without its masks, under the mask re-expressed in
    absolute positions (a cached key's position is its slot)."""
    score = substitute(c.score, {})
    inner, conds = _strip_masks(score)
    qk_reads = [a for a in accesses(inner) if a.tensor == c.qk.name]
    if not qk_reads:
        raise PassError("cache_kv", f"attention {c.av.name!r}: the score map does not read the scores")
    inner = rewrite(inner, lambda n: Access(qk_name, n.indices) if isinstance(n, Access) and n.tensor == c.qk.name
                    else None)
    query_pos = Access(POSITIONS, (batch, c.p))
    kept = []
    for cond in (part for cond in conds for part in _conjuncts(cond)):
        absolute = _absolute(cond, c, batch, query_pos)
        if {a.tensor for a in accesses(absolute)} - {POSITIONS}:
            continue  # a packed-sequence check: true for one sequence (compile_cached checks the programs)
        if absolute not in kept:
            kept.append(absolute)
    causal = Call("le", (IndexValue(c.key), query_pos))  # a cache holds the past: later slots are stale
    live = Call("ge", (Access(TABLE, (batch, ix.FloorDiv(c.key, bs))), Const(0)))  # an evicted block is DEAD (-1)
    cond = Call("and", (causal, live))
    for k in kept:
        if k != causal:
            cond = Call("and", (cond, k))
    return Call("where", (cond, inner, NEG_INF))


def _conjuncts(cond: Expr) -> list:
    if isinstance(cond, Call) and cond.op == "and":
        return _conjuncts(cond.args[0]) + _conjuncts(cond.args[1])
    if isinstance(cond, Const) and cond.value is True:
        return []
    return [cond]


def _absolute(cond: Expr, c: Cascade, batch, query_pos: Access) -> Expr:
    """A mask condition in absolute positions: the query's index is its position; a key's position
    (`position_ids[b, key]`) is the key's slot."""
    def visit(n: Expr):
        if isinstance(n, Access) and n.tensor == POSITIONS and n.indices[-1] == c.key:
            return IndexValue(c.key)
        return None

    out = rewrite(cond, visit)
    if c.p in index_symbols(out):  # the query's index as a raw number: its position
        out = rewrite(out, lambda n: _query_position(n, c.p, query_pos))
    return out


def _query_position(n: Expr, p, query_pos: Access):
    if isinstance(n, IndexValue) and p in n.expr.free_symbols:
        rest = sympy.expand(n.expr - p)
        if rest.free_symbols & {p}:
            raise PassError("cache_kv", f"a mask condition uses the query index as {ix.to_str(n.expr)}")
        return Call("add", (query_pos, IndexValue(rest))) if rest != 0 else query_pos
    return None


def _strip_masks(e: Expr) -> tuple[Expr, list]:
    """The score map without its where(c, x, -inf) / where(c, -inf, x) wrappers, and their conditions
    (a masked_fill's negated)."""
    conds = []
    casts = []
    while isinstance(e, Call):
        if e.op == "cast" and e.attr.is_float:
            casts.append(e.attr)
            e = e.args[0]
        elif e.op == "where" and _neg_inf(e.args[2]):
            conds.append(e.args[0])
            e = e.args[1]
        elif e.op == "where" and _neg_inf(e.args[1]):
            conds.append(Call("not", (e.args[0],)))
            e = e.args[2]
        else:
            break
    for d in reversed(casts):
        e = Call("cast", (e,), d)
    return e, conds


def _neg_inf(e) -> bool:
    return e == NEG_INF or (isinstance(e, Call) and e.op == "cast" and _neg_inf(e.args[0]))


def _syms(a: Access) -> set:
    out = set()
    for p in a.indices:
        out |= _syms_of(p)
    return out


def _syms_of(p) -> set:
    """The ranks an index position uses (sizes are constants of the program)."""
    syms = index_symbols(p) if isinstance(p, Expr) else set(sympy.sympify(p).free_symbols)
    return {x for x in syms if not ix.is_size_symbol(x)}


class Specialize(Pass):
    """Fixes symbolic sizes, named by an input's dimension (`{"input_ids": {1: 1}}`: one token per
    sequence, a decode program) or by the size's own name: every shape, extent and index that uses them.
    A module without that input or size is left as it is."""

    name = "specialize"

    def __init__(self, values: dict):
        self.values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}

    def run(self, m: Module) -> Module:
        subs = {}
        by_name = {str(x): x for x in m.sizes}
        inputs = {i.name: i for i in m.inputs}
        for k, v in self.values.items():
            if isinstance(v, dict):
                for d, n in v.items():
                    size = inputs[k].type.shape[d] if k in inputs else None
                    if isinstance(size, sympy.Symbol):
                        subs[size] = sympy.Integer(n)
            elif str(k) in by_name:
                subs[by_name[str(k)]] = sympy.Integer(v)
        return _substitute_sizes(m, subs) if subs else m


def _substitute_sizes(m: Module, subs: dict) -> Module:
    def shape(t: TensorType) -> TensorType:
        return TensorType(t.dtype, tuple(sympy.sympify(n).xreplace(subs) for n in t.shape))

    def expr(e: Expr) -> Expr:
        from ..ir.expr import map_indices

        return map_indices(e, lambda p: ix.evaluated(sympy.sympify(p).xreplace(subs)))

    body = []
    for op in m.body:
        if isinstance(op, Statement):
            red = Reduce(op.reduce.op, tuple((r, sympy.sympify(n).xreplace(subs)) for r, n in op.reduce.ranks)) \
                if op.reduce else None
            it = Iterate(op.iterate.rank, sympy.sympify(op.iterate.extent).xreplace(subs),
                         op.iterate.init) if op.iterate else None
            body.append(op.replace(type=shape(op.type), expr=expr(op.expr), reduce=red, iterate=it,
                                   index=tuple(sympy.sympify(p).xreplace(subs) for p in op.index)))
        elif isinstance(op, Update):
            body.append(op.replace(expr=expr(op.expr), ranks=tuple((r, sympy.sympify(n).xreplace(subs))
                                                                   for r, n in op.ranks),
                                   index=tuple(expr(p) if isinstance(p, Expr) else sympy.sympify(p).xreplace(subs)
                                               for p in op.index)))
        else:
            body.append(op.replace(outputs_typed=tuple((n, shape(t)) for n, t in op.outputs_typed),
                                   args=_sub_args(op.args, subs), kwargs=tuple((k, _sub_args(v, subs))
                                                                               for k, v in op.kwargs)))
    inputs = tuple(Input(i.name, shape(i.type), i.kind) for i in m.inputs)
    sizes = tuple(s for s in m.sizes if s not in subs)
    hints = tuple((s, v) for s, v in m.size_hints if s not in subs)
    return m.replace(inputs=inputs, body=tuple(body), sizes=sizes, size_hints=hints)


def _sub_args(v, subs):
    if isinstance(v, tuple):
        return tuple(_sub_args(x, subs) for x in v)
    if isinstance(v, sympy.Expr):
        return v.xreplace(subs)
    return v
