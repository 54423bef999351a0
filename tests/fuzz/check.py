"""The oracle: compile a printed program through each backend, call it on fresh inputs, compare with eager.

A program is compiled once per backend with `einfuse.compile(model, inputs(0))` (the compile inputs carry
the program's aliasing) and called on fresh inputs of the same signature:

* `fresh`: `inputs(1, shared=False)`: every input its own storage (an input passed twice at compile time must
  not be read as one input afterwards);
* `shared`: `inputs(2)`: fresh values with the compile-time aliasing (programs that have some);
* `out_of_range`: `inputs(3, shared=False, out_of_range=True)`: one index past the end (programs with index
  inputs): eager raises, so must the compiled program.

Each call must match eager (same output count, dtypes, shapes, NaN and infinity positions, values within
tolerance) or raise where eager raises (a Python or torch exception: see `_plain`). Anything else is a
failure: a compile that raises, a whole-graph fallback because lowering crashed (`lowering failed`: einfuse
hid a crash by running eagerly), a call that raises where eager does not (InterpreterError, PassError,
...), a wrong value. A segfault or a hang is caught one level up (`worker`).

Tolerance of a floating output (relative to its largest magnitude, as einfuse's `max_rel_error`):

    TOLERANCE[loosest] * max(1, sum(sqrt(n) for n in reductions) / 4)  +  8 * sensitivity

* `loosest`: the least precise floating dtype the program computes anywhere (f64 1e-9, f32 1e-5, f16 1e-2,
  bf16 2e-2): a fused kernel may keep low-precision intermediates in f32 (as Inductor does), which changes
  an f32 output of a bf16 computation by bf16 rounding.
* reductions: accumulating n terms in another order (tiles, a split K loop) changes the rounding error,
  which grows like sqrt(n) eps for terms of random sign; the base tolerances are the suite's, set for
  reductions of about 16 terms (sqrt(16) = 4), and chained reductions add their errors.
* sensitivity: eager's own uncertainty, the larger of (a) how much eager's output moves when every floating
  input is perturbed by one to two rounding errors of `loosest` (two perturbations): an ill-conditioned
  program (a difference of nearly equal values, a softmax of large scores) amplifies any rounding
  difference, a well-conditioned one adds nothing; and (b) how far eager is from the same program computed
  in f64 throughout (`Exact`): an output that is rounding noise (a layer norm over one element gives
  1e-5 where the exact value is 0) is no more than that. An integer or bool output that moves under
  either (a comparison at a tie, an argmax of equal values) is only checked for dtype and shape.
"""
from __future__ import annotations

import math
import time
import traceback
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from .program import TOLERANCE, build

CALLS = (("fresh", 1, False, False), ("shared", 2, True, False), ("out_of_range", 3, False, True))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _flat(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _plain(exc: BaseException) -> bool:
    """An exception of Python or torch (as eager raises), not one of einfuse's or Triton's own (PassError,
    InterpreterError, EvaluationError...): those are crashes even where eager raises something too. The type
    itself may differ: the IR keeps a gather, not which op it was (torch.gather raises RuntimeError where
    indexing raises IndexError)."""
    module = type(exc).__module__
    return module == "builtins" or module.startswith("torch")


def eager(model, args) -> tuple:
    """("ok", [outputs]) or ("raise", exception)."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return "ok", [o.clone() if isinstance(o, torch.Tensor) else o for o in _flat(model(*args))]
    except Exception as exc:  # noqa: BLE001 (whatever eager raises is the expected behaviour)
        return "raise", exc


def perturbed(args: tuple, eps: float, seed: int) -> tuple:
    """`args` with every floating input moved by one to two relative rounding errors `eps` (in place, once
    per storage, so inputs that share storage still do)."""
    g = torch.Generator().manual_seed(seed)
    seen = set()
    for x in args:
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.numel() == 0:
            continue
        ptr = x.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        # between one and two rounding errors, either sign: every element moves by at least one ulp of `eps`
        sign = torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0).double()
        noise = sign * (1 + torch.rand(x.shape, generator=g, dtype=torch.float64)) * eps
        x.copy_((x.double() * (1 + noise)).to(x.dtype))
    return args


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """einfuse's max |got - want| / max |want| (NaNs must match), plus: infinities of the same sign."""
    from einfuse.passes.instruments import max_rel_error

    err = max_rel_error(got, want)
    if want.dtype.is_floating_point and err < math.inf:
        if not torch.equal(torch.isposinf(got), torch.isposinf(want)):
            return math.inf
    return err


def growth(reductions) -> float:
    return max(1.0, sum(math.sqrt(n) for n in reductions if n > 0) / 4)


def compare(got: list, want: list, tol: float, sens: list | None) -> str | None:
    """Why `got` is not `want` (None when it is)."""
    if len(got) != len(want):
        return f"{len(got)} outputs, eager gives {len(want)}"
    for k, (g, w) in enumerate(zip(got, want)):
        if not isinstance(w, torch.Tensor):
            if g != w:
                return f"output {k} is {g!r}, eager gives {w!r}"
            continue
        if not isinstance(g, torch.Tensor):
            return f"output {k} is a {type(g).__name__}, eager gives a tensor"
        if g.dtype != w.dtype:
            return f"output {k} has dtype {g.dtype}, eager gives {w.dtype}"
        if tuple(g.shape) != tuple(w.shape):
            return f"output {k} has shape {tuple(g.shape)}, eager gives {tuple(w.shape)}"
        s = sens[k] if sens is not None else 0.0
        if not w.dtype.is_floating_point:
            if s > 0:  # eager's own result moves under a rounding-size perturbation: not comparable exactly
                continue
            if not torch.equal(g, w):
                bad = (g != w).nonzero()[:3].tolist()
                return (f"output {k} ({w.dtype}) differs at {int((g != w).sum())} of {w.numel()} positions, e.g. "
                        f"{bad[0]}: {g[tuple(bad[0])].item()} vs eager {w[tuple(bad[0])].item()}")
            continue
        allowed = tol + 8 * s
        err = rel_error(g, w)
        if not err <= allowed:
            return f"output {k} ({w.dtype}{list(w.shape)}) differs from eager by {err:.3g} (relative; allowed " \
                   f"{allowed:.3g})"
    return None


class Exact(TorchDispatchMode):
    """Eager with every floating value in f64: each op's floating operands, dtype arguments and results
    become f64, so a cast to bf16 inside the program no longer rounds. The program computed (almost) exactly."""

    @staticmethod
    def _up(a):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.double()
        if isinstance(a, torch.dtype) and a.is_floating_point:
            return torch.float64
        return a

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        args, kwargs = tree_map(self._up, (args, kwargs or {}))
        return tree_map(self._up, func(*args, **kwargs))


def _moved(moved: list, want: list, worst: list) -> list:
    """`worst` raised by how far `moved` is from `want`, per output (an integer output that changes: 1.0)."""
    if len(moved) != len(want):
        return [math.inf] * len(want)
    for j, (m, w) in enumerate(zip(moved, want)):
        if not isinstance(w, torch.Tensor) or not isinstance(m, torch.Tensor) or m.shape != w.shape:
            continue
        if w.dtype.is_floating_point:
            worst[j] = max(worst[j], rel_error(m.to(w.dtype), w), rel_error(m.double(), w.double()))
        elif not torch.equal(m.to(w.dtype), w):
            worst[j] = 1.0
    return worst


def sensitivity(model, inputs, call: tuple, want: list, eps: float) -> list:
    """Per output: eager's own uncertainty — how far eager moves under two rounding-size perturbations of
    the floating inputs, and how far it is from the program computed in f64 (`Exact`: an output that is
    rounding noise, like a layer norm over one element, is far from it). Relative errors; for integer
    outputs 1.0 when any element changes, else 0.0."""
    _, seed, shared, oob = call
    worst = [0.0] * len(want)
    for k in range(2):
        status, moved = eager(model, perturbed(inputs(seed, shared, oob), eps, 100 + k))
        if status != "ok":
            return [math.inf] * len(want)
        worst = _moved(moved, want, worst)
    try:
        with Exact():
            status, exact = eager(model, inputs(seed, shared, oob))
    except Exception:  # noqa: BLE001 (an op without an f64 kernel: no estimate)
        status = "raise"
    if status == "ok":
        worst = _moved(exact, want, worst)
    return worst


def check(job: dict, backends=None) -> dict:
    """Compile and call one program (`Program.to_json()`) on each backend this einfuse has (those named
    by `backends` or the job's "backends"; default triton, torch, reference).
    Returns {"ok", "failures": [{"backend", "call", "kind", "error"}], "stats"}."""
    import einfuse
    from einfuse.runtime import backends as registry

    backends = backends or job.get("backends") or ("triton", "torch", "reference")

    cls, inputs = build(job["source"])
    meta = job.get("meta", {})
    loosest = meta.get("loosest", "float32")
    tol = TOLERANCE[loosest] * growth(meta.get("reductions", ()))
    eps = meta.get("eps", 1.2e-7)
    model = cls().eval()
    calls = [c for c in CALLS if c[0] == "fresh" or (c[0] == "shared" and job.get("shared"))
             or (c[0] == "out_of_range" and job.get("index"))]
    expected = {}
    for call in calls:
        _, seed, shared, oob = call
        status, value = eager(model, inputs(seed, shared, oob))
        sens = sensitivity(model, inputs, call, value, eps) if status == "ok" else None
        expected[call[0]] = (status, value, sens)
    failures, stats = [], {"backends": {}, "fallback": None}
    for backend in backends:
        if backend not in registry.BACKENDS:
            continue
        t0 = time.perf_counter()

        def fail(call: str, kind: str, error: str, backend=backend):
            failures.append({"backend": backend, "call": call, "kind": kind, "error": error})

        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cm = einfuse.compile(model, inputs(0), backend=backend)
        except Exception as exc:  # noqa: BLE001
            fail("compile", "compile raised", _first_line(exc) + "\n" + traceback.format_exc(limit=-4))
            continue
        why = getattr(cm.variant, "fallback", None)
        stats["fallback"] = why
        if why is not None and why.startswith("lowering failed"):
            fail("compile", "lowering crashed", why)
            continue
        for call in calls:
            name, seed, shared, oob = call
            status, want, sens = expected[name]
            args = inputs(seed, shared, oob)
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    got = _flat(cm(*args))
            except Exception as exc:  # noqa: BLE001
                if status == "raise":
                    if not _plain(exc):
                        fail(name, "crashed instead", f"{_first_line(exc)} where eager raises {_first_line(want)}")
                    continue
                fail(name, "raised", _first_line(exc) + "\n" + traceback.format_exc(limit=-4))
                continue
            if status == "raise":
                fail(name, "no exception", f"returned where eager raises {_first_line(want)}")
                continue
            why = compare(got, want, tol, sens)
            if why is not None:
                fail(name, "mismatch", why)
        stats["backends"][backend] = round(time.perf_counter() - t0, 3)
    return {"ok": not failures, "failures": failures, "stats": stats}


def describe(job: dict, result: dict) -> str:
    """A failure report: what went wrong where, then the program."""
    lines = [f"{f['backend']} backend, {f['call']} call: {f['kind']}: {f['error']}" for f in result["failures"]]
    return "\n".join(lines) + "\n\n" + job["source"]
