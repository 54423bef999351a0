"""A small structured builder for Triton kernels: named values, loops, conditionals, loads and stores.

Kinds emit into blocks of statements rather than into text: a value is `let` once under a readable
name derived from the IR (`q_tile`, `acc_o`, `x_1`), a loop or a branch holds a block, a store is an
effect. Rendering drops every assignment no effect depends on (liveness over the structure, loops to a
fixed point), so a kind never patches its text afterwards, and it declares the helper functions it
calls (`require`) instead of having them found by searching the source.
"""
from __future__ import annotations

import ast
import contextlib
import keyword
from dataclasses import dataclass, field

# Helper @triton.jit functions a kernel may call, emitted above it when required.
HELPERS = {
    "mul": ["@triton.jit", "def _mul(a, b):", "    return a * b"],
}


def names_read(code: str) -> frozenset:
    """The identifiers an expression reads (attribute names like `tl.load` count as `tl`)."""
    tree = ast.parse(code.strip(), mode="eval")
    return frozenset(n.id for n in ast.walk(tree) if isinstance(n, ast.Name))


@dataclass
class Assign:
    target: str
    code: str
    reads: frozenset

    def render(self, indent: str) -> list:
        return [f"{indent}{self.target} = {self.code}"]


@dataclass
class Effect:
    """A statement kept for what it does (a store): everything it reads is live."""

    code: str
    reads: frozenset

    def render(self, indent: str) -> list:
        return [f"{indent}{self.code}"]


@dataclass
class Comment:
    text: str

    def render(self, indent: str) -> list:
        return [f"{indent}# {self.text}"]


@dataclass
class Block:
    """An ordered list of statements; kinds fill blocks and place them in loops and branches."""

    items: list = field(default_factory=list)

    def render(self, indent: str) -> list:
        out = []
        for it in self.items:
            out += it.render(indent)
        return out


@dataclass
class For:
    var: str
    bounds: str  # the range(...) arguments
    body: Block
    comment: str = ""

    @property
    def reads(self) -> frozenset:
        return names_read(f"range({self.bounds})")

    def render(self, indent: str) -> list:
        note = f"  # {self.comment}" if self.comment else ""
        return [f"{indent}for {self.var} in range({self.bounds}):{note}"] + self.body.render(indent + "    ")


@dataclass
class If:
    cond: str
    body: Block
    comment: str = ""

    @property
    def reads(self) -> frozenset:
        return names_read(self.cond)

    def render(self, indent: str) -> list:
        note = f"  # {self.comment}" if self.comment else ""
        return [f"{indent}if {self.cond}:{note}"] + self.body.render(indent + "    ")


def prune(block: Block, live_after: set) -> tuple[Block, set]:
    """The block without assignments nothing live reads, and the names live at its start."""
    live = set(live_after)
    kept = []
    for it in reversed(block.items):
        if isinstance(it, Assign):
            if it.target not in live:
                continue
            live.discard(it.target)
            live |= it.reads
        elif isinstance(it, Effect):
            live |= it.reads
        elif isinstance(it, For):
            carried = set(live)  # live at the end of an iteration: after the loop, or at the next iteration's start
            while True:
                body, body_live = prune(it.body, carried)
                if body_live <= carried:
                    break
                carried |= body_live
            if not body.items:
                continue
            it = For(it.var, it.bounds, body, it.comment)
            live = (live | body_live) - {it.var} | it.reads
        elif isinstance(it, If):
            body, body_live = prune(it.body, live)
            if not body.items:
                continue
            it = If(it.cond, body, it.comment)
            live = live | body_live | it.reads  # the branch may not run: what was live stays live
        kept.append(it)
    return Block(kept[::-1]), live


class KernelBuilder:
    """Builds one kernel's body. `fresh` hands out unique readable names; `let` assigns a value in the
    current block; `loop`/`when` open nested blocks; `block()` makes a detached block a scope fills and
    `place` puts it where it belongs."""

    def __init__(self, reserved=()):
        self.taken: set = set(reserved) | set(keyword.kwlist) | {"tl", "triton", "libm", "range", "float"}
        self.root = Block()
        self.current = self.root
        self.helpers: list = []
        self._values: dict = {}  # (block id, code) -> (name, names it reads, block): value numbering in `let`

    def fresh(self, hint: str) -> str:
        """A new name from `hint` (letters, digits, _): the hint itself, else hint_2, hint_3, ..."""
        base = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in hint).strip("_")[:28] or "v"
        if base[0].isdigit():
            base = "v" + base
        name, n = base, 1
        while name in self.taken:
            n += 1
            name = f"{base}_{n}"
        self.taken.add(name)
        return name

    def claim(self, name: str) -> str:
        """Reserve an exact name (a rank variable, a kernel parameter)."""
        self.taken.add(name)
        return name

    # ---- statements into the current block (or into `to`)
    def let(self, hint: str, code: str, to: Block | None = None) -> str:
        """A new name for `code` — or the name an earlier `let` of the same code in this block holds, when
        nothing it reads was reassigned (in any block) and no effect (a store) came between: a gathered
        index two statements compute (a block table read for the keys and for the mask) is loaded once."""
        block = to or self.current
        key = (id(block), code)
        if key in self._values:
            return self._values[key][0]
        name = self.fresh(hint)
        reads = names_read(code)
        block.items.append(Assign(name, code, reads))
        self._values[key] = (name, reads, block)  # holding the block keeps its id from being reused
        return name

    def assign(self, name: str, code: str, to: Block | None = None) -> str:
        """(Re)assign an existing name: a loop-carried accumulator, a rank bound from an index."""
        (to or self.current).items.append(Assign(name, code, names_read(code)))
        self._values = {k: v for k, v in self._values.items() if v[0] != name and name not in v[1]}
        return name

    def effect(self, code: str, to: Block | None = None) -> None:
        (to or self.current).items.append(Effect(code, names_read(code)))
        self._values = {}

    def store(self, ptr: str, offset: str, value: str, mask: str | None = None, to: Block | None = None) -> None:
        self.effect(f"tl.store({ptr} + {offset}, {value}" + (f", mask={mask})" if mask else ")"), to)

    def comment(self, text: str, to: Block | None = None) -> None:
        (to or self.current).items.append(Comment(text))

    def block(self) -> Block:
        return Block()

    def place(self, block: Block) -> None:
        self.current.items.extend(block.items)

    @contextlib.contextmanager
    def loop(self, var: str, bounds: str, comment: str = ""):
        body = Block()
        self.current.items.append(For(var, bounds, body, comment))
        outer, self.current = self.current, body
        try:
            yield body
        finally:
            self.current = outer

    @contextlib.contextmanager
    def when(self, cond: str, comment: str = ""):
        body = Block()
        self.current.items.append(If(cond, body, comment))
        outer, self.current = self.current, body
        try:
            yield body
        finally:
            self.current = outer

    def require(self, helper: str) -> str:
        """Declare a helper function (see HELPERS) the kernel calls; returns its name."""
        if helper not in HELPERS:
            raise KeyError(f"einfuse: no kernel helper {helper!r}; known: {', '.join(HELPERS)}")
        if helper not in self.helpers:
            self.helpers.append(helper)
        return f"_{helper}"

    def render(self) -> list:
        """The body's lines (4-space indented), dead assignments dropped."""
        body, _ = prune(self.root, set())
        return body.render("    ")

    def helper_lines(self) -> list:
        out = []
        for h in self.helpers:
            out += HELPERS[h] + ["", ""]
        return out
