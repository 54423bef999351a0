"""Fusion on a Llama layer: kernels and measured bytes with and without the fusion passes (the numbers
docs/PERFORMANCE.md records), and the compile time of the fused layer. Run:
`python -m pytest benchmarks/bench_fusion.py --benchmark-json out.json` (the table is in extra_info)."""
import torch

import einfuse
from einfuse import models
from einfuse.fusion_table import LAYER, measure, text

SEQ = 512


def test_fusion_traffic(benchmark):
    net = models.tiny_llama(**LAYER)
    ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(0))
    benchmark.pedantic(einfuse.compile, args=(net, (ids,)), rounds=3, iterations=1)
    rows = measure(SEQ)
    print("\n" + text(rows, SEQ))
    benchmark.extra_info.update({r.label: vars(r) for r in rows})
    unfused, fused = rows
    assert fused.per_layer <= 8 and fused.unique_bytes <= fused.eager_bytes / 4
