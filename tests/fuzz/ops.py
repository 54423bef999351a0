"""The op library and the hypothesis strategy `programs()`.

A program is built statement by statement by a `Builder`: each op below is one function `op(b)` that draws
what it needs through `b` (operands among the values computed so far or new inputs, dims, flags, scalars)
and proposes one Python expression with `b.emit(code)`. The builder runs the expression eagerly on example
inputs right away: a proposal eager rejects (a dtype or shape it does not accept) is dropped, and the values
it keeps give every later op exact shapes and dtypes. Draws are ordered so that hypothesis shrinks toward
small, plain programs (size 1, float32, no extra feature).
"""
from __future__ import annotations

import math
import re
import string
import warnings

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from .program import EPS, TOLERANCE, Input, Program, kind_of

MAX_NUMEL = 512  # per value: the Triton interpreter runs on CPU, so programs stay tiny
MAX_INPUT_NUMEL = 192
SIZES = (1, 2, 3, 4, 5, 7, 8, 16, 6, 11, 13, 17, 9)  # small, primes, non-powers of two; 0 is drawn apart
FLOAT_SCALARS = ("2.0", "0.5", "-1.5", "3.0", "0.1", "-0.25", "1e-3", "float('inf')")
INT_SCALARS = ("2", "1", "3", "-1", "0", "7")
DTYPES = ("float32", "float32", "float64", "bfloat16", "float16", "int64", "int32", "bool", "int8", "uint8", "int16")


class Recorder(TorchDispatchMode):
    """What eager computes while a statement runs: the dtype of every intermediate (a statement like
    `(x.float() * y).to(x.dtype)` computes in f32 whatever x is) and the length of every reduction that
    rounds (a max or an any does not)."""

    CONTRACT = {"mm": 0, "bmm": 0, "mv": 0, "dot": 0, "addmm": 1, "baddbmm": 1, "addmv": 1}  # operand with K last
    ROWS = {"sum", "mean", "prod", "var", "std", "var_mean", "std_mean", "logsumexp", "linalg_vector_norm", "norm"}

    def __init__(self):
        super().__init__()
        self.dtypes: set = set()
        self.reductions: list = []
        self.calls: set = set()  # "op:dtype,dtype" of every aten op (known issues match on them)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.dtypes.update(t.dtype for t in outs)
        name = func._opname
        ins = [str(a.dtype)[6:] for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        self.calls.add(f"{name}:{','.join(ins)}")
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name in self.CONTRACT:
            self.reductions.append(args[self.CONTRACT[name]].shape[-1])
        elif "scaled_dot_product" in name:
            self.reductions += [args[0].shape[-1], args[1].shape[-2]]
        elif name in ("_softmax", "_log_softmax", "cumsum") and x is not None and x.dim():
            self.reductions.append(x.shape[args[1]])
        elif name in ("native_layer_norm", "_fused_rms_norm", "rms_norm"):
            self.reductions.append(math.prod(args[1]))
        elif name in self.ROWS and x is not None and outs and x.numel():
            self.reductions.append(x.numel() // max(outs[0].numel(), 1))
        return out


class Builder:
    """The program under construction: draws (through hypothesis), example values, emission."""

    def __init__(self, draw, seed: int):
        self.draw = draw
        self.p = Program(seed=seed)
        self.vals: dict = {}  # name -> example value (eager, on the example inputs)
        self.holder = torch.nn.Module()  # the submodules, as `self` in the statements
        self.reductions: list = []  # lengths of the reductions the program performs
        self.dtypes: set = set()  # every dtype eager computes in (intermediates within a statement too)
        self.calls: set = set()  # every aten op eager runs, with its operands' dtypes ("add:bool,bool")
        self.sizes, self.allowed = SIZES, set(DTYPES)  # the swarm's palette (see `swarm`)

    # ---------------------------------------------------------------- draws
    def choice(self, seq):
        return self.draw(st.sampled_from(list(seq)))

    def int(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    def chance(self, pct: int) -> bool:
        """True with about `pct` percent probability; shrinks to False."""
        return self.draw(st.integers(0, 99)) >= 100 - pct

    def size(self, zero_pct: int = 2) -> int:
        return 0 if self.chance(zero_pct) else self.choice(self.sizes)

    def among(self, options):
        """One of `options` (sizes), leaving out 1 when the palette does."""
        return self.choice([n for n in options if n != 1 or 1 in self.sizes] or options)

    def shape(self, rank: int | None = None, cap: int = MAX_INPUT_NUMEL, zero_pct: int = 2) -> tuple:
        rank = self.choice((2, 1, 3, 0, 4)) if rank is None else rank
        dims = [self.size(zero_pct) for _ in range(rank)]
        while math.prod(dims) > cap:
            k = max(range(rank), key=lambda d: dims[d])
            dims[k] = max(1, dims[k] // 2)
        return tuple(dims)

    def dtype(self, kinds: str = "fib") -> str:
        table = [d for d in DTYPES if kind_of(getattr(torch, d)) in kinds]
        return self.choice([d for d in table if d in self.allowed] or table)

    def fdtype(self) -> str:
        return self.dtype("f")

    def scalar(self, kind: str) -> str:
        return self.choice(FLOAT_SCALARS if kind == "f" else ("True", "False") if kind == "b" else INT_SCALARS)

    # ---------------------------------------------------------------- values
    def new_input(self, shape, dtype: str, dist: str | None = None, low: int = 0, high: int = 0) -> str:
        k = len(self.p.inputs)
        if dist is None:
            kind = kind_of(getattr(torch, dtype))
            if kind == "b":
                dist = "bool"
            elif kind == "i":
                dist, (low, high) = "int", self.choice(((-5, 6), (0, 4), (1, 9), (-100, 100)))
                if dtype == "uint8":
                    low = max(low, 0)
            else:
                dist = "positive" if self.chance(15) else "normal"
        layout = "contiguous"
        if len(shape) >= 2 and self.chance(10):
            layout = "transposed"
        elif len(shape) >= 1 and self.chance(8):
            layout = "strided"
        name = f"{'i' if dist == 'index' else 'x'}{k}"
        inp = Input(name, tuple(shape), dtype, dist, low, high, layout)
        g = torch.Generator().manual_seed(1000 * self.p.seed + k)
        self.vals[name] = eval(inp.make(), {"torch": torch, "g": g})
        self.p.inputs.append(inp)
        return name

    def index_input(self, shape, high: int, low: int = 0) -> str:
        dtype = "int32" if self.chance(15) else "int64"
        return self.new_input(shape, dtype, "index", low, high)

    def names(self, pred=None) -> list:
        return [n for n, v in self.vals.items() if pred is None or pred(v)]

    def pick(self, kinds: str = "fib", pred=None, new_pct: int = 20, rank: int | None = None) -> str:
        """An existing value of a dtype kind in `kinds` (and `pred`), or a new input."""
        ok = self.names(lambda v: kind_of(v.dtype) in kinds and (pred is None or pred(v))
                        and (rank is None or v.dim() == rank))
        if ok and not self.chance(new_pct):
            return self.choice(ok)
        return self.new_input(self.shape(rank), self.dtype(kinds))

    def like(self, shape, dtype: str, reuse_pct: int = 40) -> str:
        """A value of exactly this shape and dtype: an existing one (maybe) or a new input."""
        ok = self.names(lambda v: tuple(v.shape) == tuple(shape) and str(v.dtype) == f"torch.{dtype}")
        if ok and self.chance(reuse_pct):
            return self.choice(ok)
        return self.new_input(shape, dtype)

    def emit(self, code: str) -> str | None:
        """Run `code` eagerly on the example values; keep it as a statement when eager accepts it."""
        env = {"torch": torch, "F": F, "self": self.holder, **self.vals}
        rec = Recorder()
        try:
            with torch.no_grad(), warnings.catch_warnings(), rec:
                warnings.simplefilter("ignore")
                val = eval(code, env)  # code an op of this module wrote
        except Exception:  # eager refuses it: not a program
            return None
        if not isinstance(val, torch.Tensor) or val.is_complex() or val.numel() > MAX_NUMEL:
            return None
        name = f"v{len(self.p.body)}"
        self.p.body.append((name, code))
        self.vals[name] = val.detach()
        self.dtypes |= rec.dtypes
        self.reductions += rec.reductions
        self.calls |= rec.calls
        return name

    def module(self, ctor: str) -> str:
        """A new submodule `self.m<k>` (removed again by `drop_module` when its statement is rejected)."""
        attr = f"m{len(self.p.modules)}"
        with torch.random.fork_rng():
            torch.manual_seed(self.p.seed + len(self.p.modules))
            setattr(self.holder, attr, eval(ctor, {"torch": torch}))
        self.p.modules.append((attr, ctor))
        return attr

    def drop_module(self, attr: str) -> None:
        delattr(self.holder, attr)
        self.p.modules = [(a, c) for a, c in self.p.modules if a != attr]

    def emit_with_module(self, ctor: str, code_of) -> str | None:
        attr = self.module(ctor)
        out = self.emit(code_of(f"self.{attr}"))
        if out is None:
            self.drop_module(attr)
        return out

    def v(self, name: str) -> torch.Tensor:
        return self.vals[name]

    def dim(self, x: str, negative: bool = True) -> int:
        n = self.v(x).dim()
        d = self.int(0, max(n - 1, 0))
        return d - n if negative and n and self.chance(30) else d


def _shape_code(shape) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _broadcasts_to(shape: tuple, target: tuple) -> bool:
    return len(shape) <= len(target) and all(n in (1, m) for n, m in zip(reversed(shape), reversed(target)))


def _broadcast_partner(b: Builder, shape: tuple) -> tuple:
    """A shape that broadcasts with `shape`: per dimension the same size, 1, or (where `shape` has 1) any."""
    out = []
    for n in shape:
        r = b.int(0, 9)
        out.append(n if r < 6 else 1 if r < 9 or n != 1 else b.size(0))
    if shape and b.chance(25):  # fewer dimensions (right-aligned)
        out = out[b.int(1, len(out)):]
    elif len(shape) < 4 and b.chance(10):  # more dimensions
        out = [b.among(SIZES[:5])] + out
    return tuple(out)


# ---------------------------------------------------------------- elementwise

UNARY = (("-{x}", "fi"), ("torch.abs({x})", "fi"), ("torch.exp({x})", "fib"), ("torch.log({x})", "f"),
         ("torch.log(torch.abs({x}) + 1)", "f"), ("torch.sqrt({x})", "fi"), ("torch.rsqrt({x})", "f"),
         ("torch.sin({x})", "fi"), ("torch.cos({x})", "f"), ("torch.tan({x})", "f"), ("torch.tanh({x})", "fi"),
         ("torch.sigmoid({x})", "fi"), ("torch.relu({x})", "fi"), ("F.silu({x})", "f"), ("F.gelu({x})", "f"),
         ("F.gelu({x}, approximate='tanh')", "f"), ("torch.erf({x})", "fi"), ("torch.floor({x})", "fi"),
         ("torch.ceil({x})", "fi"), ("torch.round({x})", "fi"), ("torch.trunc({x})", "f"), ("torch.sign({x})", "fi"),
         ("torch.reciprocal({x})", "fi"), ("torch.log1p(torch.abs({x}))", "f"), ("torch.expm1({x})", "f"),
         ("torch.exp2({x})", "fi"), ("torch.log2({x})", "fi"), ("torch.logical_not({x})", "fib"),
         ("torch.isnan({x})", "fi"), ("torch.isinf({x})", "fi"), ("torch.bitwise_not({x})", "ib"),
         ("torch.square({x})", "fi"), ("{x} ** 2", "fi"), ("{x} ** 0.5", "f"), ("F.softplus({x})", "f"),
         ("F.leaky_relu({x}, 0.1)", "f"), ("F.elu({x})", "f"), ("F.hardtanh({x})", "fi"), ("F.mish({x})", "f"),
         ("torch.nan_to_num(torch.log({x}))", "f"), ("F.relu6({x})", "f"), ("torch.frac({x})", "f"))


def op_unary(b: Builder):
    code, kinds = b.choice(UNARY)
    b.emit(code.format(x=b.pick(kinds)))


BINARY = (("{a} + {c}", "fib"), ("{a} - {c}", "fi"), ("{a} * {c}", "fib"), ("{a} / {c}", "fi"),
          ("torch.maximum({a}, {c})", "fib"), ("torch.minimum({a}, {c})", "fib"), ("torch.pow({a}, {c})", "f"),
          ("torch.remainder({a}, {c})", "fi"), ("torch.floor_divide({a}, {c})", "fi"), ("torch.atan2({a}, {c})", "f"),
          ("torch.add({a}, {c}, alpha=2)", "fi"), ("torch.sub({a}, {c}, alpha=0.5)", "f"),
          ("torch.div({a}, {c}, rounding_mode='floor')", "fi"), ("torch.div({a}, {c}, rounding_mode='trunc')", "fi"),
          ("torch.logical_and({a}, {c})", "fib"), ("torch.logical_or({a}, {c})", "fib"),
          ("torch.logical_xor({a}, {c})", "fib"), ("{a} & {c}", "ib"), ("{a} | {c}", "ib"), ("{a} ^ {c}", "ib"),
          ("torch.fmax({a}, {c})", "f"), ("torch.fmin({a}, {c})", "f"), ("{a} % {c}", "fi"), ("{a} // {c}", "fi"))
COMPARE = ("==", "!=", "<", "<=", ">", ">=")


def _second(b: Builder, a: str, kinds: str) -> str:
    """The other operand of a binary op: a Python scalar, or a tensor of a broadcast-compatible shape
    (often the same shape and dtype; sometimes another dtype, so type promotion is exercised)."""
    x = b.v(a)
    if b.chance(25):
        return b.scalar(kind_of(x.dtype) if kind_of(x.dtype) in kinds else kinds[0])
    shape = tuple(x.shape) if b.int(0, 9) < 6 else _broadcast_partner(b, tuple(x.shape))
    dtype = str(x.dtype).replace("torch.", "")
    if b.chance(20):
        dtype = b.dtype(kinds)
    if b.chance(15) and tuple(x.shape) == shape:
        return a  # the same value on both sides
    return b.like(shape, dtype)


def op_binary(b: Builder):
    code, kinds = b.choice(BINARY)
    a = b.pick(kinds)
    c = _second(b, a, kinds)
    if b.chance(20):
        a, c = c, a
    b.emit(code.format(a=a, c=c))


def op_compare(b: Builder):
    a = b.pick("fib")
    b.emit(f"{a} {b.choice(COMPARE)} {_second(b, a, 'fi')}")


def op_where(b: Builder):
    form = b.int(0, 3)
    a = b.pick("fi")
    x = b.v(a)
    if form == 3:  # clamp: scalars or a tensor bound
        if b.chance(30):
            b.emit(f"torch.clamp({a}, min={b.like(tuple(x.shape), str(x.dtype)[6:])})")
        else:
            lo, hi = sorted(b.choice((-2, -1, 0, 1, 2)) for _ in range(2))
            b.emit(f"torch.clamp({a}, min={lo}, max={hi})" if b.chance(60) else f"torch.clamp({a}, min={lo})")
        return
    conds = b.names(lambda v: v.dtype == torch.bool and _broadcasts_to(tuple(v.shape), tuple(x.shape)))
    cond = b.choice(conds) if conds and b.chance(60) else None
    if cond is None:
        cond = b.emit(f"{a} > {b.scalar('f' if x.dtype.is_floating_point else 'i')}")
        if cond is None:
            return
    if form == 2:
        fill = b.choice(("0.0", "float('-inf')", "-1e4", "1")) if x.dtype.is_floating_point else b.scalar("i")
        b.emit(f"{a}.masked_fill({cond}, {fill})")
    else:
        other = _second(b, a, "fi")
        b.emit(f"torch.where({cond}, {a}, {other})" if form == 0 else f"torch.where({cond}, {other}, {a})")


def op_cast(b: Builder):
    a = b.pick()
    x = b.v(a)
    to = b.dtype()
    if x.dtype.is_floating_point and not getattr(torch, to).is_floating_point and to != "bool":
        lo = 0 if to == "uint8" else -100  # float -> int of a value the int cannot hold is undefined in C++
        b.emit(f"torch.nan_to_num({a}).clamp({lo}, 100).to(torch.{to})")
    else:
        b.emit(f"{a}.to(torch.{to})" if b.chance(80) else
               {"float32": f"{a}.float()", "float64": f"{a}.double()", "float16": f"{a}.half()",
                "bool": f"{a}.bool()", "int64": f"{a}.long()", "int32": f"{a}.int()"}.get(to, f"{a}.to(torch.{to})"))


# ---------------------------------------------------------------- reductions

REDUCE = (("torch.sum", "fib"), ("torch.mean", "f"), ("torch.amax", "fi"), ("torch.amin", "fi"),
          ("torch.prod", "fi"), ("torch.any", "fib"), ("torch.all", "fib"), ("torch.logsumexp", "f"),
          ("torch.var", "f"), ("torch.std", "f"), ("torch.argmax", "fi"), ("torch.argmin", "fi"),
          ("max.values", "fi"), ("max.indices", "fi"), ("min.values", "fi"), ("torch.cumsum", "fi"),
          ("torch.linalg.vector_norm", "f"))


DIMWISE = ("torch.argmax", "torch.argmin", "torch.cumsum", "max.values", "max.indices", "min.values")


def op_reduce(b: Builder):
    fn, kinds = b.choice(REDUCE)
    a = b.pick(kinds, pred=lambda v: v.dim() >= 1)
    x = b.v(a)
    if x.dim() == 0:
        b.emit(f"{a}.sum()")
        return
    keep = b.chance(40)
    if fn in DIMWISE:
        d = b.dim(a)
        if fn == "torch.cumsum":
            b.emit(f"torch.cumsum({a}, dim={d})")
        elif fn.startswith("torch."):
            b.emit(f"{fn}({a}, dim={d}, keepdim={keep})")
        else:
            op, part = fn.split(".")
            b.emit(f"{a}.{op}(dim={d}, keepdim={keep}).{part}")
        return
    if b.chance(15) and fn != "torch.logsumexp":  # over everything
        b.emit(f"{fn}({a})")
        return
    dims = sorted({b.dim(a, negative=False) for _ in range(b.int(1, min(2, x.dim())))})
    if fn == "torch.prod":
        dims = dims[:1]
    spec = str(dims[0] - x.dim() if b.chance(25) else dims[0]) if len(dims) == 1 else str(tuple(dims))
    extra = ""
    if fn == "torch.sum" and b.chance(15):
        extra = f", dtype=torch.{b.choice(('float64', 'float32', 'int64'))}"
    if fn in ("torch.var", "torch.std") and b.chance(50):
        extra = ", correction=0"
    b.emit(f"{fn}({a}, {spec}, keepdim={keep}{extra})")


# ---------------------------------------------------------------- contractions

def op_matmul(b: Builder):
    a = b.pick("f" if not b.chance(10) else "fi", pred=lambda v: v.dim() >= 1)
    x = b.v(a)
    if x.dim() == 0:
        return
    dtype, k = str(x.dtype)[6:], x.shape[-1]
    form = b.int(0, 5)
    if form == 5 and x.dim() >= 2:  # x @ x^T: one value on both sides
        b.emit(f"{a} @ {a}.mT")
        return
    n = 1 if b.chance(15) and 1 in b.sizes else b.size(1)
    if form == 0 or x.dim() == 1:  # a matrix (or a vector) on the right
        other = b.like((k,) if b.chance(15) else (k, n), dtype)
    else:  # batched: the batch dims as they are or broadcast
        batch = tuple(x.shape[:-2])
        if batch and b.chance(30):
            batch = tuple(1 if b.chance(50) else d for d in batch)
        other = b.like(batch + (k, n), dtype)
    y = b.v(other)
    if form == 4 and x.dim() == 2 and y.dim() == 2:
        b.emit(f"torch.mm({a}, {other})")
    elif form == 3 and x.dim() == 3 and y.dim() == 3 and x.shape[0] == y.shape[0]:
        b.emit(f"torch.bmm({a}, {other})")
    elif form == 2 and x.dim() == 2 and y.dim() == 2:
        bias = b.like((y.shape[1],) if b.chance(50) else (x.shape[0], y.shape[1]), dtype)
        b.emit(f"torch.addmm({bias}, {a}, {other}" + (", beta=0.5, alpha=2.0)" if b.chance(30) else ")"))
    elif b.chance(20):
        b.emit(f"torch.matmul({other}.mT, {a}.mT)" if y.dim() >= 2 and x.dim() >= 2 else f"torch.matmul({a}, {other})")
    else:
        b.emit(f"{a} @ {other}")


def op_linear(b: Builder):
    a = b.pick("f", pred=lambda v: v.dim() >= 1)
    x = b.v(a)
    if x.dim() == 0:
        return
    k, dtype = x.shape[-1], str(x.dtype)[6:]
    n = 1 if b.chance(20) and 1 in b.sizes else b.size(1)
    bias = not b.chance(30)
    if b.chance(25):  # the weight as an input
        w = b.like((n, k), dtype)
        args = f"{a}, {w}" + (f", {b.like((n,), dtype)}" if bias else "")
        b.emit(f"F.linear({args})")
        return
    kw = "" if dtype == "float32" else f", dtype=torch.{dtype}"
    ctor = f"torch.nn.Linear({k}, {n}{'' if bias else ', bias=False'}{kw})"
    b.emit_with_module(ctor, lambda m: f"{m}({a})")


def op_einsum(b: Builder):
    """A random valid two-operand einsum: shared letters are batch or contracted, the output a permutation
    of some of the rest (a letter left out of the output is summed)."""
    a = b.pick("f", pred=lambda v: 1 <= v.dim() <= 3)
    x = b.v(a)
    if not 1 <= x.dim() <= 3:
        return
    letters = iter(string.ascii_lowercase)
    la = [next(letters) for _ in range(x.dim())]
    sizes = dict(zip(la, x.shape))
    lb, shape_b = [], []
    for l in la:
        if b.chance(50):
            lb.append(l)
            shape_b.append(sizes[l])
    for _ in range(b.int(0 if lb else 1, 2)):
        l = next(letters)
        lb.append(l)
        sizes[l] = b.size(0)
        shape_b.append(sizes[l])
    perm = b.draw(st.permutations(list(range(len(lb)))))
    lb, shape_b = [lb[p] for p in perm], [shape_b[p] for p in perm]
    if math.prod(shape_b) > MAX_INPUT_NUMEL:
        return
    other = b.like(tuple(shape_b), str(x.dtype)[6:])
    pool = list(dict.fromkeys(la + lb))
    out = [l for l in pool if l not in (set(la) & set(lb)) or b.chance(40)]
    out = [out[p] for p in b.draw(st.permutations(list(range(len(out)))))]
    b.emit(f"torch.einsum('{''.join(la)},{''.join(lb)}->{''.join(out)}', {a}, {other})")


# ---------------------------------------------------------------- views and data movement

def _factor(b: Builder, n: int) -> tuple:
    """A random shape with `n` elements (rank 1..4)."""
    if n == 0:
        return b.choice(((0,), (0, 3), (2, 0)))
    dims, rest = [], n
    for _ in range(b.int(0, 3)):
        divs = [d for d in range(2, rest + 1) if rest % d == 0]
        if not divs:
            break
        d = b.choice(divs)
        dims.append(d)
        rest //= d
    dims.append(rest)
    if b.chance(20):
        dims.insert(b.int(0, len(dims)), 1)
    perm = b.draw(st.permutations(list(range(len(dims)))))
    return tuple(dims[p] for p in perm)


def _reshape(b, a, x):
    shape = list(_factor(b, x.numel()))
    if x.numel() and b.chance(30):
        shape[b.int(0, len(shape) - 1)] = -1
    return f"{a}.{'reshape' if b.chance(60) else 'view'}{_shape_code(shape)}"


def _permute(b, a, x):
    if b.chance(30):
        return f"{a}.transpose({b.dim(a)}, {b.dim(a)})" if b.chance(70) else f"{a}.mT"
    return f"{a}.permute{_shape_code(b.draw(st.permutations(list(range(x.dim())))))}"


def _unsqueeze(b, a, x):
    return f"{a}.unsqueeze({b.int(-x.dim() - 1, x.dim())})" if b.chance(70) else f"{a}[None]"


def _squeeze(b, a, x):
    return f"{a}.squeeze({list(x.shape).index(1)})" if b.chance(60) else f"{a}.squeeze()"


def _expand(b, a, x):
    """Size-1 dims grow (or stay, as -1), maybe a new leading dim."""
    shape = [b.choice((2, 3, 5)) if (n == 1 and b.chance(70)) else -1 if b.chance(30) else n for n in x.shape]
    if x.dim() < 4 and b.chance(40):
        shape = [b.choice((2, 3))] + shape
    return f"{a}.expand{_shape_code(shape)}" if b.chance(80) else f"torch.broadcast_to({a}, {_shape_code(shape)})"


def _slice(b, a, x):
    """A slice, maybe with a step or negative bounds; sometimes empty."""
    d = b.dim(a, negative=False)
    n = x.shape[d]
    start = b.int(-n, n) if n else 0
    stop = b.choice((None, n, b.int(-n, n) if n else 0))
    step = b.choice((1, 1, 2, 3))
    part = f"{start}:{'' if stop is None else stop}{'' if step == 1 else f':{step}'}"
    if d == x.dim() - 1 and d and b.chance(50):
        return f"{a}[..., {part}]"
    return f"{a}[{', '.join([':'] * d + [part])}]"


def _narrow_select(b, a, x):
    d = b.dim(a)
    n = x.shape[d]
    if b.chance(50) and n:
        i = b.int(-n, n - 1)
        return f"{a}.select({d}, {i})" if b.chance(50) else f"{a}[{', '.join([':'] * (d % x.dim()) + [str(i)])}]"
    start = b.int(0, n)
    return f"{a}.narrow({d}, {start}, {b.int(0, n - start)})"


def _flip(b, a, x):
    return f"torch.flip({a}, {_shape_code(sorted({b.dim(a) for _ in range(b.int(1, x.dim()))}))})"


def _repeat(b, a, x):
    reps = [b.choice((1, 1, 2, 3)) for _ in range(x.dim() + (1 if b.chance(30) else 0))] or [2]
    return f"{a}.repeat{_shape_code(reps)}"


def _flatten(b, a, x):
    if b.chance(30):
        return f"{a}.flatten()"
    s = b.int(0, x.dim() - 2)
    return f"{a}.flatten({s}, {b.int(s + 1, x.dim() - 1)})"


def _unflatten(b, a, x):
    return f"{a}.unflatten(-1, (2, {x.shape[-1] // 2}))"


def _copy(b, a, x):
    return f"{a}.contiguous()" if b.chance(50) else f"{a}.clone()"


def _triangle(b, a, x):
    return f"torch.{b.choice(('tril', 'triu'))}({a}, {b.int(-2, 2)})"


# (form, applies to) — the forms of op_view
VIEWS = ((_reshape, lambda x: True), (_permute, lambda x: x.dim() >= 2), (_unsqueeze, lambda x: True),
         (_squeeze, lambda x: 1 in x.shape), (_expand, lambda x: True), (_slice, lambda x: x.dim() >= 1),
         (_narrow_select, lambda x: x.dim() >= 1), (_flip, lambda x: x.dim() >= 1), (_repeat, lambda x: True),
         (_flatten, lambda x: x.dim() >= 2),
         (_unflatten, lambda x: x.dim() >= 1 and x.shape[-1] % 2 == 0 < x.shape[-1]),
         (_copy, lambda x: True), (_triangle, lambda x: x.dim() >= 2))


def op_view(b: Builder):
    """Views and data movement: reshape, permute/transpose, (un)squeeze, expand, slices, narrow/select, flip,
    repeat, flatten/unflatten, copies, tril/triu."""
    a = b.pick()
    x = b.v(a)
    form = b.choice([f for f, applies in VIEWS if applies(x)])
    b.emit(form(b, a, x))


def op_cat(b: Builder):
    a = b.pick(pred=lambda v: v.dim() >= 1)
    x = b.v(a)
    if x.dim() == 0:
        return
    dtype = str(x.dtype)[6:]
    if b.chance(35):  # stack: same shapes
        parts = [a] + [b.like(tuple(x.shape), dtype) for _ in range(b.int(1, 2))]
        b.emit(f"torch.stack([{', '.join(parts)}], dim={b.int(-x.dim() - 1, x.dim())})")
        return
    d = b.dim(a)
    parts = [a]
    for _ in range(b.int(1, 2)):
        shape = list(x.shape)
        shape[d] = b.among((1, 2, 3, 0, 5))
        parts.append(a if b.chance(15) else b.like(tuple(shape), dtype))
    perm = b.draw(st.permutations(list(range(len(parts)))))
    b.emit(f"torch.cat([{', '.join(parts[p] for p in perm)}], dim={d})")


def op_split(b: Builder):
    a = b.pick(pred=lambda v: v.dim() >= 1)
    x = b.v(a)
    if x.dim() == 0:
        return
    d = b.dim(a)
    n = x.shape[d]
    form = b.int(0, 2)
    if form == 0:
        size = b.int(1, max(n, 1))
        pieces = -(-n // size) if n else 1
        b.emit(f"torch.split({a}, {size}, dim={d})[{b.int(-pieces, pieces - 1)}]")
    elif form == 1:
        chunks = b.int(1, 4)
        k = len(torch.chunk(x, chunks, d))
        b.emit(f"{a}.chunk({chunks}, dim={d})[{b.int(0, k - 1)}]")
    elif n:
        b.emit(f"{a}.unbind({d})[{b.int(0, n - 1)}]")


# ---------------------------------------------------------------- normalization

def op_softmax(b: Builder):
    a = b.pick("f", pred=lambda v: v.dim() >= 1)
    x = b.v(a)
    d = b.dim(a) if x.dim() else 0
    fn = b.choice(("torch.softmax", "F.log_softmax", "F.softmax", "torch.log_softmax"))
    extra = f", dtype=torch.{b.choice(('float32', 'float64'))}" if b.chance(20) else ""
    b.emit(f"{fn}({a}, dim={d}{extra})")


def op_norm(b: Builder):
    a = b.pick("f", pred=lambda v: v.dim() >= 1)
    x = b.v(a)
    if x.dim() == 0:
        return
    dtype = str(x.dtype)[6:]
    kw = "" if dtype == "float32" else f", dtype=torch.{dtype}"
    k = b.int(1, min(2, x.dim()))
    shape = tuple(x.shape[-k:])
    eps = b.choice(("1e-5", "1e-6", "0.1"))
    form = b.int(0, 4)
    if form == 0:
        affine = "" if b.chance(70) else ", elementwise_affine=False" if b.chance(50) else ", bias=False"
        b.emit_with_module(f"torch.nn.LayerNorm({_shape_code(shape)}, eps={eps}{affine}{kw})", lambda m: f"{m}({a})")
    elif form == 1:
        b.emit(f"F.layer_norm({a}, {_shape_code(shape)}, eps={eps})")
    elif form == 2:
        b.emit_with_module(f"torch.nn.RMSNorm({_shape_code(shape)}, eps={eps}{kw})", lambda m: f"{m}({a})")
    elif form == 3:  # the Llama way: in f32, back to the input's dtype
        b.emit(f"({a}.float() * torch.rsqrt({a}.float().pow(2).mean(-1, keepdim=True) + {eps})).to({a}.dtype)")
    else:
        b.emit(f"F.normalize({a}, dim=-1)")


# ---------------------------------------------------------------- attention

def op_attention(b: Builder):
    """scaled_dot_product_attention (masks: none, causal, boolean, additive, sliding window; GQA; one
    query row), or the same written out as matmul + softmax + matmul."""
    dtype = b.fdtype()
    batch = b.choice(((1,), (2,), (), (1, 2)) if 1 in b.sizes else ((2,), (), (3, 2)))
    hk = b.among((1, 2))
    h = hk * b.choice((1, 2))
    gqa = h != hk
    L, S = b.among((1, 2, 3, 5, 8, 4)), b.among((1, 3, 4, 7, 8, 2))
    E = b.among((4, 8, 1, 2, 16, 3))
    Ev = E if b.chance(80) else b.choice((2, 4, 5))
    lead = batch + (h,)
    q = b.like(lead + (L, E), dtype)
    k = b.like(batch + (hk, S, E), dtype)
    v = b.like(batch + (hk, S, Ev), dtype)
    mask = b.choice((0, 1, 2, 3, 4, 5, 1))
    extra = []
    if mask == 1:
        extra.append("is_causal=True")
    elif mask == 2:  # a boolean mask input (rows with no key give NaN, as in eager)
        extra.append(f"attn_mask={b.new_input((L, S) if b.chance(60) else lead[:-1] + (1, L, S), 'bool')}")
    elif mask == 3:  # additive
        extra.append(f"attn_mask={b.new_input((L, S) if b.chance(60) else lead + (L, S), dtype)}")
    elif mask == 4:  # sliding window, built from aranges in forward
        w = b.choice((1, 2, 3))
        m = b.emit(f"(torch.arange({L})[:, None] + {S - L} - torch.arange({S})[None, :]).clamp(min=0, max={w})"
                   f" < {w}" if b.chance(50) else
                   f"((torch.arange({L})[:, None] + {S - L} - torch.arange({S})[None, :]) >= 0) & "
                   f"((torch.arange({L})[:, None] + {S - L} - torch.arange({S})[None, :]) < {w})")
        if m is None:
            return
        extra.append(f"attn_mask={m}")
    elif mask == 5:  # additive: -inf where masked
        m = b.emit(f"torch.zeros({L}, {S}, dtype=torch.{dtype}).masked_fill("
                   f"torch.ones({L}, {S}, dtype=torch.bool).triu({b.int(1, 2)}), float('-inf'))")
        if m is None:
            return
        extra.append(f"attn_mask={m}")
    if gqa:
        extra.append("enable_gqa=True")
    if b.chance(25):
        extra.append(f"scale={b.choice(('0.5', '1.0', '0.125'))}")
    if b.chance(20) and not gqa and mask in (0, 1, 3, 5):  # written out
        scale = 1 / math.sqrt(E)
        bias = ""
        if mask == 1:
            bias = f".masked_fill(torch.ones({L}, {S}, dtype=torch.bool).triu(1), float('-inf'))"
        elif mask in (3, 5):
            bias = f" + {extra[0].split('=')[1]}"
        b.emit(f"torch.softmax(({q} @ {k}.mT) * {scale!r}{bias}, dim=-1) @ {v}")
        return
    b.emit(f"F.scaled_dot_product_attention({q}, {k}, {v}{''.join(', ' + e for e in extra)})")


def op_attention_block(b: Builder):
    """Self-attention as models write it: q, k, v projected from one (batch, tokens, features) value by Linear
    layers and split into heads (GQA: fewer k/v heads), maybe a rotary embedding (rotate_half: slices and a
    cat), SDPA (causal or not), heads merged back. Sequences of one token included (a decoder's step)."""
    dtype = b.fdtype()
    x = b.pick("f", pred=lambda v: v.dim() == 3 and v.shape[-1] > 0 and v.numel() > 0, new_pct=50, rank=3)
    if b.v(x).dim() != 3 or b.chance(50):
        x = b.new_input((b.among((1, 2)), b.among((1, 2, 3, 5, 8)), b.choice((8, 16, 6))), dtype)
    B, L, D = b.v(x).shape
    dtype = str(b.v(x).dtype)[6:]
    hk = b.among((1, 2))
    h = hk * b.choice((1, 2))
    E = b.among((4, 2, 8, 1))
    kw = "" if dtype == "float32" else f", dtype=torch.{dtype}"
    bias = "" if b.chance(50) else ", bias=False"
    qkv = []
    for n in (h, hk, hk):
        m = b.module(f"torch.nn.Linear({D}, {n * E}{bias}{kw})")
        qkv.append(b.emit(f"self.{m}({x}).view({B}, {L}, {n}, {E}).transpose(1, 2)"))
        if qkv[-1] is None:
            b.drop_module(m)
            return
    q, k, v = qkv
    if E % 2 == 0 and b.chance(50):  # rotary: x * cos + rotate_half(x) * sin
        cos, sin = b.new_input((L, E), dtype), b.new_input((L, E), dtype)
        half = E // 2
        q, k = (b.emit(f"{t} * {cos} + torch.cat((-{t}[..., {half}:], {t}[..., :{half}]), dim=-1) * {sin}")
                for t in (q, k))
        if q is None or k is None:
            return
    gqa = ""
    if h != hk and b.chance(50):  # GQA as Hugging Face's repeat_kv writes it: expand + reshape
        k, v = (b.emit(f"{t}[:, :, None].expand({B}, {hk}, {h // hk}, {L}, {E}).reshape({B}, {h}, {L}, {E})")
                for t in (k, v))
        if k is None or v is None:
            return
    elif h != hk:
        gqa = ", enable_gqa=True"
    causal = ", is_causal=True" if b.chance(50) else ""
    b.emit(f"F.scaled_dot_product_attention({q}, {k}, {v}{causal}{gqa}).transpose(1, 2).reshape({B}, {L}, {h * E})")


# ---------------------------------------------------------------- gathers

def op_gather(b: Builder):
    form = b.int(0, 4)
    if form == 0:  # an embedding table
        vocab, dim = b.among((5, 16, 3, 1, 7)), b.among((4, 8, 3, 1))
        ids = b.index_input(b.shape(b.choice((1, 2)), cap=16), vocab)
        dtype = b.fdtype()
        kw = "" if dtype == "float32" else f", dtype=torch.{dtype}"
        b.emit_with_module(f"torch.nn.Embedding({vocab}, {dim}{kw})", lambda m: f"{m}({ids})")
        return
    a = b.pick(pred=lambda v: v.dim() >= 1 and v.numel() > 0)
    x = b.v(a)
    if x.dim() == 0 or x.numel() == 0:
        return
    d = b.dim(a, negative=False)
    n = x.shape[d]
    if form == 1:  # advanced indexing: negative positions wrap
        idx = b.index_input(b.shape(b.choice((1, 2)), cap=12), n, -n)
        pre = ":, " * d
        if b.chance(25) and x.dim() >= d + 2:  # two index tensors, broadcast together
            m = x.shape[d + 1]
            j = b.index_input(tuple(b.v(idx).shape[-1:]), m)
            b.emit(f"{a}[{pre}{idx}, {j}]")
        else:
            b.emit(f"{a}[{pre}{idx}]")
    elif form == 2:
        idx = b.index_input((b.among((1, 2, 3, 5)),), n)
        b.emit(f"torch.index_select({a}, {d}, {idx})")
    elif form == 3:  # gather: an index no larger than the input in the other dimensions
        shape = tuple(b.int(1, s) if s else 0 for s in x.shape)
        shape = shape[:d] + (b.among((1, 2, 3, 4)),) + shape[d + 1:]
        if math.prod(shape) > 64:
            return
        idx = b.index_input(shape, n)
        b.emit(f"torch.gather({a}, {d}, {idx})")
    else:  # a constant index list
        pos = [b.int(-n, n - 1) for _ in range(b.int(1, 3))]
        b.emit(f"{a}[{':, ' * d}{pos}]")


# ---------------------------------------------------------------- factories

def op_factory(b: Builder):
    a = b.pick(pred=lambda v: v.dim() >= 1)
    x = b.v(a)
    form = b.int(0, 3)
    if form == 0 and x.dim():
        n = x.shape[-1]
        b.emit(f"{a} + torch.arange({n}" + (f", dtype=torch.{b.fdtype()})" if b.chance(40) else ")"))
    elif form == 1:
        b.emit(f"torch.full_like({a}, {b.choice(('2.5', '-1', '0'))})" if b.chance(50) else
               f"{a} * torch.ones_like({a})")
    elif form == 2:
        shape = tuple(x.shape)
        b.emit(f"{a} - torch.{b.choice(('zeros', 'ones'))}{_shape_code(shape) if shape else '(())'}")
    else:
        b.emit(f"torch.arange({b.choice((1, 4, 7))}, {b.choice((-3, 0))}, -1) * {a}.sum()")


# ---------------------------------------------------------------- programs

OPS = (op_unary, op_binary, op_compare, op_where, op_cast, op_reduce, op_matmul, op_linear, op_einsum, op_view,
       op_cat, op_split, op_softmax, op_norm, op_attention, op_attention_block, op_gather, op_factory)


def _aliasing(b: Builder) -> None:
    """Sometimes let inputs share storage at compile time: one tensor passed twice, or overlapping views."""
    if not b.chance(30):
        return
    groups: dict = {}
    for i in b.p.inputs:
        groups.setdefault((i.dtype, i.dist, i.low, i.high), []).append(i)
    candidates = [g for g in groups.values() if len(g) >= 2]
    if not candidates:
        return
    group = b.choice(candidates)
    members = group[:2] if len(group) == 2 or b.chance(70) else group[:3]
    same = all(m.shape == members[0].shape for m in members) and not b.chance(25)
    if same:
        b.p.shared.append([(m.name, 0) for m in members])
    else:
        b.p.shared.append([(m.name, b.int(0, max(m.numel, 1))) for m in members])


def _outputs(b: Builder) -> None:
    """The last value and maybe others (inputs too, the same one twice); and every statement that reads an
    index input: eager raises for an out-of-range index only where the gather runs, and a compiler may drop
    a gather whose result nothing reads (as dead code elimination does), so those results are returned."""
    last = b.p.body[-1][0] if b.p.body else b.p.inputs[-1].name
    outs = [last]
    for _ in range(b.int(0, 2)):
        outs.append(b.choice(list(b.vals)))
    index = {i.name for i in b.p.inputs if i.dist == "index"}
    for name, code in b.p.body:
        if index & set(re.findall(r"\b[a-z]\d+\b", code)) and name not in outs:
            outs.append(name)
    b.p.outputs = outs


def _meta(b: Builder) -> dict:
    dtypes = b.dtypes | {v.dtype for v in b.vals.values()}
    floats = {str(d)[6:] for d in dtypes if d.is_floating_point and str(d)[6:] in TOLERANCE}
    loosest = max(floats, key=lambda d: TOLERANCE[d]) if floats else "float64"
    return {"loosest": loosest, "eps": EPS[loosest], "reductions": list(b.reductions), "aten": sorted(b.calls)}


def swarm(b: Builder, ops) -> list:
    """Swarm testing: each program draws a palette — some op families, sizes without 1, some dtypes — so
    that programs also avoid a feature entirely (a bug that every size-1 dimension triggers would otherwise
    mask the rest). Shrinks to the full palette."""
    enabled = [op for op in ops if not b.chance(35)] or list(ops)
    if b.chance(30):
        b.sizes = tuple(n for n in SIZES if n != 1)
    if b.chance(30):
        b.allowed = {"float32"} | {d for d in DTYPES if not b.chance(50)}
    return enabled


@st.composite
def programs(draw, max_statements: int = 6, ops=OPS):
    """A random program: 1..max_statements ops over a couple of inputs (more appear as ops need them)."""
    seed = draw(st.integers(0, 2 ** 16))
    with torch.random.fork_rng():
        b = Builder(draw, seed)
        enabled = swarm(b, ops)
        b.new_input(b.shape(), b.dtype("f") if b.chance(80) else b.dtype())
        used = []
        for _ in range(draw(st.integers(1, max_statements))):
            op = b.choice(enabled)
            before = len(b.p.body)
            op(b)
            used += [op.__name__] * (len(b.p.body) - before)
        if not b.p.body:  # every proposal was rejected: one op that always applies
            b.emit(f"{b.p.inputs[0].name} * 2")
        _aliasing(b)
        _outputs(b)
        b.p.meta = {**_meta(b), "ops": used}
    return b.p


