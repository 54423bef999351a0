"""`einfuse.compile`: capture -> lower -> passes -> backend, one variant per input signature."""
from __future__ import annotations

import os
import time
import traceback

import torch

from .frontend.capture import export
from .frontend.lower import LoweringReport, lower_graph
from .passes import Dump, NumericCheck, Timing, Verify, default_pipeline, run_pipeline
from .runtime import backends
from .runtime.compiled import CompiledModule, Variant

DEFAULT_BACKEND = "reference"


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


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


def compile(model: torch.nn.Module, args=(), kwargs=None, *, passes=None, dump_dir=None, backend=None,
            check=None, dynamic_shapes=None) -> CompiledModule:
    """Compile `model` for inputs like `args`/`kwargs`; the result is called like `model`.

    passes: the pipeline (default `einfuse.passes.default_pipeline()`); dump_dir (or $EINFUSE_DUMP_DIR):
    write the IR after every pass; backend: "reference" (default) or another registered backend;
    check (or $EINFUSE_CHECK=1): compare every pass's numerics with the one before on random inputs.
    """
    kwargs = dict(kwargs or {})
    args = args if isinstance(args, tuple) else (args,)
    dump_dir = dump_dir or os.environ.get("EINFUSE_DUMP_DIR") or None
    check = bool(int(os.environ.get("EINFUSE_CHECK", "0"))) if check is None else check
    backend = backend or DEFAULT_BACKEND
    if backend not in backends.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(sorted(backends.BACKENDS))}")
    name = type(model).__name__

    def compile_variant(a, kw, n) -> Variant:
        out_dir = dump_dir if not dump_dir or n == 0 else os.path.join(dump_dir, f"variant_{n}")
        report = LoweringReport()
        try:
            cap = export(model, a, kw, dynamic_shapes=dynamic_shapes)
        except Exception as exc:  # capture failures leave the model to eager PyTorch, reported
            report.whole_graph_fallback = f"torch.export failed ({_first_line(exc)})"
            return Variant(None, None, {}, [], [], None, report, backend=backend, fallback=report.whole_graph_fallback)
        t0 = time.perf_counter()
        try:
            lowered = lower_graph(cap.gm, cap.kinds, name.lower())
        except Exception as exc:
            report.whole_graph_fallback = f"lowering failed ({_first_line(exc)}); {traceback.format_exc(limit=1)}"
            return Variant(None, None, {}, [], [], None, report, backend=backend, fallback=report.whole_graph_fallback)
        lower_ms = round((time.perf_counter() - t0) * 1e3, 3)
        flat_user = list(cap.user_inputs)
        like = dict(cap.bindings)
        flat_args = torch.utils._pytree.tree_leaves((a, kw))
        ir_inputs = {i.name for i in lowered.module.inputs}
        user = [n if n in ir_inputs else None for n in flat_user]
        for leaf, n in zip(flat_args, user):
            if n is not None:
                like[n] = leaf
        final, timings = optimize(lowered.module, passes, out_dir, like, check, lower_ms)
        run = backends.build(backend, final)
        return Variant(final, run, dict(cap.bindings), user, lowered.out_leaves, cap.program.call_spec.out_spec,
                       lowered.report, timings, backend, None, out_dir)

    return CompiledModule(model, compile_variant, args, kwargs)
