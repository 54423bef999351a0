"""`torch.compile(model, backend="einfuse")`, the frontend half: dynamo hands over an FX graph and
AOTAutograd turns it into ATen with the decompositions torch.export uses. `as_captured` gives the forward
graph the same shape `einfuse.compile`'s capture has, so one driver (`einfuse.api`) lowers, optimizes,
dumps, checks, caches and runs both."""
from __future__ import annotations

import torch

from .capture import Captured

COMPILED: list = []  # the variant (final IR, lowering report, timings) of every graph torch.compile handed einfuse


def as_captured(gm: torch.fx.GraphModule) -> Captured:
    """AOTAutograd's forward graph as a capture: every placeholder (weights included) is a call input;
    tensors the graph holds itself (constants made in forward, `get_attr` nodes) are bound constants."""
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    constants = {n.name: getattr(gm, n.target) for n in gm.graph.nodes
                 if n.op == "get_attr" and isinstance(getattr(gm, n.target, None), torch.Tensor)}
    return Captured(gm, {n: "in" for n in names}, constants, names, None)
