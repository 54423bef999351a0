"""`einfuse.compile`: capture -> lower -> passes -> backend, one variant per input signature."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch

from .codegen.cache import Cache, key_of
from .frontend.capture import Captured, export
from .frontend.lower import LoweringReport, lower_graph
from .ir import parse
from .passes import Dump, NumericCheck, Timing, Verify, default_pipeline, run_pipeline
from .runtime import backends
from .runtime.compiled import CompiledModule, Variant

DEFAULT_BACKEND = "triton"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def optimize(module, passes=None, dump_dir=None, like=None, check=False, first_ms=None):
    """Run a pipeline over an IR module with the standard instruments; returns (module, timings)."""
    timing = Timing()
    instruments = [Verify(), timing]
    if dump_dir:
        instruments.append(Dump(dump_dir, "lower", first_ms))
    if check:
        instruments.append(NumericCheck(like))
    passes = default_pipeline() if passes is None else list(passes)
    out = run_pipeline(module, passes, instruments)
    timings = [{"index": 0, "pass": "lower", "ms": first_ms, "statements": len(module.body)}] + timing.records
    return out, timings


def write_kernels(specs, directory: str) -> None:
    """One readable .py per Triton kernel, beside the IR dumps."""
    os.makedirs(directory, exist_ok=True)
    for f in os.listdir(directory):
        if f.endswith(".py"):
            os.remove(os.path.join(directory, f))
    for spec in specs:
        with open(os.path.join(directory, f"{spec.name}.py"), "w") as f:
            f.write(spec.source)


@dataclass
class _Compiler:
    """Compiles one variant of `model`; the pipeline's result is cached on disk by graph and passes."""

    model: torch.nn.Module
    passes: list | None
    dump_dir: str | None
    backend: str
    check: bool
    dynamic_shapes: object
    backend_options: dict

    def __call__(self, args: tuple, kwargs: dict, n: int) -> Variant:
        out_dir = self.dump_dir if not self.dump_dir or n == 0 else os.path.join(self.dump_dir, f"variant_{n}")
        report = LoweringReport()
        try:
            cap = export(self.model, args, kwargs, dynamic_shapes=self.dynamic_shapes)
        except Exception as exc:  # a capture failure leaves the model to eager PyTorch, reported
            return self._eager(report, f"torch.export failed ({_first_line(exc)})")
        cached = self._cached(cap) if not (self.check or out_dir) else None
        if cached is not None:
            final, report, out_leaves, timings = cached
        else:
            t0 = time.perf_counter()
            try:
                lowered = lower_graph(cap.gm, cap.kinds, type(self.model).__name__.lower())
            except Exception as exc:
                return self._eager(report, f"lowering failed ({_first_line(exc)})")
            ms = round((time.perf_counter() - t0) * 1e3, 3)
            like = {**cap.bindings, **self._user_inputs(cap, lowered.module, args, kwargs)}
            final, timings = optimize(lowered.module, self.passes, out_dir, like, self.check, ms)
            report, out_leaves = lowered.report, lowered.out_leaves
            self._store(cap, final, report, out_leaves, timings)
        run = backends.build(self.backend, final, **self.backend_options)
        if out_dir and hasattr(run, "specs"):
            write_kernels(run.specs, os.path.join(out_dir, "kernels"))
        user = [name if name in {i.name for i in final.inputs} else None for name in cap.user_inputs]
        return Variant(final, run, dict(cap.bindings), user, out_leaves, cap.program.call_spec.out_spec,
                       report, timings, self.backend, None, out_dir)

    def _eager(self, report: LoweringReport, why: str) -> Variant:
        report.whole_graph_fallback = why
        return Variant(None, None, {}, [], [], None, report, backend=self.backend, fallback=why)

    @staticmethod
    def _user_inputs(cap: Captured, module, args, kwargs) -> dict:
        names = {i.name for i in module.inputs}
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        return {n: leaf for n, leaf in zip(cap.user_inputs, leaves) if n in names}

    # ---- the pipeline cache: a warm compile skips lowering and passes
    def _key(self, cap: Captured) -> str:
        shapes = [(n.name, str(n.meta.get("val").shape) if hasattr(n.meta.get("val"), "shape") else "",
                   str(getattr(n.meta.get("val"), "dtype", ""))) for n in cap.gm.graph.nodes if n.op == "placeholder"]
        fps = [p.fingerprint() for p in (self.passes if self.passes is not None else default_pipeline())]
        return key_of(cap.gm.code, repr(shapes), repr(fps), type(self.model).__name__)

    def _cached(self, cap: Captured):
        entry = Cache("modules").get(self._key(cap))
        if entry is None:
            return None
        meta = json.loads(entry["meta.json"])
        report = LoweringReport(meta["total"], meta["lowered"], capture=meta["capture"])
        for target, (count, why) in meta["fallbacks"].items():
            report.fallbacks[target] = [count, why]
        timings = [{"index": 0, "pass": "pipeline cache hit", "ms": None, "statements": meta["statements"]}]
        leaves = [tuple(x) for x in meta["out_leaves"]]
        return parse(entry["module.ir"].decode()), report, leaves, timings

    def _store(self, cap, final, report, out_leaves, timings) -> None:
        meta = {"total": report.total, "lowered": report.lowered, "capture": report.capture,
                "fallbacks": {k: list(v) for k, v in report.fallbacks.items()}, "out_leaves": out_leaves,
                "statements": len(final.body)}
        try:
            blob = json.dumps(meta)
        except TypeError:  # an output constant JSON cannot hold: do not cache this graph
            return
        Cache("modules").put(self._key(cap), {"module.ir": str(final), "meta.json": blob})


def compile(model: torch.nn.Module, args=(), kwargs=None, *, passes=None, dump_dir=None, backend=None,
            check=None, dynamic_shapes=None, cuda_graphs: bool = False) -> CompiledModule:
    """Compile `model` for inputs like `args`/`kwargs`; the result is called like `model`.

    passes: the pipeline (default `einfuse.passes.default_pipeline()`); dump_dir (or $EINFUSE_DUMP_DIR):
    write the IR after every pass and the Triton kernels; backend: "triton" (default: generated kernels,
    natively on CUDA, under Triton's interpreter on CPU) or "reference" (the IR evaluated with torch ops);
    check (or $EINFUSE_CHECK=1): compare every pass's numerics with the one before on random inputs;
    dynamic_shapes: as for torch.export (those sizes stay symbolic); cuda_graphs: on CUDA, replay the
    kernels of a call as one CUDA graph.
    """
    kwargs = dict(kwargs or {})
    args = args if isinstance(args, tuple) else (args,)
    dump_dir = dump_dir or os.environ.get("EINFUSE_DUMP_DIR") or None
    check = bool(int(os.environ.get("EINFUSE_CHECK", "0"))) if check is None else check
    backend = backend or os.environ.get("EINFUSE_BACKEND") or DEFAULT_BACKEND
    if backend not in backends.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(sorted(backends.BACKENDS))}")
    options = {"cuda_graphs": True} if cuda_graphs and backend == "triton" else {}
    compiler = _Compiler(model, None if passes is None else list(passes), dump_dir, backend, check, dynamic_shapes,
                         options)
    return CompiledModule(model, compiler, args, kwargs)
