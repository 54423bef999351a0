"""The verifier: shapes, dtypes, names and index ranges of a module, each error naming its statement."""
from __future__ import annotations

import sympy

from . import index as ix
from .collective import Collective
from .collective import check as check_collective
from .expr import Access, Call, Expr, IndexValue, index_difference, index_symbols, walk
from .module import INPUT_KINDS, Module, Opaque, Statement, Update, iter_refs
from .ops import MAP_OPS, REDUCE_OPS, TypeRuleError, infer
from .printer import fmt_op


class VerifyError(ValueError):
    """A module that breaks an IR rule; the message names the statement, its line and its text."""


def _fail(m: Module, n: int, op, msg: str):
    line = 2 + len(m.sizes) + len(m.inputs) + n
    name = ", ".join(op.outputs)
    text = fmt_op(op)
    raise VerifyError(f"{name!r} (line {line}): {msg}\n    {text}")


def _narrow(cond: Expr, ranges: dict, truth: bool) -> dict:
    """Ranges refined by knowing `cond` is `truth`, for conditions `rank <op> bound`."""
    if isinstance(cond, Call) and cond.op == "and" and truth:
        return _narrow(cond.args[1], _narrow(cond.args[0], ranges, True), True)
    diff = index_difference(cond)
    if diff is None or cond.op in ("eq", "ne"):
        return ranges
    syms = [s for s in diff.free_symbols if s in ranges]
    linear = len(syms) == 1 and diff.is_polynomial(syms[0]) and sympy.degree(diff, syms[0]) == 1
    if syms and not linear:  # over several ranks, or through // and % (`i % 32 < 16`): a guard fact
        return _guard(diff, ranges, cond.op if truth else {"lt": "ge", "le": "gt", "gt": "le", "ge": "lt"}[cond.op])
    if not linear:
        return ranges
    s = syms[0]
    coef = diff.coeff(s)
    if coef not in (1, -1):
        return ranges
    rest = diff - coef * s  # cond: coef*s + rest <op> 0
    op = cond.op if truth else {"lt": "ge", "le": "gt", "gt": "le", "ge": "lt"}[cond.op]
    if coef == -1:
        op = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}[op]
    bound = -rest if coef == 1 else rest  # s <op> bound
    return {**ranges, s: _tighten(ranges[s], op, bound)}


def _tighten(lo_hi: tuple, op: str, bound) -> tuple:
    """Inclusive bounds (lo, hi) of a value known to satisfy `value <op> bound`."""
    lo, hi = lo_hi
    if op == "lt":
        return lo, sympy.Min(hi, bound - 1)
    if op == "le":
        return lo, sympy.Min(hi, bound)
    if op == "gt":
        return sympy.Max(lo, bound + 1), hi
    return sympy.Max(lo, bound), hi


def _guard(diff, ranges: dict, op: str) -> dict:
    """A condition over several ranks (`64*m1 + m0 < S`), or over one through `//` and `%` (`i % 32 < 16`),
    bounds that whole expression: kept as a fact that bounds an index differing from it by terms of
    known range (see `_guarded`)."""
    ranks = [t for t in sympy.Add.make_args(diff) if t.free_symbols & set(k for k in ranges if not isinstance(k, tuple))]
    a = sympy.Add(*ranks)
    bound = -(diff - a)  # cond: a <op> bound
    return {**ranges, ("guard", a): _tighten(ranges.get(("guard", a), (-sympy.oo, sympy.oo)), op, bound)}


def _guarded(p, lo, hi, ranges: dict):
    """Bounds of index `p` tightened by guard facts: p = a + d with a guarded gives a's bounds plus d's."""
    plain = {k: v for k, v in ranges.items() if not isinstance(k, tuple)}
    for key, (glo, ghi) in ranges.items():
        if isinstance(key, tuple) and key[0] == "guard":
            d = sympy.expand(sympy.sympify(p) - key[1])
            dlo, dhi = ix.bounds(d, plain)
            lo, hi = sympy.Max(lo, glo + dlo), sympy.Min(hi, ghi + dhi)
    return lo, hi


def _dead(ranges: dict) -> bool:
    """Guards narrowed some rank to an empty range: this branch of a where() never runs."""
    return any(ix.proven(lo > hi) for lo, hi in ranges.values())


class _Checker:
    def __init__(self, m: Module, since: Module | None = None):
        self.m = m
        # statements of an already verified module with the same sizes: one that is still there (the same
        # object) and reads tensors of the same types as there verifies the same, so it is not checked again
        self.since = {id(op): op for op in since.body} if since is not None and since.sizes == m.sizes else {}
        self.since_types = since.types() if self.since else {}
        self.superseded: set = set()  # state versions an update has replaced
        self.state_versions = {i.name for i in m.inputs if i.kind == "state"}
        self.types = {}
        for i in m.inputs:
            self.types[i.name] = i.type

    def dtype_of(self, name):
        return self.types[name].dtype

    def run(self):
        m = self.m
        names = set()
        for i in m.inputs:
            if i.name in names:
                raise VerifyError(f"input {i.name!r} is declared twice")
            if i.kind not in INPUT_KINDS:
                raise VerifyError(f"input {i.name!r} has unknown kind {i.kind!r}")
            names.add(i.name)
            try:
                self._shape(i.type.shape, f"input {i.name!r}")
            except _Problem as p:
                raise VerifyError(str(p)) from None
        for n, op in enumerate(m.body):
            for d, out in enumerate(op.outputs):
                if out in self.types or out in op.outputs[:d]:
                    _fail(m, n, op, f"{out!r} is already defined")
            try:
                stale = op.reads() & self.superseded
                if stale:
                    raise _Problem(f"reads {sorted(stale)[0]!r} after a newer version of it was written (an update "
                                   "writes in place: read the newest version)")
                if isinstance(op, Statement) and self._known(op):
                    self.types[op.name] = op.type
                elif isinstance(op, Statement):
                    self.statement(op)
                elif isinstance(op, Update):
                    self.update(op)
                else:
                    self.opaque(op)
            except _Problem as p:
                _fail(m, n, op, str(p))
        self.kernels()
        if not m.outputs:
            raise VerifyError("the module has no outputs")
        for o in m.outputs:
            if o not in self.types:
                raise VerifyError(f"output {o!r} is never defined")

    def _known(self, s: Statement) -> bool:
        if self.since.get(id(s)) is not s:
            return False
        return all(self.types.get(r) == self.since_types.get(r) for r in s.reads() - {s.name})

    def kernels(self):
        """Kernel groups name statements, each at most once, in body order."""
        order = {op.name: n for n, op in enumerate(self.m.body) if isinstance(op, Statement)}
        seen: dict = {}
        for k in self.m.kernels:
            for name in k.members:
                if name not in order:
                    raise VerifyError(f"kernel {k.name!r}: {name!r} is not a statement of the module")
                if name in seen:
                    raise VerifyError(f"kernel {k.name!r}: {name!r} is already in kernel {seen[name]!r}")
                seen[name] = k.name
            if [order[n] for n in k.members] != sorted(order[n] for n in k.members):
                raise VerifyError(f"kernel {k.name!r}: members must be listed in body order")

    def _shape(self, shape, what):
        for s in shape:
            bad = {x for x in s.free_symbols if x not in self.m.sizes}
            if bad:
                raise _Problem(f"{what}: shape uses {', '.join(map(str, bad))}, which is not a declared size")

    def opaque(self, o: Opaque):
        for r in iter_refs((o.args, tuple(v for _, v in o.kwargs))):
            if r.name not in self.types:
                raise _Problem(f"reads {r.name!r} before it is defined")
        if isinstance(o, Collective):
            wrong = check_collective(o, self.types[o.src])
            if wrong:
                raise _Problem(wrong)
        for name, t in o.outputs_typed:
            self._shape(t.shape, f"output {name!r}")
            self.types[name] = t

    def statement(self, s: Statement):
        if s.type.dtype.packed:
            raise _Problem("a statement cannot produce a packed dtype; pack with an opaque call")
        self._shape(s.type.shape, "its type")
        if len(s.index) != s.type.rank:
            raise _Problem(f"{len(s.index)} output positions for a rank-{s.type.rank} type")
        syms = [p for p in s.index if isinstance(p, sympy.Symbol)]
        if len(set(syms)) != len(syms):
            raise _Problem("an output rank appears twice")
        ranks = s.ranks()
        if s.iterate is not None:
            self.iterate(s)
        else:
            for p in s.index:
                if not isinstance(p, sympy.Symbol):
                    raise _Problem(f"output position {ix.to_str(p)} must be a rank")
        for r in syms:
            if r in self.m.sizes:
                raise _Problem(f"{r} is a size; it cannot name a rank")
        if s.reduce is not None:
            if s.reduce.op not in REDUCE_OPS:
                raise _Problem(f"unknown reduce operator {s.reduce.op!r}")
            for r, _ in s.reduce.ranks:
                if r in syms:
                    raise _Problem(f"rank {r} is both an output and a reduced rank")
        known = set(ranks) | set(self.m.sizes)
        self.types[s.name] = s.type  # an iterative statement reads itself
        try:
            got = infer(s.expr, self.dtype_of)[0]
        except KeyError as e:
            raise _Problem(f"reads {e.args[0]!r} before it is defined") from None
        except TypeRuleError as e:
            raise _Problem(str(e)) from None
        if got != s.type.dtype and s.reduce is None:  # a reduction converts its accumulator at the end
            raise _Problem(f"the expression is {got} but the statement declares {s.type.dtype}")
        rng = {r: (sympy.Integer(0), sympy.sympify(n) - 1) for r, n in ranks.items()}
        self.expr(s.expr, known, rng, s)

    def update(self, u: Update):
        """Writes into a state (or its newest version) at positions inside it, a value of its dtype, every
        rank of the update used by the index (else several points would write one element). Gathered
        positions (a block table) must be distinct per point: the runtime guarantees it, the text cannot."""
        t = self.types.get(u.target)
        if t is None:
            raise _Problem(f"writes into {u.target!r}, which is not defined")
        if u.target not in self.state_versions:
            raise _Problem(f"writes into {u.target!r}, which is not a state (declare it `state {u.target}: ...`)")
        if len(u.index) != t.rank:
            raise _Problem(f"{u.target} has rank {t.rank} but is written with {len(u.index)} indices")
        ranks = dict(u.ranks)
        known = set(ranks) | set(self.m.sizes)
        for r, n in u.ranks:
            if r in self.m.sizes:
                raise _Problem(f"{r} is a size; it cannot name a rank")
            self._shape((n,), f"the extent of {r}")
        used = set()
        rng = {r: (sympy.Integer(0), sympy.sympify(n) - 1) for r, n in ranks.items()}
        for d, p in enumerate(u.index):
            if isinstance(p, Expr):
                self.expr(p, known, rng, u)
                if not self._is_int(p):
                    raise _Problem(f"index {d} of {u.target} is not an integer expression")
                used |= {x for x in index_symbols(p) if x in ranks}
                continue
            self._symbols(p, known)
            used |= sympy.sympify(p).free_symbols & set(ranks)
            lo, hi = ix.bounds(p, rng)
            if ix.proven(lo < 0) or ix.proven(hi > t.shape[d] - 1):
                raise _Problem(f"writes index {d} of {u.target}, {ix.to_str(p)}, over [{lo}, {hi}] outside "
                               f"[0, {ix.to_str(t.shape[d] - 1)}]")
        unused = set(ranks) - used
        if unused:
            raise _Problem(f"rank(s) {', '.join(sorted(map(str, unused)))} do not appear in the index: several "
                           "points would write one element")
        try:
            got = infer(u.expr, self.dtype_of)[0]
        except KeyError as e:
            raise _Problem(f"reads {e.args[0]!r} before it is defined") from None
        if got != t.dtype:
            raise _Problem(f"writes a {got} value into {u.target}, a {t.dtype} tensor")
        self.expr(u.expr, known, rng, u)
        self.types[u.name] = t
        self.superseded.add(u.target)
        self.state_versions.add(u.name)

    def iterate(self, s: Statement):
        it = s.iterate
        pos = [d for d, p in enumerate(s.index) if not isinstance(p, sympy.Symbol)]
        if len(pos) != 1 or s.index[pos[0]] != it.rank + 1:
            raise _Problem(f"an iterative statement writes exactly one position `{it.rank} + 1`")
        if sympy.simplify(s.type.shape[pos[0]] - (it.extent + 1)) != 0:
            raise _Problem(f"the iterated dimension must have extent {ix.to_str(it.extent + 1)}")
        if s.reduce is not None:
            raise _Problem("an iterative statement cannot also reduce; split the reduction out")
        want = tuple(it.rank if d == pos[0] else p for d, p in enumerate(s.index))
        for a in (n for n in walk(s.expr) if isinstance(n, Access) and n.tensor == s.name):
            if tuple(a.indices) != want:
                raise _Problem(f"reads itself at [{', '.join(map(ix.to_str, a.indices))}], only at the previous step")

    def expr(self, e: Expr, known: set, rng: dict, s: Statement):
        if isinstance(e, IndexValue):
            self._symbols(e.expr, known)
            self._divisors(e.expr, rng)
            return
        if isinstance(e, Access):
            t = self.types.get(e.tensor)
            if t is None:
                raise _Problem(f"reads {e.tensor!r} before it is defined")
            if len(e.indices) != t.rank:
                raise _Problem(f"{e.tensor} has rank {t.rank} but is accessed with {len(e.indices)} indices")
            for d, p in enumerate(e.indices):
                if isinstance(p, Expr):
                    self.expr(p, known, rng, s)  # first: it reports tensors the gather reads before definition
                    if not self._is_int(p):
                        raise _Problem(f"gather index {d} of {e.tensor} is not an integer expression")
                    continue
                self._symbols(p, known)
                self._divisors(p, rng)
                lo, hi = _guarded(p, *ix.bounds(p, rng), rng)
                if not _dead(rng) and (ix.proven(lo < 0) or ix.proven(hi > t.shape[d] - 1)):
                    raise _Problem(
                        f"index {d} of {e.tensor}, {ix.to_str(p)}, ranges over [{lo}, {hi}] "
                        f"outside [0, {ix.to_str(t.shape[d] - 1)}]")
            return
        if isinstance(e, Call):
            op = MAP_OPS.get(e.op)
            if op is None:
                raise _Problem(f"unknown map operator {e.op!r}")
            if len(e.args) != op.arity:
                raise _Problem(f"{e.op} takes {op.arity} arguments, got {len(e.args)}")
            if e.op == "where":
                cond, a, b = e.args
                self.expr(cond, known, rng, s)
                self.expr(a, known, _narrow(cond, rng, True), s)
                self.expr(b, known, _narrow(cond, rng, False), s)
                return
            for a in e.args:
                self.expr(a, known, rng, s)

    def _divisors(self, p, rng: dict):
        """`//` and `%` in index arithmetic are defined for positive divisors only."""
        for node in sympy.sympify(p).atoms(ix.FloorDiv, ix.Mod):
            lo, _ = ix.bounds(node.args[1], rng)
            if ix.proven(lo < 1):
                raise _Problem(f"divisor {ix.to_str(node.args[1])} of {ix.to_str(node)} can be {lo}, not positive")

    def _is_int(self, e: Expr) -> bool:
        return infer(e, self.dtype_of)[0].category == "int"

    def _symbols(self, p, known):
        bad = sympy.sympify(p).free_symbols - known
        if bad:
            raise _Problem(f"uses {', '.join(sorted(map(str, bad)))}, not a rank or size of this statement")


class _Problem(Exception):
    pass


def verify(m: Module, since: Module | None = None) -> Module:
    """Check `m` and return it; raises VerifyError naming the first offending statement. `since`: a module
    verified before (the input of the pass that made `m`): statements the pass kept unchanged, reading
    tensors of unchanged types, are not checked again."""
    _Checker(m, since).run()
    return m
