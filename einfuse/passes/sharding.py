"""Sharding by propagation (Mesh-TensorFlow / GSPMD over Einsum ranks): a few tensors are split over the
ranks of a group along one dimension (`Layout`); each statement that reads a split tensor at a position
set by one of its own ranks gets that rank split too (it computes only its part), its output inherits
the split, and a statement whose *reduced* rank is split makes a partial result: an `all_reduce` follows
it. A read that no rank of the statement lines up with gets the whole tensor (`all_gather`); a split
module output is gathered at the end. So the collectives are exactly the ones the split reductions and
the misaligned reads need.

`megatron_plan` infers Megatron-LM's plan for a transformer decoder from its weights' names and the
contractions that read them: column-parallel QKV / gate / up projections (split along their output
features), row-parallel O / down projections (split along the reduced features), a vocabulary-parallel
embedding (a masked local lookup and an all-reduce) and LM head (an all-gather of the logits). Biases of
split projections follow their projection (the first statement to read a parameter may adopt its split).

The module built for one member of the group (`part`) computes that member's share with its slices of
the weights; `Shard.slices` says how to cut each parameter (`slice_tensor`)."""
from __future__ import annotations

import re
from dataclasses import dataclass

import sympy
import torch

from ..ir import collective as coll
from ..ir import index as ix
from ..ir.expr import Access, Call, Const, Expr, IndexValue, accesses, index_difference, rewrite
from ..ir.module import Input, Module, Reduce, Statement, TensorType, Update
from .base import Pass, fresh_name


class ShardingError(ValueError):
    """A sharding that cannot be applied (a dimension that does not divide over the ranks, ...)."""


@dataclass(frozen=True)
class Layout:
    """Dimension `dim` of a tensor split over `parts` members: index e = o*parts*inner + part*inner + i
    (o < outer, i < inner) lives on member `part` at local index o*inner + i. `outer` > 1 is a fused
    projection's split (GPT-2's c_attn: q, k and v each split over the members)."""

    dim: int
    outer: int
    inner: int
    parts: int

    @property
    def local_extent(self) -> int:
        return self.outer * self.inner

    def part_of(self, e):
        return (e // self.inner) % self.parts

    def local_of(self, e):
        return (e // (self.parts * self.inner)) * self.inner + e % self.inner

    def global_of(self, local, part: int):
        """The global index of local index `local` on member `part` (sympy or tensor)."""
        if self.outer == 1:
            return local + part * self.inner
        if isinstance(local, torch.Tensor):
            return (local // self.inner) * self.parts * self.inner + part * self.inner + local % self.inner
        return (ix.FloorDiv(local, self.inner) * self.parts * self.inner + part * self.inner
                + ix.Mod(local, self.inner))

    def gathered_of(self, e):
        """Where global index e sits in an all-gather of the members' local tensors (members in order)."""
        if self.outer == 1:
            return e
        return (ix.Mod(ix.FloorDiv(e, self.inner), self.parts) * self.outer * self.inner
                + ix.FloorDiv(e, self.parts * self.inner) * self.inner + ix.Mod(e, self.inner))


def slice_tensor(t: torch.Tensor, lay: Layout, part: int) -> torch.Tensor:
    """Member `part`'s slice of a full tensor split by `lay`."""
    shaped = t.unflatten(lay.dim, (lay.outer, lay.parts, lay.inner))
    return shaped.select(lay.dim + 1, part).flatten(lay.dim, lay.dim + 1).contiguous()


# ---------------------------------------------------------------- numeric checks of index positions

_MAX_POINTS = 1 << 18


def index_grid(syms: list, extents: dict) -> dict:
    """Values of each symbol over their joint box (every point, or corners and a sample when large)."""
    values = []
    total = 1
    for s in syms:
        total *= extents[s]
    for s in syms:
        n = extents[s]
        if total > _MAX_POINTS and n > 8:
            g = torch.Generator().manual_seed(n)
            v = torch.unique(torch.cat([torch.arange(4), torch.arange(n - 4, n), torch.randint(0, n, (8,), generator=g)]))
        else:
            v = torch.arange(n)
        values.append(v)
    if not syms:
        return {}
    mesh = torch.meshgrid(*values, indexing="ij")
    return {s: m.reshape(-1) for s, m in zip(syms, mesh)}


def eval_index(e, env: dict) -> torch.Tensor:
    e = sympy.sympify(e)
    if e.is_Integer:
        return torch.tensor(int(e))
    if isinstance(e, sympy.Symbol):
        return env[e]
    args = [eval_index(a, env) for a in e.args]
    if isinstance(e, sympy.Add):
        return sum(args[1:], args[0])
    if isinstance(e, sympy.Mul):
        out = args[0]
        for a in args[1:]:
            out = out * a
        return out
    if isinstance(e, ix.FloorDiv):
        return torch.div(args[0], args[1], rounding_mode="floor")
    if isinstance(e, ix.Mod):
        return torch.remainder(args[0], args[1])
    if isinstance(e, sympy.Min):
        return torch.minimum(args[0], args[1])
    if isinstance(e, sympy.Max):
        return torch.maximum(args[0], args[1])
    if isinstance(e, sympy.Pow) and e.args[1].is_Integer:
        return args[0] ** int(e.args[1])
    raise ShardingError(f"cannot evaluate index {e}")


_CMP = {"lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge, "eq": torch.eq, "ne": torch.ne}


def guarded_accesses(e: Expr, guards: tuple = ()):
    """(access, guards) for every access in `e`: the index comparisons of the enclosing where()s, each as
    (lhs - rhs, comparison, whether the access is read where it holds)."""
    if isinstance(e, Call) and e.op == "where":
        d = index_difference(e.args[0])
        cond = (d, e.args[0].op) if d is not None else None
        yield from guarded_accesses(e.args[0], guards)
        yield from guarded_accesses(e.args[1], guards + ((cond, True),) if cond else guards)
        yield from guarded_accesses(e.args[2], guards + ((cond, False),) if cond else guards)
        return
    if isinstance(e, Access):
        yield e, guards
    for c in e.children():
        yield from guarded_accesses(c, guards)


def _guard_mask(guards: tuple, env: dict, shape):
    mask = torch.ones(shape, dtype=torch.bool)
    for (d, op), truth in guards:
        holds = _CMP[op](eval_index(d, env), 0).expand(shape)
        mask &= holds if truth else ~holds
    return mask


def _divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


# ---------------------------------------------------------------- the Megatron plan

COLUMN = re.compile(r"(q_proj|k_proj|v_proj|gate_proj|up_proj|c_attn|c_fc|query|key|value|fc1|w1|w3|dense_h_to_4h)")
ROW = re.compile(r"(o_proj|down_proj|c_proj|dense_4h_to_h|fc2|w2|out_proj|attn_dense|attention_dense)")
VOCAB = re.compile(r"(embed_tokens|wte|lm_head|embed_in|embed_out|word_embeddings)")
FUSED = {"c_attn": 3}  # fused projections: their output features are `outer` equal segments, each split


def _contraction_dims(m: Module, name: str):
    """(reduced dim, output dim) of a 2-d weight in the first contraction reading it, or None."""
    for s in m.statements:
        if s.reduce is None or s.reduce.op != "sum" or name not in s.reads():
            continue
        red = {r for r, _ in s.reduce.ranks}
        for a in accesses(s.expr):
            if a.tensor != name or len(a.indices) != 2:
                continue
            kinds = [p in red if isinstance(p, sympy.Symbol) else None for p in a.indices]
            if sorted(map(str, kinds)) == ["False", "True"]:
                return kinds.index(True), kinds.index(False)
    return None


EXPERTS = re.compile(r"experts")


def expert_plan(m: Module, parts: int) -> dict:
    """{parameter: (0, 1)} for expert parallelism: the stacked experts' weights ([experts, ...]) split by
    expert; each rank runs its experts on every token (the dense form's skipped pairs stay skipped) and an
    all-reduce sums the experts' weighted outputs."""
    return {i.name: (0, 1) for i in m.inputs
            if i.kind == "param" and i.type.rank == 3 and EXPERTS.search(i.name) and i.type.shape[0].is_Integer}


def megatron_plan(m: Module, parts: int) -> dict:
    """{parameter: (dim, outer)} for Megatron-LM tensor parallelism over `parts` ranks, from the weights'
    names (column-parallel QKV/gate/up, row-parallel O/down, vocabulary-parallel embedding and LM head)
    and the contractions reading them (which of a weight's dims is reduced)."""
    plan = {}
    for i in m.inputs:
        if i.kind == "param" and i.type.rank == 3 and EXPERTS.search(i.name):  # stacked experts: split their MLPs
            if "gate_up" in i.name:
                plan[i.name] = (1, 2)
            elif "down" in i.name:
                plan[i.name] = (2, 1)
            continue
        if i.kind != "param" or i.type.rank != 2 or not i.name.endswith("weight"):
            continue
        dims = _contraction_dims(m, i.name)
        if VOCAB.search(i.name):
            dim = dims[1] if dims else 0
            if i.type.shape[dim].is_Integer and int(i.type.shape[dim]) % parts == 0:  # else replicated
                plan[i.name] = (dim, 1)
        elif dims is None:
            continue
        elif ROW.search(i.name):
            plan[i.name] = (dims[0], 1)
        elif COLUMN.search(i.name):
            fused = next((n for k, n in FUSED.items() if k in i.name), 1)
            plan[i.name] = (dims[1], fused)
    return plan


def dense_plan(m: Module, parts: int) -> dict:
    """Megatron's plan for everything but the stacked experts (which expert parallelism splits instead)."""
    return {k: v for k, v in megatron_plan(m, parts).items() if not EXPERTS.search(k)}


PLANS = {"megatron": megatron_plan, "experts": expert_plan, "dense": dense_plan}


# ---------------------------------------------------------------- the pass

class Shard(Pass):
    """Split the module over `ranks` (global process ranks) by `plan` ({tensor: (dim, outer)}) and keep
    member `part`'s share; `plan=None` (or "megatron") infers Megatron's plan, "experts" splits the experts, "dense" is
    Megatron's plan without the experts (tensor parallelism beside expert parallelism). After `run`, `slices` maps each split
    parameter to its Layout and `gathers` lists the misaligned reads that needed an all-gather."""

    name = "shard"

    def __init__(self, ranks, part: int, plan: dict | str | None = None, vocab_parallel: bool = True,
                 keep_whole: tuple = ()):
        self.ranks = tuple(ranks)
        self.part = part
        self.plan = plan
        self.vocab_parallel = vocab_parallel
        self.keep_whole = tuple(keep_whole)  # split inputs bound whole (each part reads its own range of them)
        self.slices: dict = {}
        self.gathers: list = []
        self.created: dict = {}  # name -> the collective this pass made for it
        self.dependent: set = set()  # names whose value differs between parts

    def fingerprint(self) -> str:
        plan = sorted(self.plan.items()) if isinstance(self.plan, dict) else self.plan or "megatron"
        return f"shard:{self.ranks}:{self.part}:{plan}:{self.vocab_parallel}:{self.keep_whole}"

    @property
    def parts(self) -> int:
        return len(self.ranks)

    def run(self, m: Module) -> Module:
        return _Sharder(self, m).run()


class _Sharder:
    def __init__(self, p: Shard, m: Module):
        self.p, self.m, self.parts, self.b = p, m, p.parts, p.part
        self.hints = {s: int(v) for s, v in m.size_hints}
        self.types = dict(m.types())
        self.lay: dict = {}
        self.inputs = {i.name: i for i in m.inputs}
        self.names = set(self.types)
        self.read: set = set()
        self.full: dict = {}  # tensor -> name of its whole (gathered) value
        self.body: list = []
        plan = PLANS[p.plan or "megatron"](m, self.parts) \
            if p.plan is None or isinstance(p.plan, str) else p.plan
        if not p.vocab_parallel:
            plan = {k: v for k, v in plan.items() if not VOCAB.search(k)}
        for name, (dim, outer) in plan.items():
            if name not in self.types:
                raise ShardingError(f"einfuse: sharding plan names {name!r}, which the module does not have")
            ext = self._int(self.types[name].shape[dim])
            if ext % (outer * self.parts):
                raise ShardingError(f"einfuse: cannot split {name} (dim {dim} of extent {ext}"
                                    f"{f' in {outer} fused parts' if outer > 1 else ''}) over {self.parts} ranks; "
                                    f"use a number of ranks that divides it")
            self.lay[name] = Layout(dim, outer, ext // (outer * self.parts), self.parts)

    def _int(self, e) -> int:
        v = sympy.sympify(e).xreplace({s: sympy.Integer(h) for s, h in self.hints.items()})
        if not v.is_Integer:
            raise ShardingError(f"einfuse: size {e} has no example value to shard by")
        return int(v)

    def _local_type(self, t: TensorType, lay: Layout) -> TensorType:
        shape = list(t.shape)
        shape[lay.dim] = lay.local_extent
        return TensorType(t.dtype, tuple(shape))

    # ---- whole tensors where a read does not line up
    def whole(self, name: str, loc, out: str | None = None) -> str:
        """The name of `name`'s whole value (an all-gather of the members' parts, reordered for fused splits);
        `out` names it (a module output), else a fresh name."""
        if name not in self.lay or name in self.p.keep_whole:
            return name
        if name in self.full:
            return self.full[name]
        lay = self.lay[name]
        src_t = self.types[name]
        if out is None:
            self.p.gathers.append(name)
            out = fresh_name(self.names, f"{name}_full")
        g = coll.make(out if lay.outer == 1 else fresh_name(self.names, f"{name}_gathered"), "all_gather", name, src_t,
                      self.p.ranks, dim=lay.dim, loc=loc)
        self.body.append(g)
        self.p.created[g.name] = g
        self.types[g.name] = g.type
        if lay.outer > 1:  # members' parts in order -> the tensor's own order
            rs = [ix.rank(f"d{d}") for d in range(src_t.rank)]
            pos = list(rs)
            pos[lay.dim] = lay.gathered_of(rs[lay.dim])
            s = Statement(out, g.type, tuple(rs), Access(g.name, tuple(pos)), loc=loc)
            self.body.append(s)
            self.types[out] = g.type
        self.full[name] = out
        return out

    # ---- a statement
    @staticmethod
    def _symbols(p, guards) -> list:
        syms = set(sympy.sympify(p).free_symbols)
        for (d, _), _ in guards:
            syms |= d.free_symbols
        return sorted(syms, key=str)

    def _candidates(self, p, lay: Layout, ext: dict, exclude, guards=()) -> list:
        """(rank, rank layout) pairs that decide which member holds position p of a split dimension at every
        point the access is read (its where() guards hold)."""
        out = []
        syms = self._symbols(p, guards)
        if not sympy.sympify(p).free_symbols or any(s not in ext for s in syms):
            return out
        env = index_grid(syms, ext)
        shape = env[syms[0]].shape
        e = eval_index(p, env).expand(shape)
        read = _guard_mask(guards, env, shape) & (e >= 0) & (e < lay.outer * lay.parts * lay.inner)
        want = lay.part_of(e)[read]
        for r in syms:
            if r == exclude or ext[r] % self.parts:
                continue
            for outer in _divisors(ext[r] // self.parts):
                rl = Layout(-1, outer, ext[r] // (outer * self.parts), self.parts)
                if torch.equal(rl.part_of(env[r])[read], want):
                    out.append((r, rl))
        return out

    def _local_position(self, p, lay: Layout, r, rl: Layout, ext: dict, guards=()):
        """Position p (over the global rank r) as a local index, over the local rank r: p + c when that is
        exact where the access is read, else the layout's arithmetic."""
        syms = self._symbols(p, guards)
        local_ext = dict(ext)
        local_ext[r] = rl.local_extent
        env = index_grid(syms, local_ext)
        genv = dict(env)
        if r in genv:
            genv[r] = rl.global_of(env[r], self.b)
        shape = env[syms[0]].shape
        ge = eval_index(p, genv).expand(shape)
        read = _guard_mask(guards, genv, shape) & (ge >= 0) & (ge < lay.outer * lay.parts * lay.inner)
        want = lay.local_of(ge)[read]
        got = eval_index(p, env).expand(env[syms[0]].shape)[read]
        c = int(want[0] - got[0]) if want.numel() else 0
        if torch.equal(got + c, want):
            return sympy.sympify(p) + c
        pg = sympy.sympify(p).xreplace({r: rl.global_of(r, self.b)})
        return pg - self.b * lay.inner if lay.outer == 1 else lay.local_of(pg)

    def _choose(self, reads: list, ext: dict, exclude, outs: set):
        """The (rank, layout) lining up the most split reads (ties: an output rank, then a plain block split)."""
        votes: dict = {}
        for a, guards in reads:
            if a.tensor not in self.lay or isinstance(a.indices[self.lay[a.tensor].dim], Expr):
                continue
            for c in self._candidates(a.indices[self.lay[a.tensor].dim], self.lay[a.tensor], ext, exclude, guards):
                votes[c] = votes.get(c, 0) + 1
        return max(votes, key=lambda c: (votes[c], c[0] in outs, -c[1].outer)) if votes else None

    def _adopt(self, accs, r, rl: Layout, kinds=("param", "buffer", "const")) -> None:
        """A weight (or state) first read here, at the split rank itself, is split with it."""
        for a in accs:
            i = self.inputs.get(a.tensor)
            if a.tensor in self.lay or a.tensor in self.read or i is None or i.kind not in kinds:
                continue
            for d, pos in enumerate(a.indices):
                if pos == r:
                    self.lay[a.tensor] = Layout(d, rl.outer, rl.inner, self.parts)
                    break

    def _aligned(self, reads: list, chosen, ext: dict, exclude) -> dict:
        """Access -> its local position on the split dim, for the split reads `chosen` lines up."""
        r, rl = chosen
        sub = {r: rl.global_of(r, self.b)}
        aligned, misaligned = {}, set()
        for a, guards in reads:
            lay = self.lay.get(a.tensor)
            if lay is None or isinstance(a.indices[lay.dim], Expr):
                continue
            pos = a.indices[lay.dim]
            if chosen in self._candidates(pos, lay, ext, exclude, guards):
                local = (sympy.sympify(pos).xreplace(sub) if a.tensor in self.p.keep_whole
                         else self._local_position(pos, lay, r, rl, ext, guards))
                if aligned.get(a, local) != local:
                    misaligned.add(a)
                aligned[a] = local
            else:
                misaligned.add(a)
        for a in misaligned:
            aligned.pop(a, None)
        return aligned

    def _rewriter(self, aligned: dict, sub: dict, accs, loc):
        """A rewrite function: aligned reads at their local positions, misaligned split reads from the whole
        tensor, the split rank's global value wherever else it appears."""
        wholes = {a.tensor: self.whole(a.tensor, loc) for a in accs if a.tensor in self.lay and a not in aligned}

        def visit(n):
            if isinstance(n, Access):
                idx = [p if isinstance(p, Expr) else sympy.sympify(p).xreplace(sub) for p in n.indices]
                if n in aligned:
                    idx[self.lay[n.tensor].dim] = aligned[n]
                    return Access(n.tensor, tuple(idx))
                return Access(wholes.get(n.tensor, n.tensor), tuple(idx))
            if isinstance(n, IndexValue) and sub:
                return IndexValue(sympy.sympify(n.expr).xreplace(sub))
            return None

        return visit

    def statement(self, s: Statement) -> None:
        ext = {r: self._int(e) for r, e in s.ranks().items()}
        it_rank = s.iterate.rank if s.iterate is not None else None
        reads = list(guarded_accesses(s.expr))
        split = [a for a, _ in reads if a.tensor in self.lay]
        chosen = self._choose(reads, ext, it_rank, set(s.index))
        if chosen is not None and s.reduce is not None and chosen[0] in dict(s.reduce.ranks) \
                and s.reduce.op not in coll.REDUCE_OPS:
            chosen = None  # a split reduction combines by sum/max/min only: read whole tensors instead
        if chosen is None and self._vocab_lookup(s, split):
            return
        aligned, sub = {}, {}
        if chosen is not None:
            self._adopt(accesses(s.expr), *chosen)
            aligned = self._aligned(reads, chosen, ext, it_rank)
            sub = {chosen[0]: chosen[1].global_of(chosen[0], self.b)}
        self.read |= s.reads()
        expr = rewrite(s.expr, self._rewriter(aligned, sub, accesses(s.expr), s.loc))
        if chosen is None:
            self._emit(s.replace(expr=expr))
            return
        r, rl = chosen
        shape, out_lay = list(s.type.shape), None
        for d, pos in enumerate(s.index):
            if pos == r:
                shape[d] = rl.local_extent
                out_lay = Layout(d, rl.outer, rl.inner, self.parts)
        reduce, partial = s.reduce, False
        if reduce is not None and r in dict(reduce.ranks):
            reduce = Reduce(reduce.op, tuple((q, rl.local_extent if q == r else n) for q, n in reduce.ranks))
            partial = True
        new = s.replace(expr=expr, reduce=reduce, type=TensorType(s.type.dtype, tuple(shape)))
        if partial:  # each member reduced its part: combine them under the statement's own name
            part = new.replace(name=fresh_name(self.names, f"{s.name}_part"))
            self._emit(part)
            self.p.dependent.add(part.name)
            c = coll.make(s.name, "all_reduce", part.name, part.type, self.p.ranks, op=s.reduce.op, loc=s.loc)
            self.body.append(c)
            self.p.created[s.name] = c
            self.types[s.name] = part.type
        else:
            self._emit(new)
            self.p.dependent.add(s.name)
        if out_lay is not None:
            self.lay[s.name] = out_lay

    def update(self, u: Update) -> None:
        """A write into a state (a KV cache): split like a statement; the state is split along the dim the split
        rank writes (each rank keeps its heads' keys and values)."""
        ext = {r: self._int(n) for r, n in u.ranks}
        parts = [u.expr] + [p for p in u.index if isinstance(p, Expr)]
        reads = [x for e in parts for x in guarded_accesses(e)]
        chosen = self._choose(reads, ext, None, set())
        target_lay = self.lay.get(u.target)
        if chosen is None:
            if target_lay is not None:
                raise ShardingError(f"einfuse: {u.name} writes split state {u.target} from unsplit values")
            visit = self._rewriter({}, {}, [a for a, _ in reads], u.loc)
            self.read |= u.reads()
            self.body.append(u.replace(expr=rewrite(u.expr, visit),
                                       index=tuple(rewrite(p, visit) if isinstance(p, Expr) else p for p in u.index)))
            return
        r, rl = chosen
        if target_lay is None:
            self._adopt([Access(u.target, u.index)], r, rl, kinds=("state",))
            target_lay = self.lay.get(u.target)
        if target_lay is None or u.index[target_lay.dim] != r:
            raise ShardingError(f"einfuse: {u.name} writes {u.target} split by {r}, which no dim of the state follows; "
                                "sharded serving needs the cache split by heads")
        aligned = self._aligned(reads, chosen, ext, None)
        sub = {r: rl.global_of(r, self.b)}
        visit = self._rewriter(aligned, sub, [a for a, _ in reads], u.loc)
        index = [rewrite(p, visit) if isinstance(p, Expr) else sympy.sympify(p).xreplace(sub) for p in u.index]
        index[target_lay.dim] = r
        self.read |= u.reads()
        self.body.append(u.replace(expr=rewrite(u.expr, visit), index=tuple(index),
                                   ranks=tuple((q, rl.local_extent if q == r else n) for q, n in u.ranks)))
        self.lay[u.name] = target_lay
        self.types[u.name] = self._local_type(self.types[u.target], target_lay) if u.target in self.inputs \
            else self.types[u.target]
        self.p.dependent.add(u.name)

    def _vocab_lookup(self, s: Statement, split: list) -> bool:
        """`emb[...] = w[ids[...], k]` with w split along the looked-up dim: each member looks up the ids in
        its range (zero elsewhere) and an all-reduce sums the members' rows (vocabulary-parallel embedding)."""
        if s.reduce is not None or s.iterate is not None or not isinstance(s.expr, Access) or len(split) != 1:
            return False
        a, lay = s.expr, self.lay[s.expr.tensor]
        pos = a.indices[lay.dim]
        if not isinstance(pos, Expr) or lay.outer != 1:
            return False
        lo = self.b * lay.inner
        local = Call("sub", (pos, Const(lo)))
        clamped = Call("min", (Call("max", (local, Const(0))), Const(lay.inner - 1)))
        inside = Call("and", (Call("ge", (local, Const(0))), Call("lt", (local, Const(lay.inner)))))
        idx = list(a.indices)
        idx[lay.dim] = clamped
        zero = Const(0.0) if self.types[a.tensor].dtype.is_float else Const(0)
        expr = Call("where", (inside, Access(a.tensor, tuple(idx)), zero))
        part = s.replace(name=fresh_name(self.names, f"{s.name}_part"), expr=expr)
        self.read |= s.reads()
        self._emit(part)
        self.p.dependent.add(part.name)
        c = coll.make(s.name, "all_reduce", part.name, part.type, self.p.ranks, loc=s.loc)
        self.body.append(c)
        self.p.created[s.name] = c
        return True

    def _emit(self, s: Statement) -> None:
        self.body.append(s)
        self.types[s.name] = s.type

    # ---- the module
    def run(self) -> Module:
        for op in self.m.body:
            if isinstance(op, Statement):
                self.statement(op)
            elif isinstance(op, Update):
                self.update(op)
            elif isinstance(op, coll.Collective) and op.src in self.lay and op.kind in ("all_reduce", "all_gather") \
                    and (op.kind == "all_reduce" or op.dim != self.lay[op.src].dim):
                lay = self.lay[op.src]  # a collective across another dim (or elementwise) runs on each part
                t = coll.out_type(op.kind, self.types[op.src], op.ranks, op.dim)
                self.body.append(op.replace(outputs_typed=((op.name, t),)))
                self.lay[op.name] = lay
                self.types[op.name] = t
                self.p.dependent.add(op.name)
                self.read.add(op.src)
            else:  # an opaque call (or a collective) reads whole tensors
                mapping = {t: self.whole(t, op.loc) for t in sorted(op.reads()) if t in self.lay}
                self.body.append(op.rename_reads(mapping) if mapping else op)
                self.read |= op.reads()
                for n, t in op.outputs_typed:
                    self.types[n] = t
        updated = {op.name for op in self.m.body if isinstance(op, Update)}  # state versions stay split, in place
        renames = {o: fresh_name(self.names, f"{o}_shard") for o in self.m.outputs
                   if o in self.lay and o not in self.inputs and o not in updated}
        if renames:  # a split output: its parts under another name, gathered into the output's name
            self.body = [op.renamed(renames) for op in self.body]
            for o, local in renames.items():
                self.types[local] = self.types.pop(o)
                self.lay[local] = self.lay.pop(o)
                if o in self.p.dependent:
                    self.p.dependent.discard(o)
                    self.p.dependent.add(local)
                self.whole(local, None, out=o)
        inputs = []
        for i in self.m.inputs:
            lay = self.lay.get(i.name)
            if lay is not None and i.name not in self.p.keep_whole:
                self.p.slices[i.name] = lay
                inputs.append(Input(i.name, self._local_type(i.type, lay), i.kind))
            else:
                inputs.append(i)
        return self.m.replace(inputs=tuple(inputs), body=tuple(self.body), kernels=())


