"""CompiledModule: an nn.Module that runs compiled variants, one per input signature."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.utils._pytree as pytree

from ..ir.module import Module

log = logging.getLogger("einfuse")


@dataclass
class Variant:
    """One specialization: the final IR, how to call it, and what compiling it reported."""

    ir: Module | None
    run: Callable[[dict], dict]  # IR inputs by name -> IR outputs by name
    bindings: dict  # weights and constants by IR input name
    user_inputs: list  # flat user-input leaves -> IR input name (None for non-tensor leaves)
    out_leaves: list  # ("tensor", IR name) | ("value", constant), in flat output order
    out_spec: pytree.TreeSpec | None
    lowering: object  # LoweringReport
    timings: list = field(default_factory=list)
    backend: str = "reference"
    fallback: str | None = None  # why the whole model runs eagerly, when it does
    dump_dir: str | None = None


@dataclass
class Explanation:
    """What `explain()` tells: the lowered share, every fallback with its count and reason, timings."""

    share: float
    fallbacks: dict  # op -> (count, reason)
    text: str
    timings: list

    def __str__(self) -> str:
        return self.text


def signature(flat: list) -> tuple:
    """What a call is specialized on: tensor shapes/dtypes and the values of non-tensor leaves."""
    return tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else ("value", repr(x)) for x in flat)


class CompiledModule(torch.nn.Module):
    """Behaves like the original module; a call with a new input signature compiles a new variant."""

    def __init__(self, model, compile_variant: Callable, args: tuple, kwargs: dict):
        super().__init__()
        self._model = [model]  # a list so nn.Module does not register the original as a submodule
        self._compile_variant = compile_variant
        self._variants: dict = {}
        self._kwarg_order = list(kwargs)
        self._example = (tuple(args), dict(kwargs))
        self._last: Variant | None = None
        self._specialize(tuple(args), dict(kwargs))

    # ---- calling
    def _flat(self, args, kwargs):
        if set(kwargs) == set(self._kwarg_order):
            kwargs = {k: kwargs[k] for k in self._kwarg_order}
        flat, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        return flat, spec, kwargs

    def _specialize(self, args, kwargs) -> Variant:
        flat, spec, kwargs = self._flat(args, kwargs)
        key = (spec, signature(flat))
        v = self._variants.get(key)
        if v is None:
            if self._variants:
                log.info("einfuse: new input signature %s, compiling another variant", signature(flat))
            v = self._compile_variant(args, kwargs, len(self._variants))
            self._variants[key] = v
        self._last = v
        return v

    def _inputs(self, v: Variant, args, kwargs) -> dict:
        """The IR inputs of a call: weights from the variant, user tensors by their IR names."""
        flat, _, _ = self._flat(args, kwargs)
        inputs = dict(v.bindings)
        for leaf, name in zip(flat, v.user_inputs):
            if name is not None:
                inputs[name] = leaf
        return inputs

    def forward(self, *args, **kwargs):
        v = self._specialize(args, kwargs)
        if v.fallback is not None:
            return self._model[0](*args, **kwargs)
        inputs = self._inputs(v, args, kwargs)
        with torch.no_grad():
            out = v.run(inputs)
        leaves = [out[x] if kind == "tensor" else x for kind, x in v.out_leaves]
        return pytree.tree_unflatten(leaves, v.out_spec) if v.out_spec is not None else leaves

    # ---- inspection
    @property
    def variant(self) -> Variant:
        """The variant of the most recent call (or of the example inputs)."""
        return self._last

    @property
    def variants(self) -> list[Variant]:
        return list(self._variants.values())

    @property
    def ir(self) -> Module:
        """The final IR of the most recent variant."""
        if self._last.ir is None:
            raise RuntimeError(f"this model runs in eager PyTorch, so it has no IR: {self._last.fallback}")
        return self._last.ir

    def explain(self, print_it: bool = True) -> Explanation:
        """What was lowered, what fell back to torch and why, and how long each pass took."""
        v = self._last
        lines = [v.lowering.text(), f"backend: {v.backend}"]
        if v.timings:
            lines.append("passes:")
            for t in v.timings:
                ms = f"{t['ms']:.2f} ms" if t.get("ms") is not None else "-"
                lines.append(f"  {t['index']:02d} {t['pass']:<22} {ms:>10}  {t['statements']} statements")
        if v.dump_dir:
            lines.append(f"IR dumps: {v.dump_dir}")
        if len(self._variants) > 1:
            lines.append(f"{len(self._variants)} variants compiled (one per input signature)")
        text = "\n".join(lines)
        if print_it:
            print(text)
        return Explanation(v.lowering.share, {k: tuple(x) for k, x in v.lowering.fallbacks.items()}, text, v.timings)

    def _triton_runner(self, v: Variant):
        from .triton_backend import triton_backend

        return v.run if hasattr(v.run, "steps") else triton_backend(v.ir)

    def report(self, *args, eager: bool = True, **kwargs):
        """Run once (on the example inputs unless given) with every kernel's memory traffic measured
        under Triton's interpreter; FLOPs from the IR; an H100 roofline model. Written to the dump folder."""
        from ..ir.evaluator import bind_sizes
        from .report import build_report, eager_bytes

        if not args and not kwargs:
            args, kwargs = self._example
        v = self._specialize(args, kwargs)
        if v.ir is None:
            raise RuntimeError(f"no report: the model runs in eager PyTorch ({v.fallback})")
        runner = self._triton_runner(v)
        inputs = self._inputs(v, args, kwargs)
        runner.measure, runner.stats = True, {}
        try:
            with torch.no_grad():
                runner(inputs)
        finally:
            runner.measure = False
        sizes = {k: int(x) for k, x in bind_sizes(v.ir, inputs).items()}
        rep = build_report(runner, sizes, eager_bytes(self._model[0], args, kwargs) if eager else None)
        if v.dump_dir:
            rep.write(v.dump_dir)
        return rep

    def check_gpu(self, archs=(80, 90), jobs=None):
        """Compile every kernel ahead of time for each CUDA arch (no GPU needed): ok, registers,
        spills, shared memory and tensor-core use per kernel."""
        from ..codegen.aot import check_gpu

        if self._last.ir is None:
            raise RuntimeError(f"no GPU check: the model runs in eager PyTorch ({self._last.fallback})")
        return check_gpu(self._triton_runner(self._last).specs, archs=archs, jobs=jobs)

    def __repr__(self) -> str:
        return f"CompiledModule({type(self._model[0]).__name__}, {len(self._variants)} variant(s))"
