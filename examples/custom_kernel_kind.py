"""A kernel kind from user code: residual add + RMSNorm in ONE pass over each row, the row kept in
registers (einfuse's rows kind reads a row once per reduction and once more to normalize). Registered,
chosen by a fusion rule, emitted through the kinds' builder, compiled for sm_80/sm_90a, checked."""
import torch

import einfuse
from einfuse.ir.contraction import is_map
from einfuse.ir.expr import accesses
from einfuse.kinds import Emitter, KernelKind, Mapping, Tile, register_kind
from einfuse.kinds.tile import next_pow2
from einfuse.passes import RULES, FuseKernels, Rule, cleanup_passes, fusion_passes


class RowInRegisters(KernelKind):
    """Maps over rows and one-rank sums along them (output [..., 1]); one program per row."""
    name, roles = "row_in_registers", ("map", "sum")

    def group_roles(self, m, members):
        stmts = [m.producers()[n] for n in members]
        for s in stmts:
            col = s.reduce.ranks[0][0] if s.reduce else s.index[-1]
            if not (is_map(s) or s.reduce.op == "sum" and len(s.reduce.ranks) == 1 and s.type.shape[-1] == 1):
                return None
            if any(a.tensor in members and (a.indices[:-1] != s.index[:-1] or a.indices[-1] not in (col, 0))
                   for a in accesses(s.expr)):
                return None  # a member reads another at a different row
        same = len({s.reduce.ranks[0][1] if s.reduce else s.type.shape[-1] for s in stmts}) == 1 == len(
            {s.type.shape[:-1] for s in stmts})  # one row width, the same rows
        return tuple("sum" if s.reduce else "map" for s in stmts) if same else None

    def mapping(self, g):
        width = [s.reduce.ranks[0][1] if s.reduce else s.type.shape[-1] for s in g.statements][0]
        return Mapping(self.name, rows=g.statements[0].index[:-1], tiles=(("BLOCK_R", max(16, next_pow2(width))),))

    def emit(self, g, mp):
        em = Emitter(g, {r: n for s in g.statements for r, n in s.ranks().items()})
        kb, width = em.kb, mp.tiles[0][1]
        kb.assign("row", "tl.program_id(0)"), kb.assign("cols", "tl.arange(0, BLOCK_R)")
        kb.assign("cmask", f"cols < {[s.type.shape[-1] for s in g.statements if not s.reduce][0]}")
        values = {}
        for s in g.statements:  # every member sees its row through the same variables: the row stays in registers
            col = s.reduce.ranks[0][0] if s.reduce else s.index[-1]
            names = {**em.rank_names(s.index[:-1]), col: "cols", s.index[-1]: "cols" if not s.reduce else "0"}
            em.delinearize("row", list(s.index[:-1]), names)
            t = Tile(em, names, {col: "cmask"}, held=lambda a: values.get(a.tensor))
            code, d = t.value(s.expr, s.name)
            kb.place(t.block)
            if s.reduce:
                code = kb.let(s.name, f"tl.sum(tl.where(cmask, {code}, 0.0), axis=0)")
            values[s.name] = code
            if s.name in em.stored:
                em.store(s, "row" if s.reduce else f"row * {s.type.shape[-1]} + cols", code, d,
                         None if s.reduce else "cmask")
        return em.finish(mp, [em.numel(mp.rows)])


register_kind(RowInRegisters())


class ResidualNorm(torch.nn.Module):
    def __init__(self, width=96):
        super().__init__()
        self.norm = torch.nn.RMSNorm(width, eps=1e-6)

    def forward(self, x, y):
        h = x + y
        return h, self.norm(h)


anything = Rule("residual + RMSNorm, row in registers", "row_in_registers", lambda m, p, c, a: True)
passes = cleanup_passes() + [FuseKernels([anything] + RULES) if isinstance(p, FuseKernels) else p for p in fusion_passes()]
model, x, y = ResidualNorm().eval(), torch.randn(8, 24, 96), torch.randn(8, 24, 96)
torch.nn.init.normal_(model.norm.weight)
cm = einfuse.compile(model, (x, y), passes=passes, backend="triton")
print("kernels:", [s.kind for s in cm.variant.run.specs])
x2, y2 = torch.randn(8, 24, 96), torch.randn(8, 24, 96)  # fresh inputs
print(f"max abs error vs eager: {max((a - b).abs().max().item() for a, b in zip(cm(x2, y2), model(x2, y2))):.1e}")
for c in cm.check_gpu(archs=(80, 90)):
    print(f"{c.name} sm_{c.arch}: ok={c.ok} spills={c.spills} registers={c.registers}")
