"""A model of one rank's program on a real cluster (8xH100 over NVLink): CPU gloo timings say nothing about
NVLink, so each kernel gets its roofline time from the IR's FLOPs and bytes and each collective the time
of a ring algorithm (latency + bytes on the wire / bus bandwidth), and a two-stream simulation (kernels in
program order on one stream, collectives in order on another, each starting when its inputs exist) gives
the exposed communication: the time the program is longer than its kernels alone. A model, labelled as
such, never a timing."""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from ..ir import collective as coll
from ..ir.cost import statement_flops
from ..ir.module import Module, Statement


@dataclass(frozen=True)
class Cluster:
    """Figures of the modelled machine (public H100 SXM specs; NVLink bus bandwidth as NCCL achieves it)."""

    name: str = "8xH100 SXM, NVLink 4 (model)"
    hbm_bytes_s: float = 3.35e12  # HBM3 bandwidth
    flops_s: float = 989e12  # bf16 dense tensor-core peak
    link_bytes_s: float = 360e9  # all-reduce bus bandwidth NCCL reaches on NVLink 4 (of 450 GB/s per direction)
    latency_s: float = 8e-6  # per collective (ring setup and synchronization)
    launch_s: float = 2e-6  # per kernel
    elem_bytes: int = 2  # bf16 serving: the f32 IR's tensors counted at 2 bytes per element


H100x8 = Cluster()


def _numel(t, hints) -> int:
    v = sympy.sympify(t.numel()).xreplace(hints)
    return int(v)


@dataclass
class Unit:
    """One kernel (a fusion group or a lone statement) or one collective of the schedule."""

    name: str
    kind: str  # "kernel" | "collective"
    reads: set
    writes: set
    seconds: float
    flops: int = 0
    bytes: int = 0


def units(m: Module, c: Cluster = H100x8, routed_share: float = 1.0) -> list:
    """The program as kernels and collectives in order, each with its modelled time: a kernel moves the
    tensors its group reads from outside and the ones read after it (weights included) and does the IR's
    FLOPs; its time is the larger of the two over the machine's rates, plus a launch. An MoE kernel's IR
    counts every (token, expert) pair; it does `routed_share` of them (top-k / experts)."""
    hints = {s: sympy.Integer(v) for s, v in m.size_hints}
    types = m.types()
    group = m.group_of()
    users = m.users()
    out: list = []
    done = set()
    for n, op in enumerate(m.body):
        if isinstance(op, coll.Collective):
            wire = coll.wire_bytes(op, types[op.src], {str(k): int(v) for k, v in hints.items()})
            wire = wire * c.elem_bytes // max(1, types[op.src].dtype.bits // 8)
            out.append(Unit(op.name, "collective", {op.src}, {op.name}, c.latency_s + wire / c.link_bytes_s, 0, wire))
            continue
        if not isinstance(op, Statement):
            out.append(Unit(op.outputs[0], "kernel", set(op.reads()), set(op.outputs), c.launch_s))
            continue
        if op.name in done:
            continue
        g = group.get(op.name)
        members = [s for s in m.statements if s.name in set(g.members)] if g is not None else [op]
        names = {s.name for s in members}
        done |= names
        reads = set().union(*(s.reads() for s in members)) - names
        stored = {s.name for s in members if s.name in m.outputs or any(
            u.outputs[0] not in names for u in users.get(s.name, []))}
        nbytes = sum(_numel(types[t], hints) for t in reads | stored) * c.elem_bytes
        flops = sum(statement_flops(s, {str(k): int(v) for k, v in hints.items()}) for s in members)
        if g is not None and g.kind == "moe":
            flops = int(flops * routed_share)
        secs = c.launch_s + max(nbytes / c.hbm_bytes_s, flops / c.flops_s)
        out.append(Unit(g.name if g is not None else op.name, "kernel", reads, stored, secs, flops, nbytes))
    return out


def simulate(m: Module, c: Cluster = H100x8, routed_share: float = 1.0) -> dict:
    """Kernels run in order on the compute stream, collectives in order on the communication stream, each
    when its inputs are ready. Returns seconds: kernels, collectives, the makespan and the exposed
    communication (makespan - kernels)."""
    ready: dict = {}
    compute_free = comm_free = 0.0
    kernels = comms = 0.0
    by: dict = {}  # collective -> the time kernels waited for it
    made_by: dict = {}  # tensor -> the collective that made it
    for u in units(m, c, routed_share):
        start = max([ready.get(r, 0.0) for r in u.reads] or [0.0])
        if u.kind == "collective":
            start = max(start, comm_free)
            comm_free = end = start + u.seconds
            comms += u.seconds
            for w in u.writes:
                made_by[w] = u.name
        else:
            if start > compute_free:  # waiting: charged to the collective whose result came last
                last = max((r for r in u.reads if r in made_by), key=lambda r: ready.get(r, 0.0), default=None)
                if last is not None:
                    by[made_by[last]] = by.get(made_by[last], 0.0) + start - compute_free
            start = max(start, compute_free)
            compute_free = end = start + u.seconds
            kernels += u.seconds
        for w in u.writes:
            ready[w] = end
    makespan = max(compute_free, comm_free)
    if comm_free > compute_free:  # the program ends waiting for its last collective
        by["(end)"] = comm_free - compute_free
    return {"kernels_s": kernels, "collectives_s": comms, "makespan_s": makespan, "exposed_s": makespan - kernels,
            "exposed_by": by}
