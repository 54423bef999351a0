"""Passes and pipelines: a pass is a name, `run(module) -> module` and a fingerprint; instruments run
around every pass (timing, verify, dumps, numeric checks) without the passes knowing about them."""
from __future__ import annotations

import hashlib
import re
import time
import types
from typing import Callable, Iterable

from ..ir.module import Module


def fresh_name(taken: set, base: str) -> str:
    """`base`, or `base_1`, `base_2`, ... whichever `taken` lacks; the name is then added to `taken`."""
    name, n = base, 1
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


def code_digest(code: types.CodeType) -> str:
    """What a function does, independent of the process: bytecode, names it uses, constants, nested code."""
    consts = [code_digest(c) if isinstance(c, types.CodeType) else stable_repr(c) for c in code.co_consts]
    blob = "|".join([code.co_code.hex(), repr(code.co_names), repr(code.co_varnames), *consts])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stable_repr(v) -> str:
    """`repr` without what differs between processes: hash order of sets/dicts, object addresses."""
    if isinstance(v, (set, frozenset)):
        return "{" + ", ".join(sorted(stable_repr(x) for x in v)) + "}"
    if isinstance(v, dict):
        return "{" + ", ".join(sorted(f"{stable_repr(k)}: {stable_repr(x)}" for k, x in v.items())) + "}"
    if isinstance(v, (list, tuple)):
        return type(v).__name__ + "(" + ", ".join(stable_repr(x) for x in v) + ")"
    if isinstance(v, Pass):
        return v.fingerprint()
    if isinstance(v, (types.FunctionType, types.MethodType)):
        fn = getattr(v, "__func__", v)
        cells = [stable_repr(c.cell_contents) for c in fn.__closure__ or ()]
        return f"{fn.__module__}:{code_digest(fn.__code__)}:{stable_repr(fn.__defaults__)}:{cells}"
    if isinstance(v, type):
        return f"{v.__module__}.{v.__qualname__}"
    if type(v).__repr__ is object.__repr__ and hasattr(v, "__dict__"):
        return f"{type(v).__module__}.{type(v).__qualname__}{stable_repr(vars(v))}"
    return repr(v)


class Pass:
    """Subclass, set `name` (defaults to the class name in snake_case) and implement `run`."""

    name: str = ""

    def run(self, module: Module) -> Module:
        raise NotImplementedError(f"{type(self).__name__}.run")

    def fingerprint(self) -> str:
        """Stable across processes: the pass's identity and its settings (public attributes)."""
        settings = sorted((k, stable_repr(v)) for k, v in vars(self).items() if not k.startswith("_"))
        blob = f"{type(self).__module__}.{type(self).__qualname__}:{self.pass_name}:{settings}"
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def pass_name(self) -> str:
        return self.name or re.sub(r"(?<!^)(?=[A-Z])", "_", type(self).__name__).lower()

    def __repr__(self) -> str:
        return f"<pass {self.pass_name}>"


class FunctionPass(Pass):
    """A pass made from a plain function `module -> module`."""

    def __init__(self, fn: Callable[[Module], Module], name: str | None = None):
        self._fn = fn
        self.name = name or fn.__name__

    def run(self, module: Module) -> Module:
        return self._fn(module)

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.name}:{stable_repr(self._fn)}".encode()).hexdigest()[:16]


def module_pass(name: str | Callable | None = None):
    """Decorator: `@module_pass("my_pass") def f(m): ...` (or bare `@module_pass`) makes `f` a Pass instance."""
    if callable(name):
        return FunctionPass(name)

    def deco(fn):
        return FunctionPass(fn, name)

    return deco


class PassError(RuntimeError):
    """A pass failed or broke the module; `pass_name` says which."""

    def __init__(self, pass_name: str, msg: str):
        super().__init__(f"pass {pass_name!r}: {msg}")
        self.pass_name = pass_name


class Instrument:
    """Hooks around a pipeline; override what you need. `index` counts passes from 1 (0 is the input)."""

    def start(self, module: Module) -> None:
        pass

    def before(self, p: Pass, module: Module, index: int) -> None:
        pass

    def after(self, p: Pass, before: Module, after: Module, ms: float, index: int) -> None:
        pass

    def finish(self, module: Module) -> None:
        pass


def run_pipeline(module: Module, passes: Iterable[Pass], instruments: Iterable[Instrument] = ()) -> Module:
    """Run `passes` in order over `module`, calling every instrument around each."""
    instruments = list(instruments)
    for inst in instruments:
        inst.start(module)
    for n, p in enumerate(passes, 1):
        if not isinstance(p, Pass):
            raise TypeError(f"pipeline entry {n} is {p!r}, not an einfuse.passes.Pass")
        for inst in instruments:
            inst.before(p, module, n)
        t0 = time.perf_counter()
        try:
            new = p.run(module)
        except PassError:
            raise
        except Exception as exc:
            raise PassError(p.pass_name, f"raised {type(exc).__name__}: {exc}") from exc
        ms = (time.perf_counter() - t0) * 1e3
        if not isinstance(new, Module):
            raise PassError(p.pass_name, f"returned {type(new).__name__}, not a Module")
        for inst in instruments:
            inst.after(p, module, new, ms, n)
        module = new
    for inst in instruments:
        inst.finish(module)
    return module
