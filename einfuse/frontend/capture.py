"""Capture: nn.Module + example inputs -> ATen FX graph via torch.export, with the op set einfuse lowers."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

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


@dataclass
class Captured:
    """An exported graph with what the runtime needs to call it like the original module."""

    gm: fx.GraphModule
    kinds: dict  # placeholder name -> in | param | buffer | const
    bindings: dict  # placeholder name -> tensor, for params, buffers and constants
    user_inputs: list  # placeholder names of user inputs, in flat order
    program: ExportedProgram | None  # None for a graph torch.compile handed over

    @property
    def out_spec(self):
        """How the flat outputs nest (torch.export's tree spec), or None for a flat list."""
        return self.program.call_spec.out_spec if self.program is not None else None


def export(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, dynamic_shapes=None) -> Captured:
    """torch.export the model and run core-ATen decompositions (keeping SDPA)."""
    ep = torch.export.export(model, tuple(args), kwargs or {}, dynamic_shapes=dynamic_shapes, strict=False)
    ep = ep.run_decompositions(decomposition_table())
    kinds, bindings, user = {}, {}, []
    for spec in ep.graph_signature.input_specs:
        name = spec.arg.name
        kind = _KIND.get(spec.kind)
        if kind is None:
            raise NotImplementedError(f"graph input {name} of kind {spec.kind.name} is not supported")
        kinds[name] = kind
        if kind == "in":
            user.append(name)
        elif kind in ("param", "buffer"):
            bindings[name] = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
        else:
            bindings[name] = ep.constants[spec.target]
    return Captured(ep.graph_module, kinds, bindings, user, ep)
