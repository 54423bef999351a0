"""Kernels for fusion groups: a contraction with its epilogue and operand-sharing contractions (`dot`),
row statistics computed together (`rows`), and FuseMax's 1-pass attention (`attention`). Each group
becomes one Triton function whose steps follow the group's IR statements; values that stay inside the
group live in registers and only tensors read outside it are stored."""
from __future__ import annotations

import sympy

from ..ir import dtypes as dt
from ..ir import index as ix
from ..ir.contraction import contraction
from ..ir.expr import substitute
from ..ir.module import Iterate, Kernel, Module, Reduce, Statement
from ..ir.ops import REDUCE_OPS, infer
from ..ir.printer import fmt_statement
from .kernel import KernelSpec, Mapping
from .triton_gen import TL, Body, KernelGen, _reduce_parts, compute_dtype, next_pow2


class GroupUnsupported(Exception):
    """The code generator cannot emit this group as one kernel: its members get kernels of their own."""


def rename_ranks(s: Statement, suffix: str) -> Statement:
    """`s` with every rank r called r<suffix>: members of one kernel must not share rank names."""
    ren = {r: ix.rank(f"{r}{suffix}") for r in s.ranks()}
    reduce = Reduce(s.reduce.op, tuple((ren[r], n) for r, n in s.reduce.ranks)) if s.reduce else None
    iterate = Iterate(ren[s.iterate.rank], s.iterate.extent, s.iterate.init) if s.iterate else None
    return s.replace(index=tuple(sympy.sympify(p).xreplace(ren) for p in s.index), expr=substitute(s.expr, ren),
                     reduce=reduce, iterate=iterate)


def stored_members(m: Module, members: list) -> set:
    """Members read outside the group, or module outputs: the ones a kernel writes to memory."""
    inside = set(members)
    users = m.users()
    return {n for n in members if n in m.outputs or any(u.outputs[0] not in inside for u in users.get(n, []))}


class GroupGen(KernelGen):
    """A KernelGen over several statements; `self.s` is the group's anchor."""

    def __init__(self, m: Module, kernel: Kernel, kname: str, line: int):
        prod = m.producers()
        stmts = [prod[n] for n in kernel.members]
        if kernel.kind == "attention":  # the cascade shares its ranks by construction; only the scores differ
            members = [rename_ranks(stmts[0], "_q")] + stmts[1:]
        else:
            members = [s if n == 0 else rename_ranks(s, f"_{n}") for n, s in enumerate(stmts)]
        self.kernel = kernel
        self.members = members
        self.m_types = m.types()
        anchor = self.anchor(members)
        super().__init__(m, anchor, kname, line)
        for s in members:
            self.extents.update(s.ranks())
        self.stored = stored_members(m, kernel.members)

    def anchor(self, members):
        """The statement the kernel is tiled by: a dot group's first contraction, else the first member."""
        if self.kernel.kind == "dot":
            types = self.m_types
            return next((s for s in members if contraction(s, lambda n: types[n].dtype) is not None), members[0])
        return members[0]

    def comment(self) -> list:
        lines = []
        for s in self.members:
            lines.append(f"    # {fmt_statement(s.replace(loc=None))}" + ("" if s.name in self.stored else "   (in registers)"))
        locs = sorted({s.loc for s in self.members if s.loc})
        lines.append(f"    # source: {', '.join(locs) or 'unknown'}")
        return lines

    def generate_group(self, mapping: Mapping) -> KernelSpec:
        body, grid = {"dot": self.gen_dot, "rows": self.gen_rows, "attention": self.gen_attention}[self.kernel.kind](mapping)
        what = f"kernel group {self.kernel.name!r} ({self.kernel.kind}, {len(self.members)} statements)"
        return self.finish(body, grid, mapping, tuple(s.name for s in self.members),
                           tuple(s.name for s in self.members if s.name in self.stored), self.comment(), what)

    # ------------------------------------------------------------------ dot: contraction + epilogue
    def group_dots(self) -> list:
        c0 = contraction(self.s, self.dtype_of)
        out = []
        for s in self.members:
            c = contraction(s, self.dtype_of)
            if c is None:
                continue
            ren = {}
            for role in ("m", "n", "k", "batch"):
                mine, theirs = getattr(c, role), getattr(c0, role)
                if len(mine) != len(theirs) or any(sympy.simplify(self.extents[x] - self.extents[y]) != 0
                                                   for x, y in zip(mine, theirs)):
                    raise GroupUnsupported(f"{s.name} does not tile like {self.s.name}")
                ren.update(dict(zip(mine, theirs)))
            if ren and s is not self.s:
                s = s.replace(index=tuple(sympy.sympify(p).xreplace(ren) for p in s.index),
                              expr=substitute(s.expr, ren),
                              reduce=Reduce(s.reduce.op, tuple((ren.get(r, r), n) for r, n in s.reduce.ranks)))
                c = contraction(s, self.dtype_of)
            out.append((s, c))
        return out

    def group_stats(self) -> list:
        from ..passes.fusion import stat_binding

        dots = [d for d, _ in self.group_dots()]
        out, self.stat_index = [], {}
        for s in self.members:
            if s.reduce is None or contraction(s, self.dtype_of) is not None:
                continue
            bind = next((b for b in (stat_binding(self.m, s, d) for d in dots) if b), None)
            if bind is None:
                raise GroupUnsupported(f"{s.name} is not a row statistic of the group's contraction")
            self.stat_index[s.name] = [sympy.sympify(p).xreplace(bind) for p in s.index]
            out.append((s, substitute(s.expr, bind)))
        return out

    def epilogue(self, names: dict, values: dict, mask: str, indent: str) -> list:
        maps = [s for s in self.members if contraction(s, self.dtype_of) is None and s.reduce is None]
        if not maps:
            return []
        lines = [f"{indent}eflat = {self.store_offset(names)}"]
        emask = "emask" if mask else None
        if mask:
            lines.append(f"{indent}emask = {mask}")
        for s in maps:
            ranks = [p for p in s.index]
            own = self.rank_names(ranks)
            lines += self.delinearize("eflat", ranks, own, indent)
            body = Body(self, {**names, **own}, {r: emask for r in ranks} if emask else {}, self.ranges(), indent)
            body.reg = lambda a, v=values: v[a.tensor][0] if a.tensor in v else None
            code, d = body.value(s.expr)
            lines += body.lines
            values[s.name] = (code, d)
            if s.name in self.stored:
                lines.append(f"{indent}tl.store({self.pointer(s.name)} + eflat, {self.store_cast(code, d, s)}"
                             f"{f', mask={emask}' if emask else ''})")
        return lines

    # ------------------------------------------------------------------ rows: statistics of a row
    def gen_rows(self, mp: Mapping):
        """A block of rows per program; each member in turn: a reduction loops over the row's columns,
        a map combines the row values already computed; all kept in registers."""
        tiles = dict(mp.tiles)
        rows_ranks = [p for p in self.s.index]
        nrows = self.numel(rows_ranks)
        r_ragged = self.ragged(rows_ranks, tiles["BLOCK_M"])
        lines = ["    pid = tl.program_id(0)", "    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]"]
        lines += [f"    rmask = rows < {self.ext(nrows)}"] * r_ragged
        lines.append("    rc = tl.arange(0, BLOCK_R)[None, :]")
        values: dict = {}
        rng = self.ranges()
        for s in self.members:
            own = self.rank_names([p for p in s.index])
            lines += self.delinearize("rows", [p for p in s.index], own, "    ")
            outer = {r: "rmask" for r in s.index} if r_ragged else {}
            reg = lambda a, v=values: v[a.tensor][0] if a.tensor in v else None  # noqa: E731
            if s.reduce is None:
                body = Body(self, own, outer, rng, "    ")
                body.reg = reg
                code, d = body.value(s.expr)
                lines += body.lines
            else:
                code, d = self._row_reduction(s, own, outer, reg, rng, tiles["BLOCK_R"], lines)
            values[s.name] = (code, d)
            if s.name in self.stored:
                lines.append(f"    tl.store({self.pointer(s.name)} + rows, {self.store_cast(code, d, s)}"
                             f"{', mask=rmask' if r_ragged else ''})")
        return lines, [ix.FloorDiv(nrows + tiles["BLOCK_M"] - 1, tiles["BLOCK_M"])]

    def _row_reduction(self, s: Statement, own: dict, outer: dict, reg, rng, block_r: int, lines: list):
        """One reduction member: an accumulator tile over the row block, a loop over the columns."""
        red = [r for r, _ in s.reduce.ranks]
        cols = self.rank_names(red)
        width = self.numel(red)
        c_ragged = self.ragged(red, block_r)
        op = REDUCE_OPS[s.reduce.op]
        expr_dtype = infer(s.expr, self.dtype_of)[0]
        acc_t, ident, combine, final = _reduce_parts(op.name, expr_dtype)
        acc = self.fresh(f"{s.name}_acc")
        loop = [f"    for r0 in range(0, {self.ext(width)}, BLOCK_R):", "        cols = r0 + rc"]
        loop += [f"        cmask = cols < {self.ext(width)}"] * c_ragged
        loop += self.delinearize("cols", red, cols, "        ")
        pre = Body(self, own, outer, rng, "    ")
        pre.reg = reg
        body = Body(self, {**own, **cols}, {**outer, **({r: "cmask" for r in red} if c_ragged else {})}, rng,
                    "        ", pre, red)
        body.reg = reg
        code, d = body.value(s.expr)
        conv = code if TL[compute_dtype(d).name] == acc_t else f"tl.cast({code}, {acc_t})"
        if op.name in ("any", "all"):
            conv = f"tl.cast({code} != 0, {acc_t})"
        res = self.fresh(s.name)
        lines += pre.lines + [f"    {acc} = tl.full([BLOCK_M, BLOCK_R], {ident}, {acc_t})"] + loop + body.lines
        lines += [f"        x = tl.where(cmask, {conv}, {ident})" if c_ragged else f"        x = {conv}",
                  f"        {acc} = {combine.format(acc, 'x')}", f"    {res} = {final.format(acc)}"]
        if op.name in ("any", "all"):
            lines.append(f"    {res} = {res} != 0")
            return res, dt.bool_
        return res, expr_dtype

    # ------------------------------------------------------------------ attention: FuseMax 1-pass
    def gen_attention(self, mp: Mapping):
        from .attention_gen import attention_body

        return attention_body(self, mp)


def group_mapping(m: Module, kernel: Kernel, gen: GroupGen) -> Mapping:
    """The mapping of a group: the anchor's tiling (dot, rows) or the attention tiling."""
    from .mapping import choose

    if kernel.kind == "dot":
        mp = choose(m, gen.s)
        if mp.kind != "dot":
            raise GroupUnsupported(f"{gen.s.name} does not map to tensor cores")
        return mp
    if kernel.kind == "rows":
        hints = {k: int(v) for k, v in m.size_hints}
        red = [s for s in gen.members if s.reduce is not None][0]
        width = sympy.Mul(*[n for _, n in red.reduce.ranks]).xreplace({k: sympy.Integer(v) for k, v in hints.items()})
        br = max(16, min(1024, next_pow2(int(width) if width.is_Integer else 1024)))
        rows = gen.s.type.numel().xreplace({k: sympy.Integer(v) for k, v in hints.items()})
        bm = max(1, min(next_pow2(int(rows) if rows.is_Integer else 64), max(1, 4096 // br)))
        return Mapping("rows", rows=tuple(p for p in gen.s.index), tiles=(("BLOCK_M", bm), ("BLOCK_R", br)))
    if kernel.kind == "attention":
        from .attention_gen import attention_mapping

        return attention_mapping(gen)
    raise GroupUnsupported(f"no code generator for kernel kind {kernel.kind!r}")
