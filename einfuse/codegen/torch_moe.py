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
from ..ir.expr import Call, Expr, substitute
from ..ir.module import Kernel, Module, Statement
from ..ir.ops import infer
from ..kinds.moe import DownForm, UpForm, act_form, combine_form, combine_gate, find_down, up_form


@dataclass
class MoEPlan:
    """A routed experts chain: the token-side operand `up.a` over (t, h), the experts' gate/up weights
    `up.b` over (e, n, h), the routing weights `gate` over (up.t, up.e), the down weights `down.b` over
    (e, h, i); the combine statement receives the result."""

    up: UpForm
    act: Statement
    down: DownForm
    comb: Statement
    gate: Expr
    name: str
    skipped: set = field(default_factory=set)  # the chain's statements the routed step computes

    @property
    def members(self) -> set:
        return {self.up.stmt.name, self.act.name, self.down.stmt.name, self.comb.name}


def _strip(e):
    while isinstance(e, Call) and e.op == "cast":
        e = e.args[0]
    return e


def plan_moe(m: Module, up_group: Kernel, down_group: Kernel) -> MoEPlan | None:
    """The pair as a routed chain, or None (its statements then run one by one)."""
    prod = m.producers()
    up_stmt, act = (prod.get(n) for n in up_group.members)
    down_stmt, comb = (prod.get(n) for n in down_group.members)
    if not all(isinstance(s, Statement) for s in (up_stmt, act, down_stmt, comb)):
        return None
    up, down = up_form(up_stmt), find_down(down_stmt)
    if up is None or up.gate is None or down is None or act_form(act, up) is None:
        return None
    if down.stmt.name != down_stmt.name or _strip(down.a).tensor != act.name:
        return None
    expr = combine_form(comb, down)
    if expr is None:
        return None
    gate = substitute(combine_gate(expr, down), {down.t: up.t, down.e: up.e})
    if _strip(gate) != _strip(up.gate):  # the routing weights the up projection skips on are the combine's
        return None
    types = m.types()
    dtype_of = lambda t: types[t].dtype  # noqa: E731
    if any(s.type.dtype != dt.f32 for s in (up_stmt, act, down_stmt, comb)) or any(
            infer(e, dtype_of)[0] != dt.f32 for e in (up.a, up.b, down.b, gate)):
        return None
    return MoEPlan(up, act, down, comb, gate, down_group.name)


def moe_plans(m: Module) -> list:
    """Every routed chain of the module's `moe` kernel pairs."""
    ups = {g.members[1]: g for g in m.kernels if g.kind == "moe" and tuple(g.roles) == ("gate_up", "act")}
    plans = []
    prod = m.producers()
    for g in m.kernels:
        if g.kind != "moe" or tuple(g.roles) != ("down", "combine"):
            continue
        down = find_down(prod.get(g.members[0]))
        act = _strip(down.a).tensor if down is not None and hasattr(_strip(down.a), "tensor") else None
        if act in ups:
            plan = plan_moe(m, ups[act], g)
            if plan is not None:
                plans.append(plan)
    return plans
