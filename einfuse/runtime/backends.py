"""Execution backends: given a final IR module, a function from named inputs to named outputs."""
from __future__ import annotations

from typing import Callable

from ..ir.evaluator import evaluate
from ..ir.module import Module

BACKENDS: dict[str, Callable[[Module], Callable[[dict], dict]]] = {}


def register_backend(name: str):
    """Decorator registering `factory(module) -> run(inputs) -> outputs` under `name`."""

    def deco(factory):
        BACKENDS[name] = factory
        return factory

    return deco


@register_backend("reference")
def reference(module: Module):
    """The reference evaluator: plain torch ops, the oracle every other backend is checked against."""
    return lambda inputs: evaluate(module, inputs)


def build(name: str, module: Module, **options):
    """The backend's runner for `module`; options (e.g. cuda_graphs) go to backends that take them."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name](module, **options)
