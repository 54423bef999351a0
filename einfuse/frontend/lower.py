"""FX graph (ATen after decompositions) -> IR module.

Every FX value becomes a *template*: an IR expression over placeholder ranks `_d0, _d1, ...` giving the
value at any index. Views, broadcasts, slices, concatenations and factories stay templates (index maps,
no data moves); compute ops emit one statement each, reading their operands' templates at the statement's
own ranks. Ops without a rule become opaque calls run by torch, and the report says which and why.
"""
from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from ..ir import dtypes as dt
from ..ir import index as ix
from ..ir.expr import Access, Call, Const, Expr, IndexValue, map_indices, substitute, walk
from ..ir.module import Input, Module, Opaque, Reduce, Statement, TensorRef, TensorType
from ..ir.ops import infer
from .blocks import Instantiator

OUT_RANKS = "ijklmnoq"
RED_RANKS = "rstuvw"
SMALL_CONSTANT = 8  # a constant tensor with at most this many elements becomes literals in the IR
_LITERAL_DTYPES = (torch.bool, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.float64,
                   torch.float32)  # those whose every value a literal holds exactly
SKIPPED = {"aten._assert_tensor_metadata.default", "aten._assert_scalar.default",
           "aten.sym_constrain_range_for_size.default", "aten._assert_async.msg"}


class Unsupported(Exception):
    """A rule cannot lower this node; the node becomes an opaque call and the reason is reported."""


def placeholder(d: int) -> sympy.Symbol:
    return ix.rank(f"_d{d}")


@dataclass(frozen=True)
class Tmpl:
    """A value as an expression over placeholder ranks `_d0.._d{n-1}`, with its shape and dtype."""

    expr: Expr
    shape: tuple
    dtype: dt.DType

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass
class LoweringReport:
    """What lowering did: node counts, and every op that fell back to torch with the reason."""

    total: int = 0
    lowered: int = 0
    fallbacks: dict = field(default_factory=lambda: collections.defaultdict(lambda: [0, ""]))
    capture: str = "torch.export"
    whole_graph_fallback: str | None = None
    notes: list = field(default_factory=list)  # recognitions that did not apply, and why

    @property
    def share(self) -> float:
        """Lowered nodes over all nodes; 0 when the whole graph fell back to eager PyTorch."""
        if self.whole_graph_fallback:
            return 0.0
        return self.lowered / self.total if self.total else 1.0

    def fallback(self, target: str, reason: str):
        entry = self.fallbacks[target]
        entry[0] += 1
        entry[1] = entry[1] or reason

    def text(self) -> str:
        lines = [f"captured with {self.capture}"]
        if self.whole_graph_fallback:
            lines.append(f"the whole model runs in eager PyTorch: {self.whole_graph_fallback}")
            return "\n".join(lines)
        lines.append(f"{self.lowered} of {self.total} graph nodes lowered to Einsums ({100 * self.share:.1f}%)")
        if self.fallbacks:
            lines.append("run by torch as opaque calls:")
            for target, (n, why) in sorted(self.fallbacks.items(), key=lambda kv: -kv[1][0]):
                lines.append(f"  {n:4d} x {target}: {why}")
        else:
            lines.append("no op fell back to torch")
        lines += self.notes
        return "\n".join(lines)


def source_loc(node: fx.Node) -> str | None:
    """`file.py:line` of the user's source that produced `node`, from its stack trace."""
    st = node.meta.get("stack_trace") or ""
    found = [f for f in re.findall(r'File "([^"]+)", line (\d+)', st) if not f[0].startswith("<")]
    if not found:
        return None
    path, line = found[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line}"


def torch_sympy(e) -> sympy.Expr:
    """A torch SymInt (or int) as an einfuse index expression over size symbols."""
    if isinstance(e, int):
        return sympy.Integer(e)
    if isinstance(e, torch.SymInt):
        e = e.node.expr
    e = sympy.sympify(e)
    repl = {}
    for a in sympy.preorder_traversal(e):
        name = type(a).__name__
        if isinstance(a, sympy.Symbol):
            repl[a] = ix.size(str(a))
        elif name in ("FloorDiv", "Mod", "PythonMod") and not isinstance(a, (ix.FloorDiv, ix.Mod)):
            repl[a] = None
    if any(v is None for v in repl.values()):
        e = _convert_funcs(e)
    return e.xreplace({k: v for k, v in repl.items() if v is not None})


def _convert_funcs(e):
    if e.is_Atom:
        return e
    args = [_convert_funcs(a) for a in e.args]
    name = type(e).__name__
    if name == "FloorDiv":
        return ix.FloorDiv(*args)
    if name in ("Mod", "PythonMod"):
        return ix.Mod(*args)
    return e.func(*args)


class Lowerer:
    """Walks an FX graph in order, keeping a template per node and emitting IR statements."""

    def __init__(self, gm: fx.GraphModule, kinds: dict, name: str):
        self.gm, self.kinds, self.name = gm, kinds, name
        self.values: dict = {}
        self.inputs: list[Input] = []
        self.body: list = []
        self.names: set = set()
        self.sizes: dict = {}
        self.report = LoweringReport()
        self.loc: str | None = None
        self.instantiate = True

    # ---------------------------------------------------------------- helpers for rules
    def fresh(self, base: str) -> str:
        name, n = base, 1
        while name in self.names:
            name, n = f"{base}_{n}", n + 1
        self.names.add(name)
        return name

    def shape(self, node_or_val) -> tuple:
        val = node_or_val.meta["val"] if isinstance(node_or_val, fx.Node) else node_or_val
        return tuple(torch_sympy(s) for s in val.shape)

    def dtype(self, node: fx.Node) -> dt.DType:
        return dt.from_torch(node.meta["val"].dtype)

    def int_arg(self, a):
        """A shape/size argument as a sympy integer expression (handles SymInt-producing nodes)."""
        if isinstance(a, fx.Node):
            v = self.values[a]
            if isinstance(v, Tmpl):
                raise Unsupported("a tensor used as a size")
            return sympy.sympify(v)
        if isinstance(a, torch.SymInt):
            return torch_sympy(a)
        return sympy.Integer(a) if isinstance(a, int) else a

    def tmpl(self, a) -> Tmpl:
        """The template of an argument: an FX node's value, or a Python scalar as a constant."""
        if isinstance(a, fx.Node):
            v = self.values[a]
            if not isinstance(v, Tmpl):
                if isinstance(v, sympy.Expr):
                    return Tmpl(IndexValue(v) if v.free_symbols else Const(int(v)), (), dt.i64)
                raise Unsupported(f"argument {a.name} is not a tensor")
            return v
        if isinstance(a, (bool, int, float)):
            return Tmpl(Const(a), (), dt.DEFAULT_FOR_CATEGORY[Const(a).category])
        if isinstance(a, torch.SymInt):
            return Tmpl(IndexValue(torch_sympy(a)), (), dt.i64)
        raise Unsupported(f"argument {a!r} is not a tensor or scalar")

    @staticmethod
    def at(t: Tmpl, idx) -> Expr:
        """The template's expression at the given index (sympy positions, or Exprs for gathers)."""
        if len(idx) != t.ndim:
            raise AssertionError(f"{len(idx)} indices for a rank-{t.ndim} value")
        if all(not isinstance(p, Expr) for p in idx):
            return substitute(t.expr, {placeholder(d): sympy.sympify(p) for d, p in enumerate(idx)})
        e = t.expr
        if isinstance(e, Access):
            where = {placeholder(d): p for d, p in enumerate(idx)}
            used = set().union(*[sympy.sympify(p).free_symbols for p in e.indices if not isinstance(p, Expr)])
            if any(isinstance(p, Expr) and placeholder(d) not in used for d, p in enumerate(idx)):
                raise _NeedsMaterialize()  # a gathered position the map drops (x.view(1)[i]): its range check stays
            pos = []
            for p in e.indices:
                if isinstance(p, sympy.Symbol) and p in where:
                    pos.append(where[p])
                elif isinstance(p, Expr) or not (sympy.sympify(p).free_symbols & set(where)):
                    pos.append(p)
                else:
                    raise _NeedsMaterialize()
            return Access(e.tensor, tuple(pos))
        raise _NeedsMaterialize()

    def broadcast_at(self, t: Tmpl, ranks: list, out_shape: tuple) -> Expr:
        """`t` read at `ranks` of a broadcast result of `out_shape` (numpy rules, right-aligned)."""
        off = len(out_shape) - t.ndim
        idx = []
        for d, n in enumerate(t.shape):
            r = ranks[off + d]
            idx.append(sympy.Integer(0) if (n == 1 and out_shape[off + d] != 1) else r)
        return self.at(t, idx)

    def cast(self, e: Expr, to: dt.DType) -> Expr:
        got, weak = infer(e, self._dtype_of)
        if weak and isinstance(e, Const) and type(e.value) is int and to.is_int and not to.packed:
            # eager converts a Python int to the tensor's type first, wrapping it (clamp(u8, min=-2) bounds
            # at 254); Triton refuses an unsigned tensor beside a negative literal, so fold the wrap here
            span = 1 << to.bits
            low = -(span >> 1) if to.signed else 0
            return Const((e.value - low) % span + low)
        return e if got == to or weak else Call("cast", (e,), to)

    def _dtype_of(self, name: str) -> dt.DType:
        return self._types[name].dtype

    # ---------------------------------------------------------------- emission
    def statement(self, base: str, shape: tuple, dtype: dt.DType, build, reduce_extents=(), reduce_op="sum",
                  lazy: bool = True) -> Tmpl:
        """Emit `base[ranks] = reduce_op[r...] build(ranks, rranks)` and return its template (with `lazy`,
        an access-free map stays an index map instead)."""
        ranks = [ix.rank(OUT_RANKS[d] if d < len(OUT_RANKS) else f"i{d}") for d in range(len(shape))]
        rranks = [ix.rank(RED_RANKS[d] if d < len(RED_RANKS) else f"r{d}") for d in range(len(reduce_extents))]
        expr = build(ranks, rranks)
        if lazy and not rranks and _access_free(expr):  # index arithmetic on aranges and constants stays an index map
            index_map = substitute(expr, {r: placeholder(d) for d, r in enumerate(ranks)})
            if infer(index_map, self._dtype_of)[0] != dtype:
                index_map = Call("cast", (index_map,), dtype)
            return Tmpl(index_map, tuple(shape), dtype)
        if not rranks and infer(expr, self._dtype_of)[0] != dtype:
            expr = Call("cast", (expr,), dtype)  # a reduction instead converts its accumulator at the end
        extents = {r: n for r, n in zip(ranks, shape)}
        extents.update(zip(rranks, reduce_extents))
        rng = {r: (sympy.Integer(0), sympy.sympify(n) - 1) for r, n in extents.items()}
        expr = map_indices(expr, lambda p: ix.simplify(p, rng))
        name = self.fresh(base)
        red = Reduce(reduce_op, tuple(zip(rranks, (sympy.sympify(n) for n in reduce_extents)))) if rranks else None
        st = Statement(name, TensorType(dtype, shape), tuple(ranks), expr, red, None, self.loc)
        self.body.append(st)
        self._types[name] = st.type
        return self.named(name, shape, dtype)

    @staticmethod
    def constant(value, shape: tuple, dtype: dt.DType) -> Tmpl:
        """`value` everywhere in a tensor of `shape` and `dtype` (a literal, cast when its own type differs)."""
        c = Const(value)
        expr = c if dt.DEFAULT_FOR_CATEGORY[c.category] == dtype else Call("cast", (c,), dtype)
        return Tmpl(expr, tuple(shape), dtype)

    def literal(self, val: torch.Tensor) -> Tmpl:
        """A small constant tensor as an index map: its values chosen by flat position, no input to bind."""
        shape = tuple(sympy.Integer(n) for n in val.shape)
        dtype = dt.from_torch(val.dtype)
        values = val.detach().cpu().flatten().tolist()
        pos = IndexValue(ix.flat_offset([placeholder(d) for d in range(val.dim())], shape))
        expr = self.constant(values[-1], shape, dtype).expr
        for k in reversed(range(len(values) - 1)):
            expr = Call("where", (Call("eq", (pos, Const(k))), self.constant(values[k], shape, dtype).expr, expr))
        return Tmpl(expr, shape, dtype)

    @staticmethod
    def named(name: str, shape: tuple, dtype: dt.DType) -> Tmpl:
        return Tmpl(Access(name, tuple(placeholder(d) for d in range(len(shape)))), tuple(shape), dtype)

    def materialize(self, t: Tmpl, base: str) -> str:
        """A tensor name holding `t`, emitting a copy statement when `t` is not already one."""
        e = t.expr
        if (isinstance(e, Access) and list(e.indices) == [placeholder(d) for d in range(t.ndim)]
                and tuple(self._types[e.tensor].shape) == tuple(t.shape)):  # not a leading part (x[:2], a split)
            return e.tensor
        return self.statement(base, t.shape, t.dtype, lambda rs, _: self.at(t, rs), lazy=False).expr.tensor

    def map(self, node: fx.Node, op: str, args: list, compute: dt.DType | None = None, attr=None) -> Tmpl:
        """An elementwise statement: operands broadcast to the node's shape and cast to `compute`."""
        shape, out = self.shape(node), self.dtype(node)
        ts = [self.tmpl(a) for a in args]
        compute = compute or out

        def build(rs, _):
            es = [self.cast(self.broadcast_at(t, rs, shape), compute) for t in ts]
            return Call(op, tuple(es), attr)

        return self.statement(node.name, shape, out, build)

    # ---------------------------------------------------------------- driver
    def run(self) -> "Lowered":
        from .aten_rules import RULES
        from .moe import find_experts, lower_experts

        self._types = {}
        experts, notes = find_experts(self.gm)
        self.report.notes += notes
        leaves: list = []
        blocks = Instantiator(self.gm) if self.instantiate else None
        skip: set = set()
        for node in self.gm.graph.nodes:
            if node in skip:
                continue
            self.loc = source_loc(node)
            if node.op == "placeholder":
                self.placeholder(node)
            elif node.op == "get_attr":
                self.get_attr(node)
            elif node.op == "output":
                leaves = self.outputs(node)
            elif node.op == "call_function":
                if blocks is not None and blocks.before(self, node):  # a repeated layer: its template, renamed
                    skip |= set(blocks.start[node].nodes)
                    continue
                position = len(self.body)
                call = experts.get(node)
                if call is None:
                    self.call(node, RULES)
                elif node is call.output:  # an experts module: its Einsums, once its output is reached
                    self.values[node] = lower_experts(self, call)
                if call is not None and _target_name(node.target) not in SKIPPED:
                    self.report.total += 1
                    self.report.lowered += 1
                if blocks is not None:
                    blocks.after(self, node, position)
            else:
                raise Unsupported(f"FX node kind {node.op!r} ({node.name})")
        size_syms = sorted(self.sizes, key=str)
        hints = tuple((s, self.sizes[s]) for s in size_syms if self.sizes[s] is not None)
        names = tuple(dict.fromkeys(v for k, v in leaves if k == "tensor"))
        m = Module(self.name, self.inputs, self.body, names, tuple(size_syms), hints)
        return Lowered(m, self.report, leaves, blocks.instances if blocks is not None else [])

    def note_type(self, name: str, t: TensorType) -> None:
        """A tensor defined outside a rule (an instantiated layer's statement)."""
        self._types[name] = t

    def placeholder(self, node: fx.Node):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            if isinstance(val, (int, torch.SymInt)):
                self.values[node] = torch_sympy(val)
                return
            raise Unsupported(f"input {node.name} is a {type(val).__name__}, not a tensor")
        shape = self.shape(node)
        for s, hint in zip(shape, val.shape):
            for sym in s.free_symbols:
                self.sizes.setdefault(sym, _hint(hint))
        t = TensorType(dt.from_torch(val.dtype), shape)
        name = self.fresh(node.name)
        self.inputs.append(Input(name, t, self.kinds.get(node.name, "in")))
        self._types[name] = t
        self.values[node] = self.named(name, shape, t.dtype)

    def get_attr(self, node: fx.Node):
        val = getattr(self.gm, node.target)
        if not isinstance(val, torch.Tensor):
            raise Unsupported(f"attribute {node.target} is not a tensor")
        if 0 < val.numel() <= SMALL_CONSTANT and val.dtype in _LITERAL_DTYPES:
            self.values[node] = self.literal(val)  # `x[..., [-2], :]` in forward: torch.compile's get_attr
            return
        node.meta.setdefault("val", val)
        self.kinds[node.name] = "const"
        self.placeholder(node)

    def outputs(self, node: fx.Node) -> list:
        """The graph's flat outputs: ("tensor", IR name) or ("value", a constant the graph returns)."""
        out = []
        for a in node.args[0]:
            if isinstance(a, fx.Node):
                v = self.values[a]
                if not isinstance(v, Tmpl):
                    raise Unsupported(f"output {a.name} is not a tensor")
                out.append(("tensor", self.materialize(v, a.name)))
            else:
                out.append(("value", a))
        return out

    def call(self, node: fx.Node, rules: dict):
        key = _target_name(node.target)
        if key in SKIPPED:
            return
        val = node.meta.get("val")
        if isinstance(val, (int, torch.SymInt)):  # size arithmetic: the value is its symbolic expression
            self.values[node] = torch_sympy(val)
            return
        if isinstance(val, torch.SymBool):  # a predicate on sizes, read by the runtime asserts skipped above
            self.values[node] = val
            return
        for v in val if isinstance(val, (tuple, list)) else [val]:
            if isinstance(v, torch.Tensor) and free_unbacked_symbols(tuple(v.shape)):
                raise Unsupported(f"{key} makes a tensor whose shape depends on tensor data ({tuple(v.shape)}, at "
                                  f"{self.loc}); einfuse needs shapes that follow from the inputs' shapes")
        self.report.total += 1
        rule = rules.get(key)
        if rule is None:
            return self.opaque(node, f"no lowering rule for {key}")
        start = len(self.body)
        try:
            try:
                value = rule(self, node)
            except _NeedsMaterialize:
                del self.body[start:]
                self.materialize_args(node)
                value = rule(self, node)
        except Unsupported as why:
            del self.body[start:]
            return self.opaque(node, str(why))
        self.values[node] = value
        self.report.lowered += 1

    def materialize_args(self, node: fx.Node):
        """Give every tensor argument of `node` a name (a gather cannot index through a template)."""
        for a in node.all_input_nodes:
            v = self.values.get(a)
            if isinstance(v, Tmpl):
                self.values[a] = self.named(self.materialize(v, a.name), v.shape, v.dtype)

    def opaque(self, node: fx.Node, reason: str):
        key = _target_name(node.target)
        self.report.fallback(key, reason)
        if not isinstance(node.target, torch._ops.OpOverload):
            target = f"{node.target.__module__}:{node.target.__qualname__}"
        else:
            target = key
        args = tuple(self.opaque_arg(a, node) for a in node.args)
        kwargs = tuple((k, self.opaque_arg(v, node)) for k, v in node.kwargs.items())
        val = node.meta.get("val")
        vals = list(val) if isinstance(val, (tuple, list)) else [val]
        outs, values = [], []
        for n, v in enumerate(vals):
            if v is None:
                values.append(None)
                continue
            if not isinstance(v, torch.Tensor):
                raise Unsupported(f"{key} returns a {type(v).__name__}; einfuse needs tensor outputs")
            name = self.fresh(node.name if len(vals) == 1 and not isinstance(val, (tuple, list)) else f"{node.name}_{n}")
            t = TensorType(dt.from_torch(v.dtype), self.shape(v))
            outs.append((name, t))
            self._types[name] = t
            values.append(self.named(name, t.shape, t.dtype))
        self.body.append(Opaque(tuple(outs), target, args, kwargs, self.loc))
        self.values[node] = values if isinstance(val, (tuple, list)) else values[0]

    def opaque_arg(self, a, node):
        if isinstance(a, fx.Node):
            v = self.values[a]
            if isinstance(v, Tmpl):
                return TensorRef(self.materialize(v, f"{a.name}_arg"))
            if isinstance(v, sympy.Expr):
                return v
            raise Unsupported(f"argument {a.name} of {node.name} cannot be passed to torch")
        if isinstance(a, (list, tuple)):
            return tuple(self.opaque_arg(x, node) for x in a)
        if isinstance(a, torch.SymInt):
            return torch_sympy(a)
        if a is None or isinstance(a, (bool, int, float, str, torch.dtype, torch.device, torch.layout,
                                       torch.memory_format)):
            return a
        raise Unsupported(f"argument {a!r} of {node.name} has no IR form")


def _access_free(e: Expr) -> bool:
    return not any(isinstance(n, Access) for n in walk(e))


class _NeedsMaterialize(Exception):
    """A gather through a computed template: copy the template into a tensor first."""


def _hint(v):
    """An example value for a size, read without specializing it (int() on a SymInt adds a guard)."""
    if isinstance(v, torch.SymInt):
        hint = v.node.hint
        return int(hint) if hint is not None else None
    return int(v)


def _target_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    return getattr(target, "__name__", str(target))


@dataclass
class Lowered:
    """The IR of a graph, what lowering reports, and how the graph's flat outputs map to IR tensors."""

    module: Module
    report: LoweringReport
    out_leaves: list
    instances: list = field(default_factory=list)  # blocks.Instance per repeated layer (templates included)


def lower_graph(gm: fx.GraphModule, kinds: dict, name: str, instantiate: bool = True) -> Lowered:
    """Lower an ATen FX graph; `kinds` maps placeholder names to in|param|buffer|const. With `instantiate`,
    a repeated layer is lowered once and renamed for every other layer of the same structure."""
    lw = Lowerer(gm, dict(kinds), name)
    lw.instantiate = instantiate
    return lw.run()
