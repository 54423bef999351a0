"""Fusion's effect on one Llama layer, measured: kernels and bytes (all accesses, distinct) with and
without the fusion passes, beside eager PyTorch's op-by-op bytes and the minimum. Used by the demo and
benchmarks/bench_fusion.py."""
from __future__ import annotations

from dataclasses import dataclass

import torch

LAYER = dict(layers=1, hidden=256, heads=4, kv_heads=2, intermediate=512)


@dataclass
class Row:
    label: str
    kernels: int
    per_layer: int  # kernels a decoder layer adds (see kernels_per_layer)
    total_bytes: int
    unique_bytes: int
    eager_bytes: int
    min_bytes: int
    max_rel_error: float


def kernels_per_layer(two, three, ids, passes=None) -> int:
    """Kernels a decoder layer adds: the 3-layer model's count minus the 2-layer one's. (Not 2 - 1: a
    model's first layer reads the embedding, which a lone layer fuses as a gather but a layer compiled
    once for every layer reads as a tensor.)"""
    import einfuse

    counts = [len(einfuse.compile(net, (ids,), passes=passes, backend="triton").variant.run.specs)
              for net in (two, three)]
    return counts[1] - counts[0]


def measure(seq: int = 512) -> list[Row]:
    import einfuse
    from einfuse import models
    from einfuse.passes import cleanup_passes
    from einfuse.passes.instruments import max_rel_error

    net = models.tiny_llama(**LAYER)
    g = torch.Generator().manual_seed(0)
    ids, fresh = torch.randint(0, 256, (1, seq), generator=g), torch.randint(0, 256, (1, seq), generator=g)
    two, three = (models.tiny_llama(**{**LAYER, "layers": n}) for n in (2, 3))
    rows = []
    for label, passes in (("without fusion", cleanup_passes()), ("with fusion", None)):
        cm = einfuse.compile(net, (ids,), passes=passes, backend="triton")
        with torch.no_grad():
            err = max_rel_error(cm(fresh).logits, net(fresh).logits)
        rep = cm.report(fresh)
        kernels = len(cm.variant.run.specs)
        per_layer = kernels_per_layer(two, three, ids, passes)
        rows.append(Row(label, kernels, per_layer, rep.total_bytes, rep.unique_bytes, rep.eager_bytes,
                        rep.min_bytes, err))
    return rows


def text(rows: list[Row], seq: int) -> str:
    out = [f"Llama layer (hidden 256, intermediate 512, 4 heads / 2 KV heads), {seq} tokens, fp32, "
           "bytes measured under Triton's interpreter",
           f"{'':16}{'kernels':>9}{'per layer':>10}{'bytes accessed':>16}{'distinct bytes':>16}{'eager bytes':>14}"
           f"{'minimum':>12}{'max err':>10}"]
    for r in rows:
        out.append(f"{r.label:16}{r.kernels:>9}{r.per_layer:>10}{r.total_bytes:>16,}{r.unique_bytes:>16,}"
                   f"{r.eager_bytes:>14,}{r.min_bytes:>12,}{r.max_rel_error:>10.1e}")
    fused = rows[-1]
    out.append(f"with fusion: distinct bytes are {fused.unique_bytes / fused.eager_bytes:.3f} of eager's op-by-op bytes")
    return "\n".join(out)
