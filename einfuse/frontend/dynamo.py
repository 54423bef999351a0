"""`torch.compile(model, backend="einfuse")`: dynamo hands over an FX graph; AOTAutograd turns it into
ATen with the same decompositions torch.export uses, and the forward graph goes through the same
lowering, passes and backend as `einfuse.compile`."""
from __future__ import annotations

import logging
import os

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

from .capture import decomposition_table
from .lower import lower_graph

log = logging.getLogger("einfuse")
COMPILED: list = []  # (lowering report, final IR) of every graph compiled in this process, newest last


def _forward_compiler(gm: torch.fx.GraphModule, example_inputs):
    from ..api import DEFAULT_BACKEND, optimize
    from ..runtime import backends

    try:
        lowered = lower_graph(gm, {}, "dynamo_graph")
        lowered.report.capture = "torch.compile (dynamo + AOTAutograd)"
    except Exception as exc:  # never fail compilation: run this graph as torch would
        log.warning("einfuse: graph left to torch, lowering failed: %s", exc)
        return make_boxed_func(gm.forward)
    dump = os.environ.get("EINFUSE_DUMP_DIR") or None
    if dump:
        dump = os.path.join(dump, f"dynamo_{len(COMPILED)}")
    final, _ = optimize(lowered.module, None, dump)
    run = backends.build(os.environ.get("EINFUSE_BACKEND", DEFAULT_BACKEND), final)
    COMPILED.append((lowered.report, final))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = {i.name for i in final.inputs}

    def forward(args):
        inputs = {p.name: a for p, a in zip(placeholders, args) if p.name in names}
        args.clear()  # boxed calling convention: let the caller's inputs be freed
        with torch.no_grad():
            out = run(inputs)
        return [out[x] if kind == "tensor" else x for kind, x in lowered.out_leaves]

    forward._boxed_call = True
    return forward


einfuse_backend = aot_autograd(fw_compiler=_forward_compiler, decompositions=decomposition_table())


def register() -> None:
    """Make "einfuse" a name torch.compile accepts (also declared as a torch_dynamo_backends entry point)."""
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if "einfuse" not in _COMPILER_FNS:
        register_backend(name="einfuse")(einfuse_backend)
