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
    per_layer: int  # kernels a decoder layer adds (a 2-layer model's count minus the 1-layer model's)
    total_bytes: int
    unique_bytes: int
    eager_bytes: int
    min_bytes: int
    max_rel_error: float


def measure(seq: int = 512) -> list[Row]:
    import einfuse
    from einfuse import models
    from einfuse.passes import cleanup_passes
    from einfuse.passes.instruments import max_rel_error

    net = models.tiny_llama(**LAYER)
    g = torch.Generator().manual_seed(0)
    ids, fresh = torch.randint(0, 256, (1, seq), generator=g), torch.randint(0, 256, (1, seq), generator=g)
    two = models.tiny_llama(**{**LAYER, "layers": 2})
    rows = []
    for label, passes in (("without fusion", cleanup_passes()), ("with fusion", None)):
        cm = einfuse.compile(net, (ids,), passes=passes)
        with torch.no_grad():
            err = max_rel_error(cm(fresh).logits, net(fresh).logits)
        rep = cm.report(fresh)
        kernels = len(cm.variant.run.specs)
        per_layer = len(einfuse.compile(two, (ids,), passes=passes).variant.run.specs) - kernels
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
