"""MoE experts in the torch backend: a pair of `moe` kernel groups (gate/up + SwiGLU, down + combine; see
einfuse.kinds.moe) read back as routed experts. The IR's dense form computes every expert on every token and
masks the pairs the routing weights drop; run that way it costs every expert's GEMMs (4x the routed work for
top-2 of 8). The plan lets the backend run, as transformers' eager experts do, each expert on the rows of the
tokens routed to it and add its output weighted by the gate (`TorchRuntime.moe`). The masked pairs are exactly
the ones the dense form multiplies by 0; like the MoE kernels, an unrouted expert's inf or NaN does not reach
the result. Only f32 chains are planned (a 16-bit chain rounds between its steps as the evaluator does)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..ir import dtypes as dt
from ..ir.module import Module
from ..ir.ops import infer
from ..kinds.moe import Chain, find_chains


@dataclass
class MoEPlan:
    """A routed experts chain (`kinds.moe.Chain`): the token-side operand `up.a` over (t, h), the experts'
    gate/up weights `up.b` over (e, n, h), the routing weights `chain.gate` over (t, e), the down weights
    `down.b` over (e, h, i); the combine statement receives the result. `name`: its down/combine group."""

    chain: Chain
    name: str
    skipped: set = field(default_factory=set)  # the chain's statements the routed step computes

    @property
    def members(self) -> set:
        return {s.name for s in self.chain.statements}


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
        plans.append(MoEPlan(c, down.name))
    return plans
