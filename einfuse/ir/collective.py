"""Collectives as IR statements: `all_reduce`, `all_gather`, `reduce_scatter` and `all_to_all` over a
group of ranks, run on a real torch.distributed process group (gloo on CPU, NCCL on GPU).

A collective is an opaque call to one of this module's functions (so fusion, liveness and every backend
treat it as the call it is: it splits kernels and runs through torch), with its own text form

    mm_3_ar: f32[8, 64] = all_reduce(mm_3, op="sum", ranks=[0, 1])
    logits: f32[8, 256] = all_gather(mm_14, dim=1, ranks=[0, 1])

and its own cost: the bytes each rank sends (ring algorithms, the figure NCCL's bus bandwidth uses).
Which process group serves a set of ranks, and how a failure is explained (which rank died), are set by
`einfuse.dist`; without it the whole world's group serves `ranks=[0..world-1]`."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import sympy
import torch

from .module import Opaque, TensorRef, TensorType

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
REDUCE_OPS = ("sum", "max", "min")
_TARGET = "einfuse.ir.collective:"


class CollectiveError(RuntimeError):
    """A collective that failed or timed out; the message names the op and, where known, the dead rank."""


class Collective(Opaque):
    """An opaque call to a collective; its parts read off the call: `kind`, `src`, `op`, `dim`, `ranks`."""

    @property
    def kind(self) -> str:
        return self.target[len(_TARGET):]

    @property
    def src(self) -> str:
        return self.args[0].name

    def _kw(self, key, default=None):
        return dict(self.kwargs).get(key, default)

    @property
    def op(self) -> str:
        return self._kw("op", "sum")

    @property
    def dim(self) -> int:
        return self._kw("dim", 0)

    @property
    def ranks(self) -> tuple:
        return tuple(self._kw("ranks", ()))

    @property
    def name(self) -> str:
        return self.outputs[0]

    @property
    def type(self) -> TensorType:
        return self.outputs_typed[0][1]

    def key(self):
        return ("collective",) + super().key()

    def __eq__(self, other):
        return isinstance(other, Collective) and self.key() == other.key()

    def __hash__(self):
        return hash(self.key())


def is_collective_target(target: str) -> bool:
    return target.startswith(_TARGET) and target[len(_TARGET):] in KINDS


def out_type(kind: str, src: TensorType, ranks: tuple, dim: int = 0) -> TensorType:
    """The result type: all_gather multiplies `dim` by the group size, reduce_scatter divides it."""
    n = len(ranks)
    shape = list(src.shape)
    if kind == "all_gather":
        shape[dim] = shape[dim] * n
    elif kind == "reduce_scatter":
        shape[dim] = sympy.floor(shape[dim] / n) if not (shape[dim] / n).is_Integer else shape[dim] / n
    return TensorType(src.dtype, tuple(shape))


def make(name: str, kind: str, src: str, src_type: TensorType, ranks, op: str = "sum", dim: int = 0,
         loc: str | None = None) -> Collective:
    """A collective statement defining `name` from tensor `src` over the global `ranks`."""
    if kind not in KINDS:
        raise ValueError(f"einfuse: unknown collective {kind!r}; one of {', '.join(KINDS)}")
    ranks = tuple(int(r) for r in ranks)
    kwargs = []
    if kind in ("all_reduce", "reduce_scatter"):
        if op not in REDUCE_OPS:
            raise ValueError(f"einfuse: {kind} reduces with one of {', '.join(REDUCE_OPS)}, not {op!r}")
        kwargs.append(("op", op))
    if kind != "all_reduce":
        kwargs.append(("dim", int(dim)))
    kwargs.append(("ranks", ranks))
    typ = out_type(kind, src_type, ranks, dim)
    return Collective(((name, typ),), _TARGET + kind, (TensorRef(src),), tuple(kwargs), loc)


def as_collective(op: Opaque) -> Opaque:
    """An opaque call to a collective target as a Collective (the parser builds plain calls first)."""
    if isinstance(op, Collective) or not is_collective_target(op.target):
        return op
    return Collective(op.outputs_typed, op.target, op.args, op.kwargs, op.loc)


def check(c: Collective, src_type: TensorType) -> str | None:
    """What is wrong with a collective, given its source's type (None when nothing is)."""
    if len(c.args) != 1 or not isinstance(c.args[0], TensorRef) or len(c.outputs_typed) != 1:
        return f"{c.kind} takes one tensor and defines one"
    if not c.ranks or len(set(c.ranks)) != len(c.ranks):
        return f"{c.kind} needs distinct ranks, got {list(c.ranks)}"
    if c.kind != "all_reduce" and not 0 <= c.dim < src_type.rank:
        return f"{c.kind} over dim {c.dim} of a rank-{src_type.rank} tensor"
    if c.kind in ("reduce_scatter", "all_to_all"):
        ext = src_type.shape[c.dim]
        if not (ext / len(c.ranks)).is_Integer and ext.is_Integer:
            return f"{c.kind}: dim {c.dim} ({ext}) does not divide over {len(c.ranks)} ranks"
    want = out_type(c.kind, src_type, c.ranks, c.dim)
    if want != c.type:
        from .printer import fmt_type

        return (f"{c.kind} of {fmt_type(src_type)} over {len(c.ranks)} ranks is {fmt_type(want)}, "
                f"not {fmt_type(c.type)}")
    return None


def wire_bytes(c: Collective, src: TensorType, sizes: dict | None = None) -> int:
    """Bytes each rank sends over the wire (ring algorithms): all-reduce 2(n-1)/n of the tensor, all-gather
    (n-1) shards, reduce-scatter and all-to-all (n-1)/n of the input."""
    n = len(c.ranks)
    numel = 1
    for d in src.concrete_shape(sizes):
        numel *= d
    b = numel * src.dtype.bits // 8
    if n <= 1:
        return 0
    if c.kind == "all_reduce":
        return 2 * (n - 1) * b // n
    if c.kind == "all_gather":
        return (n - 1) * b
    return (n - 1) * b // n


def module_wire_bytes(m) -> int:
    """Bytes one rank sends over the wire in one call of module `m` (size hints for symbolic sizes)."""
    types, hints = m.types(), {str(s): v for s, v in m.size_hints}
    return sum(wire_bytes(op, types[op.src], hints) for op in m.body if isinstance(op, Collective))


# ---------------------------------------------------------------- running them

@dataclass
class Environment:
    """What einfuse.dist sets: process groups by their global ranks, how a failure is explained, and the
    events a timeline records (None: none recorded)."""

    groups: dict = field(default_factory=dict)
    explain: object = None  # callable(exc, Collective or kind) -> str: names the rank that failed
    events: list | None = None  # (name, kind, start s, issued s, waited s, end s)
    blocked_s: float = 0.0  # time spent waiting for collectives since the last reset
    issued: int = 0  # collectives this process has issued (a heartbeat publishes it: who is behind)


ENV = Environment()


def group_for(ranks: tuple):
    import torch.distributed as dist

    if not dist.is_initialized():
        raise CollectiveError("einfuse: a collective runs without a process group; start the program with torchrun "
                              "(or einfuse run-dist) and compile it with dist=einfuse.Dist(...)")
    g = ENV.groups.get(tuple(ranks))
    if g is not None:
        return g
    if tuple(ranks) == tuple(range(dist.get_world_size())):
        return None  # the default (world) group
    raise CollectiveError(f"einfuse: no process group for ranks {list(ranks)}; einfuse.dist.init makes the groups "
                          "a Dist spec needs")


def _fail(what: str, exc: BaseException) -> CollectiveError:
    why = ENV.explain(exc, what) if ENV.explain is not None else None
    return CollectiveError(f"einfuse: {what} failed: {why or exc}")


_RED = {"sum": "SUM", "max": "MAX", "min": "MIN"}


class Pending:
    """A collective in flight (`async_op=True`); `wait()` returns its result tensor."""

    def __init__(self, what: str, kind: str, work, finish):
        self.what, self.kind, self.work, self.finish = what, kind, work, finish
        self.t_start = time.perf_counter()

    def wait(self) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            self.work.wait()
        except Exception as exc:
            raise _fail(self.what, exc) from exc
        t1 = time.perf_counter()
        ENV.blocked_s += t1 - t0
        if ENV.events is not None:
            ENV.events.append((self.what, self.kind, self.t_start, t0, t1))
        return self.finish()


def start(kind: str, x: torch.Tensor, ranks, op: str = "sum", dim: int = 0, what: str | None = None) -> Pending:
    """Issue a collective asynchronously on the group of `ranks`."""
    import torch.distributed as dist

    what = what or kind
    ranks = tuple(ranks)
    n = len(ranks)
    ENV.issued += 1
    g = group_for(ranks)
    x = x.contiguous()
    try:
        if kind == "all_reduce":
            buf = x.clone()
            work = dist.all_reduce(buf, op=getattr(dist.ReduceOp, _RED[op]), group=g, async_op=True)
            return Pending(what, kind, work, lambda: buf)
        if kind == "all_gather":
            parts = [torch.empty_like(x) for _ in range(n)]
            work = dist.all_gather(parts, x, group=g, async_op=True)
            return Pending(what, kind, work, lambda: torch.cat(parts, dim))
        if kind == "reduce_scatter":  # gloo has no reduce-scatter: an all-reduce, then this rank's shard
            buf = x.clone()
            work = dist.all_reduce(buf, op=getattr(dist.ReduceOp, _RED[op]), group=g, async_op=True)
            me = ranks.index(dist.get_rank())
            return Pending(what, kind, work, lambda: buf.chunk(n, dim)[me].contiguous())
        if kind == "all_to_all":  # shard i of dim goes to rank i; received shards are concatenated along dim
            ins = [c.contiguous() for c in x.chunk(n, dim)]
            outs = [torch.empty_like(c) for c in ins]
            if dist.get_backend(g) == "gloo":  # gloo has no all_to_all of lists: one send/recv pair per peer
                me = ranks.index(dist.get_rank())
                outs[me].copy_(ins[me])
                ops = []
                for i, r in enumerate(ranks):
                    if i != me:
                        ops.append(dist.P2POp(dist.isend, ins[i], r, g))
                        ops.append(dist.P2POp(dist.irecv, outs[i], r, g))
                works = dist.batch_isend_irecv(ops) if ops else []
                work = _All(works)
            else:
                work = dist.all_to_all(outs, ins, group=g, async_op=True)
            return Pending(what, kind, work, lambda: torch.cat(outs, dim))
    except CollectiveError:
        raise
    except Exception as exc:
        raise _fail(what, exc) from exc
    raise CollectiveError(f"einfuse: unknown collective {kind!r}")


class _All:
    def __init__(self, works):
        self.works = works

    def wait(self):
        for w in self.works:
            w.wait()


# The functions an opaque call names: run synchronously (the reference evaluator, other backends).
def all_reduce(x, op="sum", ranks=()):
    return start("all_reduce", x, ranks, op=op).wait()


def all_gather(x, dim=0, ranks=()):
    return start("all_gather", x, ranks, dim=dim).wait()


def reduce_scatter(x, op="sum", dim=0, ranks=()):
    return start("reduce_scatter", x, ranks, op=op, dim=dim).wait()


def all_to_all(x, dim=0, ranks=()):
    return start("all_to_all", x, ranks, dim=dim).wait()
