"""The MoE kind: a mixture-of-experts layer's expert GEMMs as kernels that load each *activated* expert's
weights once per step and skip the others.

The IR of an experts call (what `einfuse.frontend.moe` emits for transformers' experts modules, and what a
model written in the dense "every expert on every token" form lowers to; `einfuse.passes.moe` finds it)::

    gw[t, e]      = sum[k] where(ids[t, k] == e, w[t, k], 0)                         # routing weight, 0 off the top-k
    up[t, e, n]   = sum[h] where(gw[t, e] != 0, x[t, h] * w_gate_up[e, n, h], 0)     # role gate_up
    act[t, e, i]  = silu(up[t, e, i]) * up[t, e, i + I]                              # role act (SwiGLU)
    down[t, e, h] = sum[i] act[t, e, i] * w_down[e, h, i]                            # role down
    out[t, h]     = sum[e] gw[t, e] * down[t, e, h]                                  # role combine

Two kernels of this kind run it. `gate_up + act`: one program per (expert, tile of the intermediate).
A step whose tokens fit one token block (decode) computes that block if a token of it routes to the
expert; a longer step (prefill) first gathers the expert's routed tokens into blocks of its own
(permutation by expert: each program ranks the tokens routed to its expert with a cumulative sum over
the routing column, no sort kernel and no index tensor in memory), so the expert's weight tile is loaded
once per BLOCK_T of *its* tokens and only its rows are computed; an inactive expert loads nothing;
SwiGLU is the epilogue (prefill writes only the routed (token, expert) rows of act, the only ones read). `down + combine`: one program per (token block, tile of the
hidden size), looping over the experts its tokens route to, weighting each expert's output as it
accumulates (the combine needs no scatter and no atomics).

Cost model (public, used by schedulers and reports): `expert_bytes(expert_ids, num_experts,
bytes_per_expert)` is the expert-weight bytes one MoE layer loads in a step whose routing is
`expert_ids` (the top-k expert ids of the step's tokens, any shape): every expert at least one token
routes to is loaded once, the others not at all. `expert_bytes_from_counts(counts, bytes_per_expert)`
takes tokens per expert instead; `expert_param_bytes(hidden, intermediate, dtype)` is one gated expert's
weight bytes (gate, up and down projections). Under Triton's interpreter the traffic counter measures
what the kernels load; that equals this model when a step's tokens fit one token block (decode). In
prefill the gate/up kernel loads an expert's gate/up weights once per BLOCK_T tokens routed to it; the
down kernel (token-major, so that the combine needs no atomics) still loads an expert's down weights once
per token block with a token routed to it (on a GPU those re-reads mostly come from L2).
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch

from ..ir import dtypes as dt
from ..ir import index as ix
from ..ir.contraction import mul_factors, narrow_operand, product
from ..ir.expr import Access, Call, Const, Expr, index_symbols, substitute
from ..ir.module import Module, Statement
from .base import Cost, Group, KernelKind, Unsupported, register_kind
from .dot import float32_precision
from .emit import Emitter
from .spec import KernelSpec, Mapping
from .tile import TL, Tile, next_pow2


def expert_param_bytes(hidden: int, intermediate: int, dtype: torch.dtype = torch.float32, gated: bool = True) -> int:
    """Weight bytes of one expert: gate and up projections (hidden -> intermediate each; one without a
    gate) and the down projection (intermediate -> hidden)."""
    size = torch.empty((), dtype=dtype).element_size()
    return (3 if gated else 2) * hidden * intermediate * size


def activated_experts(expert_ids: torch.Tensor, num_experts: int) -> int:
    """How many distinct experts the step's routing activates (ids outside [0, num_experts) are ignored:
    expert-parallel sentinels, padding)."""
    ids = torch.as_tensor(expert_ids).reshape(-1).long()
    ids = ids[(ids >= 0) & (ids < num_experts)]
    return int(torch.unique(ids).numel())


def expert_bytes(expert_ids: torch.Tensor, num_experts: int, bytes_per_expert: int) -> int:
    """Expert-weight bytes one MoE layer loads in a step with this routing: each activated expert once."""
    return activated_experts(expert_ids, num_experts) * int(bytes_per_expert)


def expert_bytes_from_counts(counts, bytes_per_expert: int) -> int:
    """The same from tokens routed to each expert (a sequence or tensor of length num_experts)."""
    return int((torch.as_tensor(counts) > 0).sum()) * int(bytes_per_expert)


# ---------------------------------------------------------------- the statements' forms

def _strip(e: Expr) -> Expr:
    """A value through its casts."""
    while isinstance(e, Call) and e.op == "cast":
        e = e.args[0]
    return e


def _ranks3(s) -> tuple | None:
    if isinstance(s, Statement) and s.iterate is None and len(s.index) == 3 and all(
            isinstance(p, sympy.Symbol) for p in s.index):
        return tuple(s.index)
    return None


def _one_sum(s: Statement):
    """The rank of a sum over exactly one rank, or None."""
    if s.reduce is None or s.reduce.op != "sum" or len(s.reduce.ranks) != 1:
        return None
    return s.reduce.ranks[0][0]


def _two_operands(body: Expr, left: set, right: set) -> tuple | None:
    """(A, B) when `body` is A * B, A over exactly the ranks `left` and B over exactly `right`. A product of
    more factors splits into those over ranks of `left` (a prologue fused into the operand: an RMSNorm's
    weight and scale) and the rest, kept in their order."""
    fs = mul_factors(body)
    if len(fs) < 2:
        return None
    a = [f for f in fs if index_symbols(f) <= left]
    b = [f for f in fs if not index_symbols(f) <= left]
    if not a or not b:
        return None
    a, b = product(a), product(b)
    if index_symbols(a) == left and index_symbols(b) == right:
        return a, b
    return None


@dataclass(frozen=True)
class UpForm:
    """`up[t, e, n] = sum[h] where(gate != 0, a * b, 0)`: a over (t, h) the tokens, b over (e, n, h) the
    experts' gate/up weights, gate the routing weight at (t, e) (None in the ungated dense form)."""

    stmt: Statement
    t: sympy.Symbol
    e: sympy.Symbol
    n: sympy.Symbol
    h: sympy.Symbol
    gate: Expr | None
    a: Expr
    b: Expr


def up_form(s) -> UpForm | None:
    ranks = _ranks3(s)
    h = _one_sum(s) if ranks else None
    if h is None:
        return None
    t, e, n = ranks
    body, gate = s.expr, None
    if isinstance(body, Call) and body.op == "where" and body.args[2] == Const(0.0) or (
            isinstance(body, Call) and body.op == "where" and body.args[2] == Const(0)):
        cond, body = body.args[0], body.args[1]
        if not (isinstance(cond, Call) and cond.op == "ne" and _strip(cond.args[1]) in (Const(0.0), Const(0))):
            return None
        gate = cond.args[0]
        if not _routing_at(_strip(gate), t, e):
            return None
    ab = _two_operands(body, {t, h}, {e, n, h})
    return UpForm(s, t, e, n, h, gate, *ab) if ab else None


def act_form(s, up: UpForm) -> Expr | None:
    """`act[t, e, i] = silu(up[t, e, i]) * up[t, e, i + I]` (SwiGLU over the two halves of up, I = half of
    up's last extent): its expression in up's ranks, or None."""
    ranks = _ranks3(s)
    if ranks is None or s.reduce is not None:
        return None
    half = up.stmt.type.shape[2] / 2
    if sympy.simplify(s.type.shape[2] - half) != 0 or any(
            sympy.simplify(a - b) != 0 for a, b in zip(s.type.shape[:2], up.stmt.type.shape[:2])):
        return None
    expr = substitute(s.expr, dict(zip(ranks, (up.t, up.e, up.n))))
    fs = mul_factors(expr)
    if len(fs) != 2:
        return None
    first = Access(up.stmt.name, (up.t, up.e, up.n))
    second = Access(up.stmt.name, (up.t, up.e, up.n + half))
    for g, u in (fs, fs[::-1]):
        g, u = _strip(g), _strip(u)
        if isinstance(g, Call) and g.op == "silu" and _strip(g.args[0]) == first and u == second:
            return expr
    return None


@dataclass(frozen=True)
class DownForm:
    """`down[t, e, h] = sum[i] a * b`: a reads act at (t, e, i), b the experts' down weights over (e, h, i)."""

    stmt: Statement
    t: sympy.Symbol
    e: sympy.Symbol
    h: sympy.Symbol
    i: sympy.Symbol
    a: Expr
    b: Expr


def down_form(s, act: str) -> DownForm | None:
    ranks = _ranks3(s)
    i = _one_sum(s) if ranks else None
    if i is None:
        return None
    t, e, h = ranks
    ab = _two_operands(s.expr, {t, e, i}, {e, h, i})
    if ab is None or _strip(ab[0]) != Access(act, (t, e, i)):
        return None
    return DownForm(s, t, e, h, i, *ab)


def find_down(s) -> DownForm | None:
    """`s` as a down projection of whichever tensor it reads as act."""
    if not isinstance(s, Statement):
        return None
    for a in (_strip(x) for x in mul_factors(s.expr)):
        if isinstance(a, Access):
            f = down_form(s, a.tensor)
            if f is not None:
                return f
    return None


def _routing_at(g: Expr, t, e) -> bool:
    """`g` reads the routing weights at (token, expert) up to constant shifts: `gw[t, e]`; `gw[t + c, e]`
    for a chunk of the tokens starting at row c (passes.expert_overlap); `gw[t, e + c]` on a rank of
    expert parallelism that holds the experts from c on (passes.sharding)."""
    if not (isinstance(g, Access) and len(g.indices) == 2):
        return False
    shifts = [sympy.sympify(p) - r for p, r in zip(g.indices, (t, e))]
    return all(d.is_Integer and d >= 0 for d in shifts)


def combine_form(s, down: DownForm) -> Expr | None:
    """`out[t, h] = sum[e] gate * down[t, e, h]` (gate the routing weight at (t, e)): its expression in
    down's ranks, or None."""
    if not isinstance(s, Statement) or s.iterate is not None or len(s.index) != 2:
        return None
    e = _one_sum(s)
    if e is None or not all(isinstance(p, sympy.Symbol) for p in s.index):
        return None
    expr = substitute(s.expr, {s.index[0]: down.t, s.index[1]: down.h, e: down.e})
    ab = _two_operands(expr, {down.t, down.e}, {down.t, down.e, down.h})
    if ab is None or _strip(ab[1]) != Access(down.stmt.name, (down.t, down.e, down.h)):
        return None
    return expr if _routing_at(_strip(ab[0]), down.t, down.e) else None


def combine_gate(expr: Expr, down: DownForm) -> Expr:
    """The routing-weight factor of a combine expression in down's ranks."""
    return _two_operands(expr, {down.t, down.e}, {down.t, down.e, down.h})[0]


@dataclass(frozen=True)
class Chain:
    """An experts chain the kind runs: gate/up projection, SwiGLU, down projection, combine (`expr`: the
    combine's expression in the down projection's ranks). Each statement's dim 0 is the token."""

    up: UpForm
    act: Statement
    down: DownForm
    comb: Statement
    expr: Expr

    @property
    def statements(self) -> tuple:
        return self.up.stmt, self.act, self.down.stmt, self.comb

    @property
    def gate(self) -> Expr:
        """The combine's routing weight in the gate/up projection's ranks (t, e)."""
        return substitute(combine_gate(self.expr, self.down), {self.down.t: self.up.t, self.down.e: self.up.e})

    def gated_by_combine(self) -> bool:
        """The gate/up projection skips exactly the pairs the combine weighs by 0."""
        return self.up.gate is not None and _strip(self.up.gate) == _strip(self.gate)


def find_chains(m: Module, grouped=frozenset()) -> list:
    """Every experts chain of `m` none of whose down projection or combine is in `grouped`."""
    prod, users, found = m.producers(), m.users(), []
    for s in m.statements:
        down = find_down(s) if s.name not in grouped else None
        if down is None:
            continue
        readers = users.get(s.name, [])
        comb = readers[0] if len(readers) == 1 else None
        expr = combine_form(comb, down) if comb is not None and comb.name not in grouped else None
        act = prod.get(_strip(down.a).tensor)  # down_form: the act operand is an access through casts
        up = None
        if isinstance(act, Statement):
            reads = [prod.get(t) for t in act.reads()]
            up = next((f for f in (up_form(r) for r in reads if isinstance(r, Statement)) if f is not None), None)
        if expr is not None and up is not None and act_form(act, up) is not None:
            found.append(Chain(up, act, down, comb, expr))
    return found


# ---------------------------------------------------------------- the kind

def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_pow2(n)))


class MoEKind(KernelKind):
    """Two kernels per experts call: `gate_up` + `act` (expert-major: a program per expert and
    intermediate tile, looping over token blocks) and `down` + `combine` (token-major: a program per
    token block and hidden tile, looping over experts). Both skip (token block, expert) pairs no token of
    which routes to the expert: their weights are never loaded."""

    name = "moe"
    roles = ("gate_up", "act", "down", "combine")
    priority = 0  # never claims a statement alone: only the groups einfuse.passes.moe forms

    def group_roles(self, m: Module, members: list) -> tuple | None:
        prod = m.producers()
        stmts = [prod[n] for n in members]
        if len(stmts) != 2 or not all(isinstance(s, Statement) for s in stmts):
            return None
        up = up_form(stmts[0])
        if up is not None and up.gate is not None and act_form(stmts[1], up) is not None:
            return ("gate_up", "act")
        down = find_down(stmts[0])
        if down is not None and combine_form(stmts[1], down) is not None:
            return ("down", "combine")
        return None

    # ---- tiling
    def mapping(self, g: Group) -> Mapping:
        roles = set(g.kernel.roles)
        if "gate_up" in roles:
            f = up_form(g.role("gate_up"))
            t, e, n, k, a, b = f.t, f.e, f.n, f.h, f.a, f.b
            T, E, N2 = f.stmt.type.shape
            N, K = N2 / 2, f.stmt.reduce.ranks[0][1]
        else:
            f = self._down(g)
            t, e, n, k, a, b = f.t, f.e, f.h, f.i, f.a, f.b
            T, E, N = f.stmt.type.shape
            K = f.stmt.reduce.ranks[0][1]
        operand = self._operand_dtype(g, a, b)
        prec = float32_precision() if operand == dt.f32 else ""
        bk = 64 if operand.bits <= 16 else 16 if prec == "ieee" else 32
        hint = g.info.hint
        # 64 token rows even for a one-token decode step: sm_90a's warpgroup MMA (wgmma) takes M >= 64 (a GPU
        # computes the masked rows for free in a step bound by loading the expert weights)
        tiles = (("BLOCK_T", 64), ("BLOCK_N", _pow2(hint(N), 16, 64)),
                 ("BLOCK_K", _pow2(hint(K), 16, bk)))
        return Mapping(self.name, rows=(t,), cols=(n,), red=(k,), batch=(e,), tiles=tiles, input_precision=prec)

    def candidates(self, g: Group) -> list[Mapping]:
        mp = self.mapping(g)
        tiles = dict(mp.tiles)
        wide = Mapping(**{**mp.__dict__, "tiles": (("BLOCK_T", tiles["BLOCK_T"]), ("BLOCK_N", min(128, 2 * tiles["BLOCK_N"])),
                                                   ("BLOCK_K", tiles["BLOCK_K"]))})
        return list(dict.fromkeys([mp, wide]))

    @staticmethod
    def _operand_dtype(g: Group, a: Expr, b: Expr) -> dt.DType:
        (_, ta), (_, tb) = narrow_operand(a, g.info.dtype_of), narrow_operand(b, g.info.dtype_of)
        return ta if ta == tb else dt.f32

    @staticmethod
    def _down(g: Group) -> DownForm:
        f = find_down(g.role("down"))
        if f is None:
            raise Unsupported(f"{g.role('down').name} is not an expert down projection")
        return f

    # ---- the weight hook
    def expert_weights(self, em: Emitter, tile: Tile, b: Expr, operand: dt.DType) -> str:
        """The code of an expert weight tile ([BLOCK_K, BLOCK_N]) inside the K loop: the one place the
        expert GEMMs read weights. A kind whose experts are stored in another format (compressed
        experts) overrides it, as einfuse.kinds.qdot overrides DotKind.operand."""
        code, _ = tile.value(narrow_operand(b, em.dtype_of)[0])
        return code

    # ---- emission
    def emit(self, g: Group, mp: Mapping) -> KernelSpec:
        if "gate_up" in g.kernel.roles:
            return self._emit_up(g, mp)
        return self._emit_down(g, mp)

    def _dot(self, em: Emitter, acc: str, a: str, b: str, operand: dt.DType, mp: Mapping) -> None:
        kb = em.kb
        if operand == dt.f32:
            kb.assign(acc, f'libm.dot({a}, {b}, {acc}, input_precision="{mp.input_precision or "ieee"}")')
        else:
            cast = f".to({TL[operand.name]})"
            kb.assign(acc, f"libm.dot({a}{cast}, {b}{cast}, {acc})")

    def _k_loop(self, em: Emitter, K, k, names_a: dict, names_b: dict, ragged: bool) -> None:
        kb = em.kb
        kb.assign(names_a[k], "k0 + tl.arange(0, BLOCK_K)[None, :]")
        kb.assign(names_b[k], "k0 + tl.arange(0, BLOCK_K)[:, None]")
        if ragged:
            kb.assign("kmask_a", f"{names_a[k]} < {em.ext(K)}")
            kb.assign("kmask_b", f"{names_b[k]} < {em.ext(K)}")

    def _emit_up(self, g: Group, mp: Mapping) -> KernelSpec:
        f = up_form(g.role("gate_up"))
        act_expr = act_form(g.role("act"), f)
        if f is None or f.gate is None or act_expr is None:
            raise Unsupported("not a gated expert gate/up projection with a SwiGLU epilogue")
        if f.stmt.name in g.stored:
            raise Unsupported(f"{f.stmt.name} is read outside its MoE kernel")
        act = g.role("act")
        T, E, N2 = f.stmt.type.shape
        N, K = N2 / 2, f.stmt.reduce.ranks[0][1]
        em = Emitter(g, {f.t: T, f.e: E, f.n: N, f.h: K})
        kb = em.kb
        tiles = dict(mp.tiles)
        operand = self._operand_dtype(g, f.a, f.b)
        names = em.rank_names([f.t, f.e, f.n])
        ka, kbn = em.rank_names([f.h], "_a"), em.rank_names([f.h], "_b")
        t, e, n = names[f.t], names[f.e], names[f.n]
        n_rag, k_rag = em.ragged([f.n], tiles["BLOCK_N"]), em.ragged([f.h], tiles["BLOCK_K"])
        kb.comment("one program per (expert, intermediate tile); token blocks no token of which routes here load nothing")
        kb.assign(e, "tl.program_id(0)")
        kb.assign(n, "tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]")
        kb.assign("nmask", f"{n} < {em.ext(N)}")
        stmask = "tmask & nmask"
        act_at = em.store_offset(names, act.replace(index=(f.t, f.e, f.n)))

        def routed_rows() -> None:
            """`routed`: which rows `t` (under `tmask`) route to expert `e`; `busy`: how many."""
            gate = Tile(em, {f.t: t, f.e: e}, {f.t: "tmask"})
            cond, _ = gate.value(Call("ne", (f.gate, Const(0))))
            kb.place(gate.block)
            kb.assign("routed", f"tl.where(tmask, {cond}, 0) != 0")  # a [BLOCK_T, 1] mask even for one token
            kb.assign("busy", "tl.sum(tl.sum(routed.to(tl.int32), axis=1), axis=0)")

        def gate_up_block() -> None:
            """The rows `t` (those under `routed`) times the expert's gate/up tiles, SwiGLU, stored to act."""
            kb.assign("acc_gate", "tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)")
            kb.assign("acc_up", "tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)")
            with kb.loop("k0", f"0, {em.ext(K)}, BLOCK_K"):
                self._k_loop(em, K, f.h, ka, kbn, k_rag)
                kmask = {f.h: "kmask_a"} if k_rag else {}
                ta = Tile(em, {f.t: t, f.h: ka[f.h]}, {f.t: "routed", **kmask})
                a_code, _ = ta.value(narrow_operand(f.a, em.dtype_of)[0])
                a_code = ta.emit(f"tl.broadcast_to({a_code}, (BLOCK_T, BLOCK_K))", "a_tile")  # one token: a row
                tb = Tile(em, {f.e: e, f.n: n, f.h: kbn[f.h]}, {f.n: "nmask", **({f.h: "kmask_b"} if k_rag else {})})
                b_gate = self.expert_weights(em, tb, f.b, operand)
                b_up = self.expert_weights(em, tb, substitute(f.b, {f.n: f.n + N}), operand)
                kb.place(ta.block)
                kb.place(tb.block)
                self._dot(em, "acc_gate", a_code, b_gate, operand, mp)
                self._dot(em, "acc_up", a_code, b_up, operand, mp)
            first = Access(f.stmt.name, (f.t, f.e, f.n))
            second = Access(f.stmt.name, (f.t, f.e, f.n + N))
            held = {first: "acc_gate", second: "acc_up"}
            tail = Tile(em, names, {f.t: "tmask", f.n: "nmask"}, held=lambda x: held.get(x))
            value, d = tail.value(act_expr, act.name)
            kb.place(tail.block)
            em.store(act, act_at, value, d, stmask)

        with kb.when(f"{em.ext(T)} <= BLOCK_T", "decode: the step's tokens are one block"):
            kb.assign(t, "tl.arange(0, BLOCK_T)[:, None]")
            kb.assign("tmask", f"{t} < {em.ext(T)}")
            routed_rows()
            with kb.when("busy > 0", "a token of the step routes to this expert"):
                gate_up_block()
            with kb.when("busy == 0", "no token routes here: the activations are 0"):
                em.store(act, act_at, "tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)", dt.f32, stmask)
        with kb.when(f"{em.ext(T)} > BLOCK_T", "prefill: the expert's tokens gathered into blocks (permutation by expert)"):
            kb.comment("the expert's routed tokens in token order, BLOCK_T at a time: its weight tiles are loaded once per")
            kb.comment("block of its own tokens, and only its rows are computed; act rows of other experts are never read")
            kb.assign("count", "tl.zeros([], dtype=tl.int32)")
            with kb.loop("t0", f"0, {em.ext(T)}, BLOCK_T"):
                kb.assign(t, "t0 + tl.arange(0, BLOCK_T)[:, None]")
                kb.assign("tmask", f"{t} < {em.ext(T)}")
                routed_rows()
                kb.assign("count", "count + busy")
            with kb.loop("c0", "0, count, BLOCK_T"):
                kb.assign("slot", "c0 + tl.arange(0, BLOCK_T)[None, :]")
                kb.assign("rows", "tl.zeros([BLOCK_T], dtype=tl.int32)")
                kb.assign("seen", "tl.zeros([], dtype=tl.int32)")
                # 16 tokens at a time: the [16, BLOCK_T] match stays in registers (a [BLOCK_T, BLOCK_T] one spills on sm_80)
                with kb.loop("t0", f"0, {em.ext(T)}, 16"):
                    kb.assign(t, "t0 + tl.arange(0, 16)[:, None]")
                    kb.assign("tmask", f"{t} < {em.ext(T)}")
                    routed_rows()
                    kb.assign("pos", "seen + tl.cumsum(routed.to(tl.int32), axis=0) - 1")  # rank among the expert's tokens
                    kb.assign("rows", f"rows + tl.sum(tl.where(routed & (pos == slot), {t}, 0), axis=0).to(tl.int32)")
                    kb.assign("seen", "seen + busy")
                kb.assign(t, "rows[:, None]")
                kb.assign("tmask", "(c0 + tl.arange(0, BLOCK_T)[:, None]) < count")
                kb.assign("routed", "tmask")
                gate_up_block()
        del n_rag
        bn = tiles["BLOCK_N"]
        return em.finish(mp, [E, ix.FloorDiv(N + bn - 1, bn)])

    def _emit_down(self, g: Group, mp: Mapping) -> KernelSpec:
        f = self._down(g)
        comb = g.role("combine")
        expr = combine_form(comb, f)
        if expr is None:
            raise Unsupported(f"{comb.name} is not a weighted sum over experts of {f.stmt.name}")
        if f.stmt.name in g.stored:
            raise Unsupported(f"{f.stmt.name} is read outside its MoE kernel")
        T, E, H = f.stmt.type.shape
        K = f.stmt.reduce.ranks[0][1]
        em = Emitter(g, {f.t: T, f.e: E, f.h: H, f.i: K})
        kb = em.kb
        tiles = dict(mp.tiles)
        operand = self._operand_dtype(g, f.a, f.b)
        names = em.rank_names([f.t, f.e, f.h])
        ka, kbn = em.rank_names([f.i], "_a"), em.rank_names([f.i], "_b")
        t, e, h = names[f.t], names[f.e], names[f.h]
        k_rag = em.ragged([f.i], tiles["BLOCK_K"])
        kb.comment("one program per (token block, hidden tile); experts no token of the block routes to load nothing")
        kb.assign(t, "tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]")
        kb.assign(h, "tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]")
        kb.assign("tmask", f"{t} < {em.ext(T)}")
        kb.assign("nmask", f"{h} < {em.ext(H)}")
        kb.assign("acc", "tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)")
        gate_expr = combine_gate(expr, f)
        with kb.loop(e, f"0, {em.ext(E)}"):
            gate = Tile(em, {f.t: t, f.e: e}, {f.t: "tmask"})
            gw_access = _strip(gate_expr)
            gw_code, _ = gate.value(gw_access)
            g_code, _ = gate.value(gate_expr)
            kb.place(gate.block)
            kb.assign("routed", f"tl.where(tmask, {g_code}, 0) != 0")  # a [BLOCK_T, 1] mask even for one token
            kb.assign("busy", "tl.sum(tl.sum(routed.to(tl.int32), axis=1), axis=0)")
            with kb.when("busy > 0", "a token of this block routes to this expert"):
                kb.assign("acc_down", "tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)")
                with kb.loop("k0", f"0, {em.ext(K)}, BLOCK_K"):
                    self._k_loop(em, K, f.i, ka, kbn, k_rag)
                    kmask = {f.i: "kmask_a"} if k_rag else {}
                    ta = Tile(em, {f.t: t, f.e: e, f.i: ka[f.i]}, {f.t: "routed", **kmask})
                    a_code, _ = ta.value(narrow_operand(f.a, em.dtype_of)[0])
                    a_code = ta.emit(f"tl.broadcast_to({a_code}, (BLOCK_T, BLOCK_K))", "a_tile")  # one token: a row
                    tb = Tile(em, {f.e: e, f.h: h, f.i: kbn[f.i]}, {f.h: "nmask", **({f.i: "kmask_b"} if k_rag else {})})
                    b_code = self.expert_weights(em, tb, f.b, operand)
                    kb.place(ta.block)
                    kb.place(tb.block)
                    self._dot(em, "acc_down", a_code, b_code, operand, mp)
                held = {Access(f.stmt.name, (f.t, f.e, f.h)): "acc_down", gw_access: gw_code}
                tail = Tile(em, names, {f.t: "tmask", f.h: "nmask"}, held=lambda x: held.get(x))
                value, _ = tail.value(expr, "weighted")
                kb.place(tail.block)
                kb.assign("acc", f"acc + tl.where(routed, {value}, 0.0)")
        em.store(comb, em.store_offset(names, comb.replace(index=(f.t, f.h))), "acc", dt.f32, "tmask & nmask")
        bt, bn = tiles["BLOCK_T"], tiles["BLOCK_N"]
        return em.finish(mp, [ix.FloorDiv(T + bt - 1, bt), ix.FloorDiv(H + bn - 1, bn)])

    # ---- reports
    def cost(self, g: Group, sizes: dict | None = None) -> Cost:
        """FLOPs and bytes with every expert active (the static upper bound); `detail` gives the bytes of
        one expert's weights in this kernel, which `expert_bytes` scales by a step's routing."""
        c = super().cost(g, sizes)
        w = next((a.tensor for a in (_strip(x) for x in mul_factors(
            (up_form(g.role("gate_up")).b if "gate_up" in g.kernel.roles else self._down(g).b)))
                  if isinstance(a, Access)), None)
        if w is not None:
            t = g.info.types[w]
            numel = sympy.sympify(t.numel()).xreplace({k: sympy.Integer(v) for k, v in (sizes or {}).items()})
            if numel.is_Integer:
                c.detail["bytes_per_expert"] = int(numel) * t.dtype.bits // 8 // int(t.shape[0])
                c.detail["experts"] = int(t.shape[0])
        return c

    def describe(self, m: Module, kernel) -> str | None:
        return f"{kernel.name}: MoE {'gate/up + SwiGLU' if 'gate_up' in kernel.roles else 'down + weighted combine'}"


MOE = register_kind(MoEKind())
