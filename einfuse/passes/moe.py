"""fuse_moe: experts calls become two kernels of the MoE kind (einfuse.kinds.moe).

It finds the chain the kind runs — an expert gate/up projection over every (token, expert) pair, its
SwiGLU, the down projection and the sum over experts weighted by the routing — wherever it comes from:
transformers' experts modules (einfuse.frontend.moe writes it), or a model written in the dense "every
expert on every token" form. The dense form's gate/up projection computes pairs the routing weight then
multiplies by 0; the pass makes it skip them (`where(gw[t, e] != 0, ..., 0)`), which changes nothing the
layer outputs for finite values (an inactive expert's inf or NaN no longer reaches the sum). Groups:
`{gate_up, act}` and `{down, combine}`. A chain whose intermediate values other statements read is left
to the other kinds, with a line in the dump saying why.
"""
from __future__ import annotations

from ..ir.expr import Call, Const
from ..ir.module import Kernel, Module, Statement
from ..kinds.moe import find_chains
from .base import Pass
from .fusion import schedule


class FuseMoE(Pass):
    name = "fuse_moe"

    def __init__(self):
        self.notes: list = []  # chains found but not grouped, and why

    def run(self, m: Module) -> Module:
        self.notes = []
        users, grouped = m.users(), set(m.group_of())
        replaced: dict = {}
        kernels = list(m.kernels)
        for c in find_chains(m, grouped):
            why = self._why_not(users, grouped, c.up.stmt, c.act, c.down.stmt)
            if why:
                self.notes.append(f"experts chain {c.up.stmt.name} -> {c.comb.name} left to other kinds: {why}")
                continue
            up_stmt = c.up.stmt
            if c.up.gate is None:  # the dense form: skip the pairs the combine weighs by 0
                up_stmt = up_stmt.replace(expr=Call("where", (Call("ne", (c.gate, Const(0))), up_stmt.expr, Const(0))))
                replaced[up_stmt.name] = up_stmt
            kernels.append(Kernel(f"moe_{c.act.name}", "moe", (up_stmt.name, c.act.name), (), ("gate_up", "act")))
            kernels.append(Kernel(f"moe_{c.comb.name}", "moe", (c.down.stmt.name, c.comb.name), (),
                                  ("down", "combine")))
        if not replaced and len(kernels) == len(m.kernels):
            return m
        body = tuple(replaced.get(op.outputs[0], op) for op in m.body)
        return schedule(m.replace(body=body, kernels=tuple(kernels)))

    @staticmethod
    def _why_not(users: dict, grouped: set, up: Statement, act: Statement, down: Statement) -> str | None:
        for s, only in ((up, act), (act, down)):
            if s.name in grouped:
                return f"{s.name} is already in a kernel group"
            others = [u.outputs[0] for u in users.get(s.name, []) if u is not only]
            if others:
                return f"{s.name} is also read by {', '.join(others)}"
        return None
