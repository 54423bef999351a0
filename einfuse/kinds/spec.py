"""What a kernel kind emits and the runtime launches: a kernel's source, its arguments, its mapping."""
from __future__ import annotations

import copy
import hashlib
from dataclasses import asdict, dataclass, field, fields, replace

import sympy

from ..ir import index as ix


@dataclass(frozen=True)
class Arg:
    """A kernel argument: a tensor pointer (`dtype` its IR dtype) or an integer size."""

    name: str  # the parameter name in the kernel
    kind: str  # "ptr" | "size"
    ref: str  # the IR tensor (ptr) or size symbol (size) it is bound to
    dtype: str = ""  # IR dtype name of a pointer


@dataclass(frozen=True)
class Mapping:
    """How a kernel's ranks map onto programs and loops (TeAAL's mapping, kept apart from the Einsums).

    kind: the kernel kind that chose it (map: flat over output ranks; rows: rows x looped reductions;
    dot: tiled M x N with a K loop on tensor cores; iterate: rows with a sequential loop over the
    iterative rank; attention: query tiles streaming key tiles; or a kind a user registered)."""

    kind: str
    rows: tuple = ()  # ranks flattened onto the row axis (map: all output ranks; dot: M ranks)
    cols: tuple = ()  # dot: N ranks
    red: tuple = ()  # looped ranks (reduce: reduced ranks; dot: K ranks; iterate: the iterative rank)
    batch: tuple = ()  # dot: ranks on program_id(1)
    tiles: tuple = ()  # ((constexpr name, size), ...)
    input_precision: str = ""  # dot: "ieee" | "tf32" for f32 operands
    num_warps: int = 4

    def text(self) -> str:
        tiles = " ".join(f"{k}={v}" for k, v in self.tiles)
        parts = [self.kind]
        for label, ranks in (("rows", self.rows), ("cols", self.cols), ("loop", self.red), ("batch", self.batch)):
            if ranks:
                parts.append(f"{label}({', '.join(map(str, ranks))})")
        parts.append(f"tile {tiles}")
        if self.input_precision:
            parts.append(f"precision {self.input_precision}")
        return " ".join(parts)


@dataclass
class KernelSpec:
    """One generated Triton kernel: source text, arguments, constexprs, grid, and provenance."""

    name: str  # the @triton.jit function's name
    statements: tuple  # IR statement names it computes
    outputs: tuple  # IR tensors it writes
    source: str  # a complete Python module defining `name`
    args: list  # [Arg]
    constexprs: dict  # tile sizes and other compile-time constants
    grid: list  # sympy expressions over size symbols (one per grid axis)
    mapping: Mapping
    flops: int | str = 0  # from the IR (an expression string when sizes are symbolic)
    meta: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """The kernel kind that emitted it."""
        return self.mapping.kind

    def instance(self, statements: tuple, outputs: tuple, refs: dict) -> "KernelSpec":
        """The same kernel (source, tiling) launched for another group of identical structure: its
        statements and outputs, and every argument bound to the tensor `refs` maps it to."""
        args = [Arg(a.name, a.kind, refs.get(a.ref, a.ref), a.dtype) for a in self.args]
        meta = dict(self.meta)
        if "aliases" in meta:  # an update's new version is its own state's buffer
            meta["aliases"] = {refs.get(k, k): refs.get(v, v) for k, v in meta["aliases"].items()}
        return replace(self, statements=tuple(statements), outputs=tuple(outputs), args=args, meta=meta)

    @property
    def key(self) -> str:
        """Content hash: equal sources with equal constants compile to the same binary."""
        blob = self.source + repr(sorted(self.constexprs.items()))
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def grid_for(self, sizes: dict) -> tuple:
        """Programs per grid axis for these sizes; an axis of 0 programs means there is nothing to compute
        (an output with no elements), and the kernel is not launched."""
        subs = {k: sympy.Integer(v) for k, v in sizes.items()}
        return tuple(max(0, int(sympy.sympify(g).xreplace(subs))) for g in self.grid)

    def to_json(self, like: dict | None = None) -> dict:
        """The spec as JSON data (no deep copy of the source: one instance per layer shares it). `like`: the
        JSON of the kernel this one is an instance of (same name and source): its grid and mapping are reused,
        not printed again per layer."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(statements=list(self.statements), outputs=list(self.outputs), args=[asdict(a) for a in self.args],
                 constexprs=dict(self.constexprs), meta=copy.deepcopy(self.meta))
        if like is not None and like["name"] == self.name:
            d["grid"], d["mapping"] = like["grid"], like["mapping"]
            return d
        d["grid"] = [ix.to_str(g) for g in self.grid]
        d["mapping"] = {k: [str(x) for x in v] if k in ("rows", "cols", "red", "batch") else v
                        for k, v in asdict(self.mapping).items()}
        return d
