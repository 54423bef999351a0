"""The reference evaluator: runs any IR module with plain torch ops. It is the oracle for every pass.

Values are *labelled tensors*: a torch tensor plus the rank symbol of each of its dimensions, so an
expression is computed only over the ranks it uses and broadcasting lines ranks up by name.
Contractions (a sum over a product) go through `torch.einsum`; iterative ranks run as a loop.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import sympy
import torch

from . import dtypes as dt
from . import index as ix
from .contraction import peel_invariant
from .expr import Access, Call, Const, Expr, IndexValue, substitute
from .module import Module, Opaque, Statement, TensorRef, TensorType, Update
from .ops import MAP_OPS, REDUCE_OPS, infer

_MATERIALIZE_LIMIT = 1 << 26  # elements; a reduction over a bigger space is evaluated in chunks


class EvaluationError(RuntimeError):
    """A module that cannot run on the given inputs; the message names the statement."""


@dataclass
class LT:
    """A labelled tensor: `t.dim() == len(ranks)`; dimension d belongs to rank `ranks[d]`."""

    t: torch.Tensor
    ranks: tuple

    def to(self, ranks: tuple) -> torch.Tensor:
        """This tensor laid out over `ranks` (a superset), missing ranks as size-1 dims."""
        perm = [self.ranks.index(r) for r in ranks if r in self.ranks]
        t = self.t.permute(perm) if perm != list(range(len(perm))) else self.t
        shape = [self.t.shape[self.ranks.index(r)] if r in self.ranks else 1 for r in ranks]
        return t.reshape(shape)


def _union(lts) -> tuple:
    out: list = []
    for lt in lts:
        out += [r for r in lt.ranks if r not in out]
    return tuple(out)


def resolve_target(target: str):
    """The callable an opaque call names: `aten.op.overload` under torch.ops, or `module:qualname`."""
    if ":" in target:
        mod, _, qual = target.partition(":")
        obj = importlib.import_module(mod)
    else:
        obj, qual = torch.ops, target
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def unpack(t: torch.Tensor, d: dt.DType) -> torch.Tensor:
    """Packed storage (two 4-bit values per byte, low nibble first) -> one value per element."""
    lo, hi = t & 0xF, (t >> 4) & 0xF
    out = torch.stack([lo, hi], dim=-1).reshape(*t.shape[:-1], t.shape[-1] * 2)
    if d.signed:
        out = out.to(torch.int8)
        out = torch.where(out >= 8, out - 16, out)
    return out


WEAK_TORCH = {"bool": torch.bool, "int": torch.int64, "float": torch.float64}


def literal_tensor(v) -> torch.Tensor:
    """A literal as a 0-dim tensor; a float keeps double precision, as the Python scalar it stands for."""
    return torch.tensor(v, dtype=torch.float64) if isinstance(v, float) else torch.tensor(v)


def apply_call(e: Call, ts: list, dtype: dt.DType, weak: bool) -> torch.Tensor:
    """`e` on evaluated operands; a weak (literal-only) result keeps Python's precision, like a Python scalar."""
    want = WEAK_TORCH[dtype.category] if weak else dtype.torch
    if e.op == "cast":
        out = ts[0].to(e.attr.torch)
    else:
        op = MAP_OPS[e.op]
        if weak and op.rule == "float":
            ts = [t if t.is_floating_point() else t.double() for t in ts]
        out = op.torch_fn(*ts)
    return out if out.dtype == want else out.to(want)


class _StatementEval:
    """Evaluates one statement's expression over its ranks."""

    def __init__(self, env: dict, types: dict, extents: dict, sizes: dict, where: str):
        self.env, self.types, self.extents, self.sizes, self.where = env, types, extents, sizes, where
        self._dtype = lambda name: types[name].dtype

    def index(self, e: sympy.Expr) -> LT:
        e = sympy.sympify(e).xreplace(self.sizes)
        if e.is_Integer:
            return LT(torch.tensor(int(e)), ())
        if isinstance(e, sympy.Symbol):
            if e not in self.extents:
                raise EvaluationError(f"{self.where}: index symbol {e} has no extent here")
            return LT(torch.arange(self.extents[e]), (e,))
        if isinstance(e, sympy.Pow) and e.args[1].is_Integer and e.args[1] >= 0:
            base = self.index(e.args[0])  # `i*i` is i**2 to sympy
            return LT(base.t ** int(e.args[1]), base.ranks)
        args = [self.index(a) for a in e.args]
        ranks = _union(args)
        ts = [a.to(ranks) for a in args]
        if isinstance(e, sympy.Add):
            out = ts[0]
            for t in ts[1:]:
                out = out + t
        elif isinstance(e, sympy.Mul):
            out = ts[0]
            for t in ts[1:]:
                out = out * t
        elif isinstance(e, ix.FloorDiv):
            out = torch.div(ts[0], ts[1], rounding_mode="floor")
        elif isinstance(e, ix.Mod):
            out = torch.remainder(ts[0], ts[1])
        elif isinstance(e, sympy.Min):
            out = ts[0]
            for t in ts[1:]:
                out = torch.minimum(out, t)
        elif isinstance(e, sympy.Max):
            out = ts[0]
            for t in ts[1:]:
                out = torch.maximum(out, t)
        else:
            raise EvaluationError(f"{self.where}: cannot evaluate index expression {e}")
        return LT(out, ranks)

    def value(self, e: Expr) -> LT:
        if isinstance(e, Const):
            return LT(literal_tensor(e.value), ())
        if isinstance(e, IndexValue):
            return self.index(e.expr)
        if isinstance(e, Access):
            return self.access(e)
        if isinstance(e, Call):
            args = [self.value(a) for a in e.args]
            ranks = _union(args)
            ts = [a.to(ranks) for a in args]
            if e.op != "cast" and e.op not in MAP_OPS:
                raise EvaluationError(f"{self.where}: unknown map operator {e.op!r}")
            return LT(apply_call(e, ts, *infer(e, self._dtype)), ranks)
        raise EvaluationError(f"{self.where}: cannot evaluate {e!r}")

    def access(self, e: Access) -> LT:
        src = self.env.get(e.tensor)
        if src is None:
            raise EvaluationError(f"{self.where}: reads {e.tensor!r} before it is defined")
        if src.dim() != len(e.indices):
            raise EvaluationError(f"{self.where}: {e.tensor} has {src.dim()} dims, accessed with {len(e.indices)}")
        # Fast path: every position a distinct rank or a constant -> a view.
        if all(isinstance(p, sympy.Symbol) or (isinstance(p, sympy.Integer)) for p in e.indices):
            syms = [p for p in e.indices if isinstance(p, sympy.Symbol)]
            if len(set(syms)) == len(syms) and all(
                    p in self.extents and self.extents[p] <= src.shape[d]
                    for d, p in enumerate(e.indices) if isinstance(p, sympy.Symbol)):
                sel = tuple(slice(0, self.extents[p]) if isinstance(p, sympy.Symbol) else int(p) for p in e.indices)
                return LT(src[sel], tuple(syms))
        idx = []
        for d, p in enumerate(e.indices):
            if isinstance(p, Expr):
                lt = self.value(p)
            else:
                lt = self.index(p)
                lt = LT(lt.t.clamp(0, src.shape[d] - 1), lt.ranks)  # lanes a where() discards may stray
            idx.append(lt)
        ranks = _union(idx)
        return LT(src[tuple(i.to(ranks).long() for i in idx)], ranks)


def _factors(e: Expr) -> list[Expr]:
    if isinstance(e, Call) and e.op == "mul":
        return _factors(e.args[0]) + _factors(e.args[1])
    return [e]


def _einsum(ev: _StatementEval, factors: list[Expr], out_ranks: tuple, dtype: torch.dtype) -> torch.Tensor:
    """sum over reduce ranks of a product, as one einsum (the way a matmul is computed)."""
    scalar = None
    ops = []
    for f in factors:
        lt = ev.value(f)
        if not lt.ranks:
            scalar = lt.t if scalar is None else scalar * lt.t
        else:
            ops.append(lt)
    letters = {}
    for lt in ops:
        for r in lt.ranks:
            letters.setdefault(r, chr(ord("a") + len(letters)))
    present = [r for r in out_ranks if r in letters]
    spec = ",".join("".join(letters[r] for r in lt.ranks) for lt in ops) + "->" + "".join(letters[r] for r in present)
    # a product of scalars only (`sum[r:4] c[]`) has no einsum operand: it is the scalar times the extents
    out = torch.einsum(spec, *[lt.t.to(dtype) for lt in ops]) if ops else torch.ones((), dtype=dtype)
    if scalar is not None:
        out = out * scalar.to(dtype)
    # Reduce ranks no factor uses multiply the result by their extent.
    for r, n in ev.extents.items():
        if r not in letters and r not in out_ranks:
            out = out * n
    return LT(out, tuple(present)).to(out_ranks)


def _reduce_materialized(ev: _StatementEval, s: Statement, out_ranks: tuple, red_ranks: tuple) -> torch.Tensor:
    op = REDUCE_OPS[s.reduce.op]
    lt = ev.value(s.expr)
    all_ranks = out_ranks + red_ranks
    t = lt.to(all_ranks)
    shape = [ev.extents[r] for r in all_ranks]
    t = t.expand(shape)
    if op.name == "sum" and t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()  # accumulate low-precision sums in f32, as kernels do
    dims = list(range(len(out_ranks), len(all_ranks)))
    return op.torch_fn(t, dims)


def _statement(s: Statement, env: dict, types: dict, sizes: dict) -> torch.Tensor:
    where = f"statement {s.name!r}" + (f" ({s.loc})" if s.loc else "")
    extents = {r: int(sympy.sympify(n).xreplace(sizes)) for r, n in s.ranks().items()}
    ev = _StatementEval(env, types, extents, sizes, where)
    out_dtype = s.type.dtype.torch
    shape = s.type.concrete_shape({k: int(v) for k, v in sizes.items()})
    out_ranks = tuple(p for p in s.index if isinstance(p, sympy.Symbol))
    if s.iterate is not None:
        return _iterate(s, ev, env, shape, out_dtype)
    if s.reduce is None:
        t = ev.value(s.expr).to(out_ranks)
    else:
        red = tuple(r for r, _ in s.reduce.ranks)
        expr_dtype = infer(s.expr, ev._dtype)[0]
        if s.reduce.op == "sum" and expr_dtype.is_float and any(ev.extents[r] > 1 for r in red):
            acc = torch.float32 if expr_dtype.bits < 32 else expr_dtype.torch
            body, post = peel_invariant(s.expr, set(red))
            t = _einsum(ev, _factors(body), out_ranks, acc)
            for op, y in post:
                yt = ev.value(y).to(out_ranks)
                t = t * yt if op == "mul" else t / yt
        else:
            t = _reduce_materialized(ev, s, out_ranks, red)
    return t.to(out_dtype).expand(shape).contiguous()


def _iterate(s: Statement, ev: _StatementEval, env: dict, shape, out_dtype) -> torch.Tensor:
    it = s.iterate
    pos = next(d for d, p in enumerate(s.index) if not isinstance(p, sympy.Symbol))
    buf = torch.full(shape, it.init.value, dtype=out_dtype)
    env[s.name] = buf
    out_ranks = tuple(p for p in s.index if isinstance(p, sympy.Symbol))
    for step in range(ev.extents[it.rank]):
        e = substitute(s.expr, {it.rank: sympy.Integer(step)})
        val = ev.value(e).to(out_ranks).to(out_dtype)
        sel = [slice(None)] * len(shape)
        sel[pos] = step + 1
        buf[tuple(sel)] = val.expand([shape[d] for d in range(len(shape)) if d != pos])
    return buf


def run_opaque(o: Opaque, env: dict, sizes: dict):
    """Run an opaque call through torch, binding its outputs in `env` after checking their types."""
    where = f"opaque call {o.target}" + (f" ({o.loc})" if o.loc else "")

    def conv(v):
        if isinstance(v, TensorRef):
            return env[v.name]
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, sympy.Expr):
            return int(v.xreplace(sizes))
        return v

    try:
        fn = resolve_target(o.target)
        res = fn(*[conv(a) for a in o.args], **{k: conv(v) for k, v in o.kwargs})
    except Exception as exc:  # re-raised with the op named
        raise EvaluationError(f"{where} failed: {exc}") from exc
    outs = list(res) if isinstance(res, (tuple, list)) else [res]
    if len(outs) != len(o.outputs_typed):
        raise EvaluationError(f"{where}: returned {len(outs)} values, IR declares {len(o.outputs_typed)}")
    for (name, typ), t in zip(o.outputs_typed, outs):
        want = typ.concrete_shape({k: int(v) for k, v in sizes.items()})
        if tuple(t.shape) != want or t.dtype != typ.dtype.storage:
            raise EvaluationError(f"{where}: output {name} is {t.dtype}{list(t.shape)}, IR declares {typ}")
        env[name] = t


def bind_sizes(m: Module, inputs: dict) -> dict:
    """Values of symbolic sizes read off the shapes of the bound inputs."""
    sizes = {}
    for i in m.inputs:
        t = inputs.get(i.name)
        if t is None:
            continue
        for d, s in enumerate(i.type.shape):
            if isinstance(s, sympy.Symbol) and d < t.dim():
                sizes[s] = sympy.Integer(t.shape[d] * (i.type.dtype.per_byte if d == t.dim() - 1 else 1))
    return sizes


def check_inputs(m: Module, inputs: dict, sizes: dict) -> None:
    """Every input present with the declared dtype and shape, or an error naming it."""
    for i in m.inputs:
        if i.name not in inputs:
            raise EvaluationError(f"input {i.name!r} ({i.type.dtype}{list(i.type.shape)}) was not given")
        t = inputs[i.name]
        want = i.type.storage_shape({k: int(v) for k, v in sizes.items()})
        if tuple(t.shape) != want or t.dtype != i.type.dtype.storage:
            raise EvaluationError(
                f"input {i.name!r} is {t.dtype}{list(t.shape)} but the module expects "
                f"{i.type.dtype.storage}{list(want)}")


def evaluate(m: Module, inputs: dict, keep: bool = False) -> dict:
    """Run `m` on `inputs` (name -> tensor). Returns the outputs by name (every tensor if `keep`)."""
    sizes = bind_sizes(m, inputs)
    check_inputs(m, inputs, sizes)
    env = {}
    for i in m.inputs:
        t = inputs[i.name]
        env[i.name] = unpack(t, i.type.dtype) if i.type.dtype.packed else t
    types = m.types()
    last_use = m.last_uses() if not keep else {}
    for n, op in enumerate(m.body):
        if isinstance(op, Statement):
            env[op.name] = _statement(op, env, types, sizes)
        elif isinstance(op, Update):
            env[op.name] = run_update(op, env, types, sizes)
        else:
            run_opaque(op, env, sizes)
        for name in last_use.get(n, ()):
            env.pop(name, None)
    if keep:
        return env
    return {name: env[name] for name in m.outputs}


def run_update(u: Update, env: dict, types: dict, sizes: dict) -> torch.Tensor:
    """Write `u` into its target's buffer in place and return it (the new version is the same tensor). A
    point whose position falls outside the target (a padded block table entry, -1) writes nothing."""
    where = f"update {u.name!r}" + (f" ({u.loc})" if u.loc else "")
    target = env.get(u.target)
    if target is None:
        raise EvaluationError(f"{where}: writes into {u.target!r} before it is defined")
    extents = {r: int(sympy.sympify(n).xreplace(sizes)) for r, n in u.ranks}
    ev = _StatementEval(env, types, extents, sizes, where)
    ranks = tuple(r for r, _ in u.ranks)
    shape = [extents[r] for r in ranks]
    value = ev.value(u.expr).to(ranks).expand(shape).to(target.dtype)
    positions = [(ev.value(p) if isinstance(p, Expr) else ev.index(p)).to(ranks).expand(shape).long() for p in u.index]
    inside = torch.ones(shape, dtype=torch.bool, device=target.device)
    for d, pos in enumerate(positions):
        inside &= (pos >= 0) & (pos < target.shape[d])
    target.index_put_(tuple(pos[inside] for pos in positions), value[inside])
    return target


def random_inputs(m: Module, like: dict | None = None, seed: int = 0, sizes: dict | None = None) -> dict:
    """Fresh random inputs for `m`: normal floats, integers in the range seen in `like` (else [0, 2)).
    Params, buffers and consts are taken from `like` when given, since they are the model's weights."""
    g = torch.Generator().manual_seed(seed)
    like = like or {}
    hint = {k: int(v) for k, v in m.size_hints}
    hint.update({k: int(v) for k, v in (sizes or {}).items()})
    out = {}
    for i in m.inputs:
        ref = like.get(i.name)
        if ref is not None and i.kind != "in":
            out[i.name] = ref
            continue
        shape = i.type.storage_shape(hint) if ref is None else tuple(ref.shape)
        d = i.type.dtype
        if d.packed or d.category == "int":
            lo, hi = (0, 2) if ref is None or ref.numel() == 0 else (int(ref.min()), int(ref.max()) + 1)
            if d.packed:
                lo, hi = 0, 256
            out[i.name] = torch.randint(lo, max(hi, lo + 1), shape, generator=g, dtype=torch.int64).to(d.storage)
        elif d.category == "bool":
            out[i.name] = torch.rand(shape, generator=g) < 0.5
        else:
            out[i.name] = torch.randn(shape, generator=g, dtype=torch.float32).to(d.storage)
    return out


TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def max_rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (NaNs must match; integers and bools must be equal)."""
    if got.shape != want.shape:
        return float("inf")
    if not want.dtype.is_floating_point:
        return 0.0 if torch.equal(got, want) else float("inf")
    g, w = got.double(), want.double()
    if not torch.equal(torch.isnan(g), torch.isnan(w)):
        return float("inf")
    finite = ~torch.isnan(w)
    if not torch.equal(torch.isinf(g[finite]), torch.isinf(w[finite])):
        return float("inf")
    ok = finite & ~torch.isinf(w)
    if not ok.any():
        return 0.0
    scale = w[ok].abs().max().clamp_min(1e-30)
    return float((g[ok] - w[ok]).abs().max() / scale)


__all__ = ["TOLERANCE", "max_rel_error", "EvaluationError", "LT", "evaluate", "random_inputs", "resolve_target", "TensorType"]
