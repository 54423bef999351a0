"""A custom fusion rule: epilogues may take a bias or a scale, but the residual add stays its own kernel
(say, to keep the residual stream where a collective can overlap it). Compare the `kernel` lines."""
import os
import tempfile

import torch

import einfuse
from einfuse.passes import RULES, Rule, cleanup_passes, fusion_passes
from einfuse.passes.fusion import FuseKernels, flat_identity


def epilogue_without_residual(m, producer, reader, access):
    """Join a map reading the contraction in place, unless the map also reads a full activation."""
    wide = [a for a in reader.reads() if a in m.types() and m.types()[a].rank > 1 and a != producer.name]
    return reader.reduce is None and flat_identity(m.types(), access, reader) and not wide


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 64)

    def forward(self, x):
        return x + torch.relu(self.fc(x))  # bias + relu (epilogue), then a residual add


mine = [r for r in RULES if r.kind != "dot"] + [Rule("epilogue, no residual", "dot", epilogue_without_residual)]
passes = cleanup_passes() + [p if not isinstance(p, FuseKernels) else FuseKernels(mine) for p in fusion_passes()]
x = torch.randn(32, 64)
for label, pipeline in (("default rules", None), ("custom rule", passes)):
    dump = tempfile.mkdtemp(prefix="einfuse-rule-")
    cm = einfuse.compile(Block(), (x,), passes=pipeline, dump_dir=dump, backend="triton")
    print(f"{label}: {len(cm.variant.run.specs)} kernels, max error {(cm(x) - Block.forward(cm._model[0], x)).abs().max():.1e}")
    last = sorted(f for f in os.listdir(dump) if f.endswith(".ir"))[-1]
    print("".join(line for line in open(os.path.join(dump, last)) if line.lstrip().startswith("kernel ")))
