"""Per-row ternary grid {w_min, 0, w_max} (QMoE), for einfuse.quant.gptq and round-to-nearest.

The row's low and high values are its min and max (clamped so that 0 lies between them), rounded to fp16
— what the compressed format stores — so the values GPTQ optimizes against are exactly the ones the
decoder produces. Symbols: 0 zero, 1 high, 2 low (einfuse.compress.codec).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant.gptq import gptq, rtn
from .codec import HIGH, LOW, ZERO


@dataclass
class TernaryGrid:
    group_size: int | None = None  # per row over all columns

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo = w.amin(-1).clamp(max=0).to(torch.float16).to(w.dtype)
        hi = w.amax(-1).clamp(min=0).to(torch.float16).to(w.dtype)
        return lo, hi

    def quantize(self, w: torch.Tensor, params):
        lo, hi = params
        up = w > hi / 2
        down = (w < lo / 2) & ~up
        values = torch.where(up, hi, torch.where(down, lo, torch.zeros_like(w)))
        codes = torch.where(up, HIGH, torch.where(down, LOW, ZERO)).to(torch.int32)
        return values, codes


def dequantize(symbols: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Weights [..., rows, cols] (float32) from symbols and the rows' low/high values [..., rows]."""
    s = symbols.long()
    lo = lo.float().unsqueeze(-1)
    hi = hi.float().unsqueeze(-1)
    return torch.where(s == HIGH, hi, torch.where(s == LOW, lo, torch.zeros((), dtype=torch.float32)))


def ternary_rtn(W: torch.Tensor):
    """(symbols uint8, lo, hi) of W [..., rows, cols] by round-to-nearest."""
    res = rtn(W, TernaryGrid())
    lo, hi = res.params[0]
    return res.codes.to(torch.uint8), lo, hi


def ternary_gptq(W: torch.Tensor, H: torch.Tensor, damp: float = 0.01, block: int = 128):
    """(symbols uint8, lo, hi) of W [..., rows, cols] by GPTQ with Hessians H [..., cols, cols]."""
    res = gptq(W, H, TernaryGrid(), damp=damp, block=block)
    lo, hi = res.params[0]
    return res.codes.to(torch.uint8), lo, hi
