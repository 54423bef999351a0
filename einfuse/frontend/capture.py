"""Capture: nn.Module + example inputs -> ATen FX graph via torch.export, with the op set einfuse lowers.

Capture is quiet (torch.export's logs and warnings are held back while it runs; a failure's reason
reaches `explain()` instead) and refuses graphs whose meaning an inference compiler cannot keep: ones
that mutate their inputs or buffers (BatchNorm in train mode) or draw random numbers (dropout in train
mode). Example inputs that share storage are captured as separate tensors, so the graph never assumes
that two inputs are the same tensor."""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import sys
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

# Ops einfuse lowers itself and so keeps out of torch's decompositions (SDPA becomes the attention cascade).
KEEP = ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_attention_math")


@functools.lru_cache(maxsize=1)
def decomposition_table() -> dict:
    """torch.export's core-ATen decompositions minus the ops einfuse lowers directly."""
    table = dict(torch.export.default_decompositions())
    for op in list(table):
        if any(k in str(op) for k in KEEP):
            del table[op]
    return table


_KIND = {InputKind.PARAMETER: "param", InputKind.BUFFER: "buffer", InputKind.CONSTANT_TENSOR: "const",
         InputKind.USER_INPUT: "in"}


class NotCompilable(Exception):
    """The captured graph means something an inference compiler would change (a mutation, randomness):
    the model runs in eager PyTorch, with this reason in `explain()`."""


@dataclass
class Captured:
    """An exported graph with what the runtime needs to call it like the original module."""

    gm: fx.GraphModule
    kinds: dict  # placeholder name -> in | param | buffer | const
    bindings: dict  # placeholder name -> tensor, for params, buffers and constants
    user_inputs: list  # placeholder names of user inputs, in flat order
    program: ExportedProgram | None  # None for a graph torch.compile handed over
    targets: dict = field(default_factory=dict)  # placeholder name -> the model's attribute path (state-dict name)

    @property
    def out_spec(self):
        """How the flat outputs nest (torch.export's tree spec), or None for a flat list."""
        return self.program.call_spec.out_spec if self.program is not None else None

    def user_values(self) -> list:
        """The example value (a fake tensor with symbolic sizes, or a constant) of each user input."""
        vals = {n.name: n.meta.get("val") for n in self.gm.graph.nodes if n.op == "placeholder"}
        return [vals.get(name) for name in self.user_inputs]

    def size_ranges(self) -> dict:
        """Symbolic size -> (lowest, highest) value torch.export allows (highest None: unbounded)."""
        if self.program is None:
            return {}
        out = {}
        for sym, vr in self.program.range_constraints.items():
            lo = int(vr.lower) if math.isfinite(float(vr.lower)) else 0
            hi = int(vr.upper) if math.isfinite(float(vr.upper)) else None
            out[str(sym)] = (lo, hi)
        return out


# Loggers torch.export writes to when it fails (a failed capture is reported by `explain()`, not by ~40 lines
# of torch's log): every logger under these names is switched off while capture runs, then restored.
_QUIET = ("torch",)


@contextlib.contextmanager
def quiet_torch():
    """Hold back torch's logging, warnings and stderr while torch.export runs (all restored afterwards). A
    failed export prints its partial graph to stderr: that text is dropped; after a capture that succeeds,
    whatever reached stderr (the model's own prints) is written out."""
    manager = logging.Logger.manager
    names = [n for n in list(manager.loggerDict) if n.split(".")[0] in _QUIET]
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    held = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(held):
            warnings.simplefilter("ignore")
            yield
        if held.getvalue():
            sys.stderr.write(held.getvalue())
    finally:
        for lg, was in zip(loggers, before):
            lg.disabled = was


def dealiased(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """`args`/`kwargs` with every tensor that shares storage with an earlier one replaced by a copy:
    torch.export would otherwise capture `f(x, x)` as a graph reading one input twice."""
    flat, spec = torch.utils._pytree.tree_flatten((tuple(args), dict(kwargs)))
    seen: set = set()
    changed = False
    for k, x in enumerate(flat):
        if not isinstance(x, torch.Tensor) or x.numel() == 0:
            continue
        ptr = x.untyped_storage().data_ptr()
        if ptr in seen:
            flat[k] = x.clone()
            changed = True
        seen.add(ptr)
    if not changed:
        return tuple(args), dict(kwargs)
    a, k = torch.utils._pytree.tree_unflatten(flat, spec)
    return a, k


def draws_random_numbers(node: fx.Node) -> bool:
    """An op tagged as seeded-random, unless its arguments switch the randomness off (SDPA with dropout_p=0,
    dropout with p=0 or train=False)."""
    target = node.target
    if torch.Tag.nondeterministic_seeded not in getattr(target, "tags", ()):
        return False
    schema = getattr(target, "_schema", None)
    if schema is None:
        return True
    given = {a.name: (node.args[i] if i < len(node.args) else node.kwargs.get(a.name, a.default_value))
             for i, a in enumerate(schema.arguments)}
    if any(given.get(k, None) in (0, 0.0) and not isinstance(given.get(k), bool) for k in ("dropout_p", "p")):
        return False
    return given.get("train", True) is not False


def _refuse(ep: ExportedProgram) -> None:
    """NotCompilable when the graph mutates a buffer, parameter or input, or draws random numbers."""
    sig = ep.graph_signature
    mutated = [s.target for s in sig.output_specs if s.kind in (OutputKind.BUFFER_MUTATION,
                                                                 OutputKind.PARAMETER_MUTATION)]
    if mutated:
        shown = ", ".join(mutated[:4]) + (", ..." if len(mutated) > 4 else "")
        raise NotCompilable(f"the model updates {shown} in place (BatchNorm in train mode does); einfuse compiles "
                            "inference graphs that mutate nothing, so it runs in eager PyTorch: call model.eval() "
                            "before einfuse.compile to compile it")
    inputs = [s.target or s.arg.name for s in sig.output_specs if s.kind == OutputKind.USER_INPUT_MUTATION]
    if inputs:
        raise NotCompilable(f"the model writes into its input(s) {', '.join(inputs)} in place; einfuse compiles graphs "
                            "that mutate nothing, so it runs in eager PyTorch")
    for node in ep.graph.nodes:
        target = node.target
        if node.op == "call_function" and draws_random_numbers(node):
            raise NotCompilable(f"the graph draws random numbers ({target}: dropout in train mode?); einfuse "
                                "compiles deterministic inference graphs, so it runs in eager PyTorch: call "
                                "model.eval() before einfuse.compile to compile it")


def export(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, dynamic_shapes=None) -> Captured:
    """torch.export the model and run core-ATen decompositions (keeping SDPA), quietly.
    Raises NotCompilable for graphs with mutations or randomness; torch.export's own errors propagate."""
    args, kwargs = dealiased(tuple(args), dict(kwargs or {}))
    with quiet_torch():
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        ep = ep.run_decompositions(decomposition_table())  # functional: mutations become outputs
        _refuse(ep)
    kinds, bindings, user, targets = {}, {}, [], {}
    for spec in ep.graph_signature.input_specs:
        name = spec.arg.name
        kind = _KIND.get(spec.kind)
        if kind is None:
            raise NotImplementedError(f"graph input {name} of kind {spec.kind.name} is not supported")
        kinds[name] = kind
        if kind == "in":
            user.append(name)
            continue
        targets[name] = spec.target
        if kind in ("param", "buffer"):
            bindings[name] = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
        else:
            bindings[name] = ep.constants[spec.target]
    return Captured(ep.graph_module, kinds, bindings, user, ep, targets)
