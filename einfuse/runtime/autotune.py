"""Autotuning: pick the fastest of a kernel kind's whole-kernel candidates on the real buffers.

Every candidate is the *whole* kernel (the same group, another tiling), emitted by the same kind, so it
computes and stores exactly what the kernel does. Each candidate is launched, its outputs are compared
with the default kernel's, a candidate that differs is rejected, the rest are timed, and the choice is
remembered on disk per device. On CUDA the timer is `triton.testing.do_bench`; tests replace it and run
the same selection under Triton's interpreter on CPU.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..codegen import KernelSpec, candidates
from ..codegen.cache import Cache, key_of
from ..ir import index as ix
from ..ir.evaluator import TOLERANCE, max_rel_error
from ..ir.module import Module

log = logging.getLogger("einfuse")


def cuda_timer(launch: Callable[[], None]) -> float:
    """Milliseconds per launch, measured on the GPU."""
    import triton.testing

    return triton.testing.do_bench(launch, warmup=5, rep=20)


@dataclass
class Trial:
    """What the autotuner saw of one candidate."""

    spec: KernelSpec
    ms: float | None  # None when rejected
    error: float  # worst relative difference from the default kernel's outputs


@dataclass
class Autotuner:
    """Chooses among a kernel's candidates; `load(spec)` gives the launchable function of a spec."""

    module: Module
    load: Callable[[KernelSpec], object]
    timer: Callable[[Callable[[], None]], float] = cuda_timer
    device: str = "cuda"
    cache: Cache = field(default_factory=lambda: Cache("autotune"))
    trials: dict = field(default_factory=dict)  # kernel name -> [Trial] of the last selection

    def choose(self, spec: KernelSpec, env: dict, sizes: dict) -> KernelSpec:
        """The candidate to launch from now on for `spec` (the caller launches it)."""
        options = candidates(self.module, spec)
        if len(options) == 1:
            return spec
        key = key_of(spec.key, self.device)
        hit = self.cache.get(key)
        if hit is not None and int(hit["choice"]) < len(options):
            return options[int(hit["choice"])]
        reference, trials = None, []
        for option in options:
            if option.outputs != spec.outputs or option.statements != spec.statements:
                log.warning("einfuse: autotune candidate %s computes %s, not %s; rejected", option.name,
                            option.outputs, spec.outputs)
                trials.append(Trial(option, None, float("inf")))  # another computation: never launched
                continue
            got = self._outputs(option, env, sizes)
            error = 0.0 if reference is None else max(max_rel_error(g, w) for g, w in zip(got, reference))
            reference = reference if reference is not None else got
            tol = max((TOLERANCE.get(t.dtype, 0.0) * 10 for t in got), default=0.0)
            if error > tol:  # never launch a candidate that computes something else
                log.warning("einfuse: autotune candidate %s of %s differs from the default kernel by %.3g; "
                            "rejected", option.mapping.text(), spec.name, error)
                trials.append(Trial(option, None, error))
            else:
                trials.append(Trial(option, self.timer(lambda o=option: self._launch(o, env, sizes)), error))
        self.trials[spec.name] = trials
        choice = min((n for n, t in enumerate(trials) if t.ms is not None), key=lambda n: trials[n].ms)
        self.cache.put(key, {"choice": str(choice), "mapping": options[choice].mapping.text()})
        return options[choice]

    def _launch(self, spec: KernelSpec, env: dict, sizes: dict) -> None:
        args = [env[a.ref] if a.kind == "ptr" else sizes[ix.size(a.ref)] for a in spec.args]
        fn = self.load(spec)[spec.grid_for(sizes)]
        if self.device == "cpu":  # Triton's interpreter takes no launch options
            fn(*args, **spec.constexprs)
        else:
            fn(*args, **spec.constexprs, num_warps=spec.mapping.num_warps)

    def _outputs(self, spec: KernelSpec, env: dict, sizes: dict) -> list:
        """Launch `spec` once on outputs poisoned first (NaN, or -7 for integers), so a candidate that
        leaves part of an output unwritten differs; a copy of what it wrote."""
        outs = [env[n] for n in spec.outputs]
        for t in outs:
            t.fill_(float("nan") if t.is_floating_point() else -7)
        self._launch(spec, env, sizes)
        return [t.clone() for t in outs]
