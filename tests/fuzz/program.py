"""A fuzz program as plain data, and its one printed form: Python a person can paste.

The printed source is what runs: `build(source)` executes it and returns the module class and its
`inputs(seed, shared=True, out_of_range=False)` function, so a failure report is exactly the program that
failed. Example:

    import torch
    import torch.nn.functional as F


    class Program(torch.nn.Module):
        def __init__(self):
            super().__init__()
            with torch.random.fork_rng():
                torch.manual_seed(0)
                self.m0 = torch.nn.Linear(16, 1)

        def forward(self, x0, x1):
            v0 = x0 - x1
            v1 = self.m0(v0)
            return (v1,)


    def inputs(seed, shared=True, out_of_range=False):
        g = torch.Generator().manual_seed(seed)
        if shared:  # x0, x1: one tensor passed twice
            x0 = torch.randn(3, 16, generator=g)
            x1 = x0
        else:
            x0 = torch.randn(3, 16, generator=g)
            x1 = torch.randn(3, 16, generator=g)
        return (x0, x1)

`shared=True` gives the inputs the aliasing the program was generated with (the compile inputs);
`shared=False` gives every input its own storage. `out_of_range=True` puts one out-of-range value into
every index input (eager raises; so must the compiled program).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

FLOATS = ("float32", "float64", "bfloat16", "float16")
INTS = ("int64", "int32", "int16", "int8", "uint8")
# the relative error allowed per floating dtype (the einfuse test suite's tolerances; einfuse.ir.evaluator)
TOLERANCE = {"float64": 1e-9, "float32": 1e-5, "float16": 1e-2, "bfloat16": 2e-2}
EPS = {"float64": 2.2e-16, "float32": 1.2e-7, "float16": 9.8e-4, "bfloat16": 7.8e-3}


def dtype_code(name: str) -> str:
    return f"torch.{name}"


def kind_of(dtype: torch.dtype) -> str:
    """'f' (floating), 'i' (integer) or 'b' (bool)."""
    if dtype == torch.bool:
        return "b"
    return "f" if dtype.is_floating_point else "i"


@dataclass
class Input:
    """A tensor argument. dist: normal | positive (in [0.5, 1.5)) | bool | int (in [low, high)) | index (an
    int in [low, high) used to index: `out_of_range` sets one element to `high`). layout: contiguous |
    transposed (the last two dimensions stored swapped) | strided (every other element of a wider tensor)."""

    name: str
    shape: tuple
    dtype: str
    dist: str = "normal"
    low: int = 0
    high: int = 0
    layout: str = "contiguous"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def make(self, shape=None, layout=None) -> str:
        """The expression building a fresh value (reads the generator `g`)."""
        shape = self.shape if shape is None else tuple(shape)
        layout = self.layout if layout is None else layout
        if layout == "transposed" and len(shape) >= 2:
            stored = shape[:-2] + (shape[-1], shape[-2])
            return self.make(stored, "contiguous") + ".transpose(-1, -2)"
        if layout == "strided" and len(shape) >= 1:
            stored = shape[:-1] + (2 * shape[-1],)
            return self.make(stored, "contiguous") + "[..., ::2]"
        dims = ", ".join(str(d) for d in shape) if shape else "()"
        if self.dist == "bool":
            return f"(torch.rand({dims}, generator=g) < 0.5)"
        if self.dist in ("int", "index"):
            return (f"torch.randint({self.low}, {self.high}, ({dims}{',' if len(shape) == 1 else ''}), generator=g, "
                    f"dtype={dtype_code(self.dtype)})")
        kw = "" if self.dtype == "float32" else f", dtype={dtype_code(self.dtype)}"
        if self.dist == "positive":
            return f"(torch.rand({dims}, generator=g{kw}) + 0.5)"
        return f"torch.randn({dims}, generator=g{kw})"


@dataclass
class Program:
    """Inputs (in signature order), submodules (attribute, constructor code), statements (name, expression
    over earlier names), the returned names, and the aliasing of the compile inputs: groups of inputs that
    are views of one buffer (a group of same-shape inputs at offset 0 is one tensor passed several times)."""

    inputs: list = field(default_factory=list)
    modules: list = field(default_factory=list)
    body: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    shared: list = field(default_factory=list)  # [[(input name, offset), ...], ...]
    seed: int = 0
    # what the oracle needs to know: the least precise floating dtype computed anywhere, the longest reduction
    meta: dict = field(default_factory=dict)

    @property
    def has_index_inputs(self) -> bool:
        return any(i.dist == "index" and i.numel > 0 for i in self.inputs)

    def source(self) -> str:
        lines = ["import torch", "import torch.nn.functional as F", "", "", "class Program(torch.nn.Module):",
                 "    def __init__(self):", "        super().__init__()"]
        if self.modules:
            lines += ["        with torch.random.fork_rng():", f"            torch.manual_seed({self.seed})"]
            lines += [f"            self.{attr} = {ctor}" for attr, ctor in self.modules]
        args = ", ".join(i.name for i in self.inputs)
        lines += ["", f"    def forward(self{', ' if args else ''}{args}):"]
        lines += [f"        {name} = {code}" for name, code in self.body]
        outs = ", ".join(self.outputs)
        lines += [f"        return ({outs}{',' if len(self.outputs) == 1 else ''})", "", ""]
        lines += ["def inputs(seed, shared=True, out_of_range=False):", "    g = torch.Generator().manual_seed(seed)"]
        by_name = {i.name: i for i in self.inputs}
        grouped = {name for group in self.shared for name, _ in group}
        for i in self.inputs:
            if i.name not in grouped:
                lines.append(f"    {i.name} = {i.make()}")
        for group in self.shared:
            names = [n for n, _ in group]
            first = by_name[names[0]]
            same = all(off == 0 and by_name[n].shape == first.shape for n, off in group)
            what = "one tensor passed twice" if same and len(group) == 2 else (
                "one tensor passed several times" if same else "overlapping views of one buffer")
            lines.append(f"    if shared:  # {', '.join(names)}: {what}")
            if same:
                lines.append(f"        {names[0]} = {first.make(layout='contiguous')}")
                lines += [f"        {n} = {names[0]}" for n in names[1:]]
            else:
                size = max(off + by_name[n].numel for n, off in group)
                base = Input("buf", (size,), first.dtype, first.dist, first.low, first.high)
                lines.append(f"        buf = {base.make()}")
                for n, off in group:
                    shape = by_name[n].shape
                    view = f"buf[{off}:{off + by_name[n].numel}].view({', '.join(map(str, shape))})"
                    lines.append(f"        {n} = {view}" if shape else f"        {n} = buf[{off}]")
            lines.append("    else:")
            lines += [f"        {n} = {by_name[n].make()}" for n in names]
        index = [i for i in self.inputs if i.dist == "index" and i.numel > 0]
        if index:
            lines.append("    if out_of_range:  # one index past the end: eager raises")
            for i in index:
                first = ", ".join("0" * len(i.shape)) or "()"
                lines.append(f"        {i.name} = {i.name}.clone(); {i.name}[{first}] = {i.high}")
        lines.append(f"    return ({args}{',' if len(self.inputs) == 1 else ''})")
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:  # hypothesis prints the falsifying example with repr: the program itself
        return "\n" + self.source()

    def to_json(self) -> dict:
        return {"source": self.source(), "shared": bool(self.shared), "index": self.has_index_inputs,
                "meta": dict(self.meta)}


def build(source: str):
    """(module class, inputs function) of a printed program."""
    scope: dict = {"__name__": "fuzz_program"}
    exec(compile(source, "<fuzz program>", "exec"), scope)  # noqa: S102 (a program this package printed)
    return scope["Program"], scope["inputs"]
