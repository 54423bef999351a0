"""MoE experts in the torch backend: a pair of `moe` kernel groups (gate/up + SwiGLU, down + combine; see
einfuse.kinds.moe) read back as routed experts. The IR's dense form computes every expert on every token and
masks the pairs the routing weights drop; run that way it costs every expert's GEMMs (4x the routed work for
top-2 of 8). The plan lets the backend run, as transformers' eager experts do, each expert on the rows of the
tokens routed to it and add its output weighted by the gate (`TorchRuntime.moe`). The masked pairs are exactly
the ones the dense form multiplies by 0; like the MoE kernels, an unrouted expert's inf or NaN does not reach
the result. Only f32 chains are planned (a 16-bit chain rounds between its steps as the evaluator does).

Compressed experts (einfuse.passes.compress): when both expert weights of a planned chain are the outputs of
`decode_experts` opaque calls that nothing else reads, the plan records them (`MoEPlan.compressed`, the one
place that decides it) and the routed step computes with the stored arrays — the fused decode-and-multiply
kernel (einfuse.kinds.cdot) on the activated experts (`TorchRunner.moe_compressed`; the Triton backend: `TritonRunner.routed_moe`); the dense decodes
are dead and never run."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..ir import dtypes as dt
from ..ir.expr import Access, Call, Expr
from ..ir.module import Module, Opaque, TensorRef
from ..ir.ops import infer
from ..kinds.moe import Chain, find_chains

DECODE = "einfuse.compress.ir:decode_experts"
COMPRESSED_NOTE = ("the fused decode-and-multiply kernel (cdot) on the activated experts' stored codes; the dense "
                   "decode_experts never runs")
STORED = ("codes", "bases", "scales", "sbase", "dictionary")  # decode_experts' arrays
META = ("shape", "ncodes", "bits", "row_codes")  # its keyword arguments the routed step needs


@dataclass(frozen=True)
class CompressedOperand:
    """An expert weight a `decode_experts` opaque call produces: `decode` (the call's output, dead once the
    chain runs routed), `arrays` (the stored arrays it reads, in `STORED` order), `checksums` (the per-expert
    checksums, or None) and `meta` (shape, ncodes, bits, row_codes)."""

    decode: str
    arrays: tuple
    checksums: str | None
    meta: tuple

    @property
    def reads(self) -> set:
        return set(self.arrays) | ({self.checksums} if self.checksums else set())


def compressed_operand(m: Module, b: Expr, ranks: tuple) -> CompressedOperand | None:
    """The compressed weight behind an expert weight operand `b` — exactly `W[e, n, k]` over the chain's
    ranks, W [E, N, K] the f32 output of a `decode_experts` call read only there — or None."""
    while isinstance(b, Call) and b.op == "cast":
        b = b.args[0]
    if not (isinstance(b, Access) and tuple(b.indices) == tuple(ranks)):
        return None
    op = m.producers().get(b.tensor)
    if not (isinstance(op, Opaque) and op.target == DECODE and len(op.outputs) == 1):
        return None
    kw = dict(op.kwargs)
    if len(op.args) != len(STORED) or not all(isinstance(a, TensorRef) for a in op.args) or any(
            kw.get(k) is None for k in META) or kw.get("dtype", "float32") != "float32":
        return None
    if b.tensor in m.outputs or len(m.users().get(b.tensor, [])) != 1:
        return None
    check = kw.get("checksums")
    return CompressedOperand(b.tensor, tuple(a.name for a in op.args),
                             check.name if isinstance(check, TensorRef) else None,
                             (("shape", tuple(int(x) for x in kw["shape"])),
                              *((k, int(kw[k])) for k in META[1:])))


@dataclass
class MoEPlan:
    """A routed experts chain (`kinds.moe.Chain`): the token-side operand `up.a` over (t, h), the experts'
    gate/up weights `up.b` over (e, n, h), the routing weights `chain.gate` over (t, e), the down weights
    `down.b` over (e, h, i); the combine statement receives the result. `name`: its down/combine group."""

    chain: Chain
    name: str
    skipped: set = field(default_factory=set)  # the chain's statements the routed step computes
    compressed: tuple | None = None  # (gate/up, down) CompressedOperand when both weights are stored coded

    @property
    def members(self) -> set:
        return {s.name for s in self.chain.statements}

    def self_contained(self, m: Module) -> bool:
        """No value of the chain but the combine's is an output or read outside the chain: a routed step
        computing only the combine stands for all of it."""
        users = m.users()
        inner = self.members - {self.chain.comb.name}
        return not any(n in m.outputs or any(u.outputs[0] not in self.members for u in users.get(n, []))
                       for n in inner)


def moe_plans(m: Module) -> list:
    """Every chain the module runs as a pair of `moe` kernel groups, f32 throughout, whose gate/up projection
    skips the pairs its combine weighs by 0 (a chain that is not one runs statement by statement)."""
    group, types = m.group_of(), m.types()
    dtype_of = lambda t: types[t].dtype  # noqa: E731
    plans = []
    for c in find_chains(m):
        up, down = group.get(c.act.name), group.get(c.comb.name)
        if not (up is not None and down is not None and up.kind == down.kind == "moe"
                and tuple(up.members) == (c.up.stmt.name, c.act.name)
                and tuple(down.members) == (c.down.stmt.name, c.comb.name) and c.gated_by_combine()):
            continue
        if any(s.type.dtype != dt.f32 for s in c.statements) or any(
                infer(e, dtype_of)[0] != dt.f32 for e in (c.up.a, c.up.b, c.down.b, c.gate)):
            continue
        cu = compressed_operand(m, c.up.b, (c.up.e, c.up.n, c.up.h))
        cd = compressed_operand(m, c.down.b, (c.down.e, c.down.h, c.down.i))
        plans.append(MoEPlan(c, down.name, compressed=(cu, cd) if cu and cd else None))
    return plans
