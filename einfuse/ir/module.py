"""IR containers: tensor types, inputs, Einsum statements, opaque calls and the module that holds them."""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Iterator, Union

import sympy
from .dtypes import DType
from .expr import Const, Expr, canonical, rename_fast, rename_tensors, rewrite, tensors_read


@dataclass(frozen=True)
class TensorType:
    """Element type and shape; a shape entry is an int or a sympy expression over size symbols."""

    dtype: DType
    shape: tuple

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(sympy.sympify(s) for s in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    def numel(self) -> sympy.Expr:
        return sympy.Mul(*self.shape) if self.shape else sympy.Integer(1)

    def concrete_shape(self, sizes: dict | None = None) -> tuple[int, ...]:
        """The shape as ints, substituting values for symbolic sizes."""
        subs = {k: sympy.Integer(v) for k, v in (sizes or {}).items()}
        out = []
        for s in self.shape:
            v = s.xreplace(subs)
            if not v.is_Integer:
                raise ValueError(f"size {s} is symbolic and no value was given for it")
            out.append(int(v))
        return tuple(out)

    def storage_shape(self, sizes: dict | None = None) -> tuple[int, ...]:
        """Shape of the tensor a user binds: packed dtypes hold several values per byte in the last dim."""
        shape = self.concrete_shape(sizes)
        if self.dtype.packed and shape:
            return shape[:-1] + ((shape[-1] + self.dtype.per_byte - 1) // self.dtype.per_byte,)
        return shape


INPUT_KINDS = ("in", "param", "buffer", "const", "state")


@dataclass(frozen=True)
class Input:
    """A tensor the module reads from outside; `kind` is in | param | buffer | const | state. A `state` is
    persistent memory the runtime owns across calls (a KV cache's blocks): the module reads it and writes
    new versions of it with Update ops, in place."""

    name: str
    type: TensorType
    kind: str = "in"


@dataclass(frozen=True)
class Reduce:
    """The reduce operator of a statement and the ranks it reduces, each with its extent."""

    op: str
    ranks: tuple  # ((symbol, extent), ...)


@dataclass(frozen=True)
class Iterate:
    """An iterative rank: the output at `rank + 1` is computed from the output at `rank`, from `init`."""

    rank: sympy.Symbol
    extent: sympy.Expr
    init: Const


@dataclass(frozen=True)
class Statement:
    """`name[index]: type = reduce[ranks] expr` — one extended Einsum defining one tensor."""

    name: str
    type: TensorType
    index: tuple  # output positions: rank symbols; the iterated position is `rank + 1`
    expr: Expr
    reduce: Reduce | None = None
    iterate: Iterate | None = None
    loc: str | None = None  # the user's source line this came from, "file.py:123"

    def __post_init__(self):
        object.__setattr__(self, "expr", rewrite(self.expr, canonical))
        object.__setattr__(self, "index", tuple(sympy.sympify(p) for p in self.index))

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.name,)

    def output_ranks(self) -> dict:
        """Output rank symbol -> extent (the iterated position counts its own rank and extent)."""
        out = {}
        for pos, ext in zip(self.index, self.type.shape):
            if isinstance(pos, sympy.Symbol):
                out[pos] = ext
            elif self.iterate is not None:
                out[self.iterate.rank] = self.iterate.extent
        return out

    def ranks(self) -> dict:
        """Every rank this statement iterates over, with its extent."""
        out = self.output_ranks()
        if self.reduce is not None:
            out.update(dict(self.reduce.ranks))
        return out

    def reads(self) -> set[str]:
        """The tensors the expression reads (a new set each call; the statement is immutable, so the walk
        over its expression is done once)."""
        known = self.__dict__.get("_reads")
        if known is None:
            known = frozenset(tensors_read(self.expr))
            object.__setattr__(self, "_reads", known)
        return set(known)

    def replace(self, **kw) -> "Statement":
        return dataclasses.replace(self, **kw)

    def rename_reads(self, mapping: dict) -> "Statement":
        return self.replace(expr=rename_tensors(self.expr, mapping))

    def renamed(self, mapping: dict) -> "Statement":
        """The same statement with its name and every tensor it reads renamed by `mapping` (names not in it
        stay). Renaming keeps an expression canonical, so this skips re-canonicalizing: it is the fast
        path for instantiating a repeated layer."""
        out = object.__new__(Statement)
        for f in dataclasses.fields(self):
            object.__setattr__(out, f.name, getattr(self, f.name))
        object.__setattr__(out, "name", mapping.get(self.name, self.name))
        object.__setattr__(out, "expr", rename_fast(self.expr, mapping))
        return out


@dataclass(frozen=True)
class TensorRef:
    """A tensor argument of an opaque call."""

    name: str


def _arg_key(v):
    """Opaque arguments compare as their text does: True, 1 and 1.0 differ, NaN equals NaN."""
    if isinstance(v, (tuple, list)):
        return ("list", tuple(_arg_key(x) for x in v))
    if isinstance(v, (bool, int, float)):
        return (type(v).__name__, repr(v))
    return (type(v).__name__, v)


@dataclass(frozen=True, eq=False)
class Opaque:
    """A call run by torch (topk, sort, scatter, collectives...): it splits fusion but never fails."""

    outputs_typed: tuple  # ((name, TensorType), ...)
    target: str  # "aten.topk.default", or "module:qualname" for a Python callable
    args: tuple
    kwargs: tuple = ()  # ((key, value), ...)
    loc: str | None = None

    def key(self):
        return (self.outputs_typed, self.target, _arg_key(self.args),
                tuple((k, _arg_key(v)) for k, v in self.kwargs), self.loc)

    def __eq__(self, other):
        return isinstance(other, Opaque) and self.key() == other.key()

    def __hash__(self):
        return hash(self.key())

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.outputs_typed)

    def reads(self) -> set[str]:
        return {r.name for r in iter_refs((self.args, tuple(v for _, v in self.kwargs)))}

    def replace(self, **kw) -> "Opaque":
        return dataclasses.replace(self, **kw)

    def rename_reads(self, mapping: dict) -> "Opaque":
        def ren(v):
            if isinstance(v, TensorRef):
                return TensorRef(mapping.get(v.name, v.name))
            if isinstance(v, tuple):
                return tuple(ren(x) for x in v)
            return v

        return self.replace(args=ren(self.args), kwargs=tuple((k, ren(v)) for k, v in self.kwargs))

    def renamed(self, mapping: dict) -> "Opaque":
        """Outputs and tensor arguments renamed by `mapping`."""
        out = self.rename_reads(mapping)
        return out.replace(outputs_typed=tuple((mapping.get(n, n), t) for n, t in self.outputs_typed))


@dataclass(frozen=True)
class Update:
    """`name = target[index] <- expr for ranks`: `name` is `target` (a state, or an earlier version of it)
    with the elements at `index` set to `expr`, for every point of `ranks`. It is written in place: the
    runtime keeps one buffer per state, and nothing may read `target` once `name` exists (the verifier
    checks). An index position is index arithmetic or a gather (a block table lookup)."""

    name: str
    target: str
    index: tuple  # positions in `target`: sympy expressions or integer Exprs
    ranks: tuple  # ((symbol, extent), ...): the points written
    expr: Expr
    loc: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "expr", rewrite(self.expr, canonical))
        object.__setattr__(self, "index", tuple(p if isinstance(p, Expr) else sympy.sympify(p) for p in self.index))
        object.__setattr__(self, "ranks", tuple((r, sympy.sympify(n)) for r, n in self.ranks))

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.name,)

    def reads(self) -> set[str]:
        out = {self.target} | tensors_read(self.expr)
        for p in self.index:
            if isinstance(p, Expr):
                out |= tensors_read(p)
        return out

    def replace(self, **kw) -> "Update":
        return dataclasses.replace(self, **kw)

    def rename_reads(self, mapping: dict) -> "Update":
        return self.replace(target=mapping.get(self.target, self.target), expr=rename_tensors(self.expr, mapping),
                            index=tuple(rename_tensors(p, mapping) if isinstance(p, Expr) else p for p in self.index))

    def renamed(self, mapping: dict) -> "Update":
        return self.rename_reads(mapping).replace(name=mapping.get(self.name, self.name))


def iter_refs(value) -> Iterator[TensorRef]:
    """Tensor references inside an opaque call's (nested) arguments."""
    if isinstance(value, TensorRef):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from iter_refs(v)


Op = Union[Statement, Opaque, Update]


@dataclass(frozen=True)
class Kernel:
    """A fusion group: statements that run as one kernel of `kind` (a registered kernel kind names its loop
    structure), kept apart from the Einsums as TeAAL keeps the mapping apart. Each member may carry a
    *role* the kind gives it (`qk`, `rm`, ... for attention; `acc`, `epilogue`, ... for a contraction):
    the text names them (`{qk=s1, rm=s2}`), so no one depends on the members' order. `attrs` are mapping
    parameters (tile sizes)."""

    name: str
    kind: str
    members: tuple  # statement names, in body order
    attrs: tuple = ()  # ((key, int | str), ...)
    roles: tuple = ()  # one role per member ("" for none), or () when the kind names none

    def __post_init__(self):
        object.__setattr__(self, "members", tuple(self.members))
        object.__setattr__(self, "roles", tuple(self.roles))
        if self.roles and len(self.roles) != len(self.members):
            raise ValueError(f"kernel {self.name!r}: {len(self.roles)} roles for {len(self.members)} members")

    def attr(self, key: str, default=None):
        return dict(self.attrs).get(key, default)

    def role_of(self, name: str) -> str:
        """The role of member `name` ("" when the kernel names none)."""
        return self.roles[self.members.index(name)] if self.roles else ""

    def with_role(self, role: str) -> list:
        """The members that have `role`, in body order."""
        return [n for n, r in zip(self.members, self.roles) if r == role]

    def member(self, role: str) -> str:
        """The one member with `role`; an error naming the kernel when there is none or several."""
        found = self.with_role(role)
        if len(found) != 1:
            raise KeyError(f"kernel {self.name!r} ({self.kind}) has {len(found)} members with role {role!r}; "
                           f"roles: {', '.join(f'{r}={n}' for n, r in zip(self.members, self.roles)) or 'none'}")
        return found[0]


@dataclass(frozen=True)
class Module:
    """A program: symbolic sizes, inputs, an ordered body of statements/opaque calls, and outputs."""

    name: str
    inputs: tuple
    body: tuple
    outputs: tuple
    sizes: tuple = ()  # symbolic size symbols
    size_hints: tuple = field(default=(), compare=True)  # ((symbol, example value), ...) for random inputs
    kernels: tuple = ()  # Kernel groups chosen by fusion; statements in none get a kernel of their own

    def __post_init__(self):
        for f in ("inputs", "body", "outputs", "sizes", "size_hints", "kernels"):
            object.__setattr__(self, f, tuple(getattr(self, f)))

    # ---- queries (a module is immutable: each is computed once and shared; callers must not mutate them)
    def _cached(self, key: str, compute):
        value = self.__dict__.get(key)
        if value is None:
            value = compute()
            object.__setattr__(self, key, value)
        return value

    @property
    def statements(self) -> list[Statement]:
        return self._cached("_statements", lambda: [op for op in self.body if isinstance(op, Statement)])

    def types(self) -> dict[str, TensorType]:
        """Every tensor name the module defines or reads, with its type."""

        def compute():
            out = {i.name: i.type for i in self.inputs}
            for op in self.body:
                if isinstance(op, Statement):
                    out[op.name] = op.type
                elif isinstance(op, Update):
                    out[op.name] = out[op.target]  # a new version of the same buffer
                else:
                    out.update(dict(op.outputs_typed))
            return out

        return self._cached("_types", compute)

    def producers(self) -> dict[str, Op]:
        return self._cached("_producers", lambda: {name: op for op in self.body for name in op.outputs})

    def users(self) -> dict[str, list[Op]]:
        def compute():
            out: dict[str, list[Op]] = {}
            for op in self.body:
                for r in op.reads():
                    out.setdefault(r, []).append(op)
            return out

        return self._cached("_users", compute)

    def replace(self, **kw) -> "Module":
        return dataclasses.replace(self, **kw)

    def group_of(self) -> dict:
        """Statement name -> the Kernel group it belongs to."""
        return self._cached("_group_of", lambda: {n: k for k in self.kernels for n in k.members})

    def last_uses(self) -> dict:
        """Body position -> tensors no later op reads (an executor frees them there); outputs live on."""
        last = {}
        for n, op in enumerate(self.body):
            for r in op.reads():
                last[r] = n
            for o in op.outputs:
                last.setdefault(o, n)
        keep = set(self.outputs) | {i.name for i in self.inputs}
        out: dict = {}
        for name, n in last.items():
            if name not in keep:
                out.setdefault(n, []).append(name)
        return out

    def rename_reads(self, mapping: dict) -> "Module":
        """Every read of an old name (and every output) redirected to its new name."""
        if not mapping:
            return self
        return self.replace(body=tuple(op.rename_reads(mapping) for op in self.body),
                            outputs=tuple(mapping.get(o, o) for o in self.outputs))

    # ---- text
    def __str__(self) -> str:
        from .printer import print_module

        return self._cached("_text", lambda: print_module(self))

    def with_text(self, text: str) -> "Module":
        """Record this module's printed text when whoever built it already has it (a stitched module's
        text is assembled from its regions' lines); `str` then costs nothing. The text must be exact."""
        object.__setattr__(self, "_text", text)
        return self

    def fingerprint(self) -> str:
        """A stable hash of the module's text: the cache key of everything compiled from it."""
        return hashlib.sha256(str(self).encode()).hexdigest()[:16]

