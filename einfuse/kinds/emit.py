"""The Emitter: what every kind's code emission shares for one kernel — the builder, pointer and size
arguments, rank variables bound from flat indices, masks of ragged tiles, stores, and the kernel module
around the body (docstring, imports, signature, IR and source provenance)."""
from __future__ import annotations

import sympy

from ..ir import dtypes as dt
from ..ir import index as ix
from ..ir.module import Statement
from ..ir.printer import fmt_op
from .base import Group
from .builder import KernelBuilder
from .spec import Arg, KernelSpec, Mapping
from .tile import TL, IndexCode, compute_dtype

# Names kernels bind themselves; a rank with one of these names gets a trailing underscore.
RESERVED = {"pid", "pid_b", "pid_m", "pid_n", "pid_p", "offs", "rows", "cols", "rem", "acc", "carry", "valid", "tl",
            "triton", "libm", "rmask", "cmask", "mmask", "nmask", "pmask", "fmask", "num_n", "k0", "r0", "res", "x",
            "a", "b", "rm", "rn", "rc", "ka", "kb", "rka", "rkb", "kmask_a", "kmask_b", "p", "p_lo", "p_hi", "m1",
            "eq", "ek", "m0k", "m0v", "fv", "emask_q", "emask_k", "eflat", "emask"}


class Emitter:
    """Emission state of one kernel: `kb` is its builder; ranks get Triton variables of the same name."""

    def __init__(self, g: Group, extents: dict):
        self.g = g
        self.m = g.module
        self.types = g.info.types
        self.dtype_of = g.info.dtype_of
        self.kb = KernelBuilder(RESERVED)
        self.extents = dict(extents)  # rank -> extent of every rank the kernel binds
        self.size_names = {s: str(s) for s in self.m.sizes}
        self.ptrs: dict = {}
        self.used_sizes: set = set()
        self.unit_ranks = {r: sympy.Integer(0) for r, n in self.extents.items() if n == 1}
        self.stored = g.stored
        for r in self.extents:  # rank variables keep their names; values get fresh ones around them
            self.kb.claim(f"{r}_" if str(r) in RESERVED else str(r))

    # ---- names
    def pointer(self, tensor: str) -> str:
        if tensor not in self.ptrs:
            self.ptrs[tensor] = self.kb.claim(f"{tensor}_ptr")
        return self.ptrs[tensor]

    def rank_names(self, ranks, suffix: str = "") -> dict:
        """rank -> its variable: the rank's own name (with `suffix`), `_`-suffixed if a kernel word."""
        out = {}
        for r in ranks:
            name = (f"{r}_" if str(r) in RESERVED else str(r)) + suffix
            out[r] = self.kb.claim(name)
        return out

    # ---- sizes
    def ext(self, e) -> str:
        """A size expression as code over the kernel's size arguments."""
        e = sympy.sympify(e)
        self.used_sizes |= e.free_symbols
        return IndexCode(self.size_names).doprint(e)

    def hint(self, e) -> int:
        return self.g.info.hint(e)

    def numel(self, ranks) -> sympy.Expr:
        return sympy.Mul(*[self.extents[r] for r in ranks]) if ranks else sympy.Integer(1)

    def ragged(self, ranks, block: int) -> bool:
        """Whether the last tile over `ranks` runs past their extent and so needs a mask."""
        return sympy.Mod(self.numel(ranks), block) != 0

    def ranges(self) -> dict:
        return {r: (sympy.Integer(0), sympy.sympify(n) - 1) for r, n in self.extents.items()}

    # ---- rank variables from flat indices
    def delinearize(self, flat: str, ranks: list, names: dict, to=None) -> None:
        """Bind each rank variable from a flat index (last rank fastest). A rank of extent 1 is 0, shaped
        like the flat index, so offsets built from it have the tile's shape (loads still drop it)."""
        kb = self.kb
        live = [r for r in ranks if self.extents[r] != 1]
        for r in ranks:
            if self.extents[r] == 1:
                kb.assign(names[r], f"0 * {flat}", to)
        rem = flat
        for n, r in enumerate(reversed(live)):
            if n == len(live) - 1:
                kb.assign(names[r], rem, to)
            else:
                kb.assign(names[r], f"{rem} % {self.ext(self.extents[r])}", to)
                nxt = kb.claim(f"rem_{names[r]}")
                kb.assign(nxt, f"{rem} // {self.ext(self.extents[r])}", to)
                rem = nxt

    def strip(self, flat: str, code: str, ranks: list, names: dict, extent, mask: str | None = None) -> None:
        """A strip of a tile axis: `flat = code` (a flat index over `ranks`), `mask = flat < extent` when the
        last strip runs past the ranks' extent (`mask` given), and each rank variable bound from it."""
        self.kb.assign(flat, code)
        if mask:
            self.kb.assign(mask, f"{flat} < {extent}")
        self.delinearize(flat, ranks, names)

    def flats(self, flat: str, ranks: list, names: dict) -> list:
        """The linear forms `delinearize` splits: `flat` over all its ranks, then each `rem_` variable
        over the ranks left of it (for Tile.reuse_flat). Longest first."""
        live = [r for r in ranks if self.extents[r] != 1]
        out, var = [], flat
        for n in range(len(live), 1, -1):
            part = live[:n]
            out.append((ix.flat_offset(part, [self.extents[r] for r in part]), var, part[-1]))
            var = f"rem_{names[part[-1]]}"
        return out

    # ---- stores
    def store_offset(self, names: dict, stmt: Statement, at_iter: str | None = None) -> str:
        """The flat offset of `stmt`'s output at its ranks (`at_iter` for an iterative position)."""
        step = sympy.Symbol("__iter__")
        pos = [p if isinstance(p, sympy.Symbol) else step for p in stmt.index]
        names = {**names, step: f"({at_iter})" if at_iter is not None else "0"}
        return IndexCode({**names, **self.size_names}).doprint(ix.flat_offset(pos, stmt.type.shape))

    def store_cast(self, code: str, d: dt.DType, stmt: Statement) -> str:
        """`code` (a value of IR dtype `d` in its compute type) converted to `stmt`'s storage type."""
        out = stmt.type.dtype
        if out.is_float and out.bits < 32 and not d.is_float:  # through f32, as in tile.cast_code
            code = f"tl.cast({code}, tl.float32)"
        return f"tl.cast({code}, {TL[out.name]})" if (out != d or compute_dtype(out) != out or out.is_int) else code

    def store(self, stmt: Statement, offset: str, code: str, d: dt.DType, mask: str | None = None, to=None) -> None:
        self.kb.store(self.pointer(stmt.name), offset, self.store_cast(code, d, stmt), mask, to)

    # ---- the kernel module
    def provenance(self) -> list:
        """Comment lines: the IR line of each statement (values kept in registers say so) and the user's source."""
        g = self.g
        if len(g.statements) == 1:
            s = g.statements[0]
            return [f"IR line {g.line}: {fmt_op(s.replace(loc=None))}", f"source: {s.loc or 'unknown'}"]
        lines = [fmt_op(s.replace(loc=None)) + ("" if s.name in self.stored else "   (in registers)")
                 for s in g.statements]
        locs = sorted({s.loc for s in g.statements if s.loc})
        return lines + [f"source: {', '.join(locs) or 'unknown'}"]

    def finish(self, mapping: Mapping, grid: list, meta: dict | None = None) -> KernelSpec:
        """The kernel module around the built body."""
        g = self.g
        body = self.kb.render()
        for s in g.statements:
            if s.name in self.stored:
                self.pointer(s.name)
        args = [Arg(p, "ptr", t, self.types[t].dtype.name) for t, p in self.ptrs.items()]
        for s in self.m.sizes:
            if s in self.used_sizes or any(s in sympy.sympify(x).free_symbols for x in grid):
                args.append(Arg(str(s), "size", str(s)))
        params = ", ".join([a.name for a in args] + [f"{k}: tl.constexpr" for k, _ in mapping.tiles])
        what = (f"statement {g.statements[0].name!r}" if len(g.statements) == 1 and g.kernel.name == g.statements[0].name
                else f"kernel group {g.kernel.name!r} ({g.kernel.kind}, {len(g.statements)} statements)")
        header = [f'"""einfuse kernel {g.name}: {what} of module {self.m.name!r}.', "",
                  f"Mapping: {mapping.text()}", '"""', "import triton", "import triton.language as tl", "",
                  "from einfuse.codegen import libm", "", ""]
        src = "\n".join(header + self.kb.helper_lines() + ["@triton.jit", f"def {g.name}({params}):"]
                        + [f"    # {c}" for c in self.provenance()] + body) + "\n"
        return KernelSpec(g.name, tuple(s.name for s in g.statements),
                          tuple(s.name for s in g.statements if s.name in self.stored), src, args,
                          dict(mapping.tiles), grid, mapping, 0, dict(meta or {}))
