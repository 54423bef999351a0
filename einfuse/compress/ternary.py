"""Per-row ternary grid {w_min, 0, w_max} (QMoE), for einfuse.quant.gptq and round-to-nearest.

The row's low and high values are its min and max (clamped so that 0 lies between them), rounded to the
stored 6-bit log scale (`scale_codes`: magnitude = base * 2^(-q/8), q = 0..62, 63 for zero, base the largest
magnitude of the matrix) — so the values GPTQ optimizes against are exactly the ones the decoder produces.
Symbols: 0 zero, 1 high, 2 low (einfuse.compress.codec).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant.gptq import gptq, rtn
from .codec import HIGH, LOW, ZERO


SCALE_STEPS = 8  # log-scale steps per octave (a step is 9%; 63 steps span 7.9 octaves below the base)
SCALE_ZERO = 63  # the 6-bit code of a zero magnitude


def scale_codes(lo: torch.Tensor, hi: torch.Tensor):
    """(q_lo, q_hi) int64 [..., rows] 6-bit log codes and the base [...] (float32: the largest magnitude of
    the rows) of the rows' low (<= 0) and high (>= 0) values."""
    if lo.shape[-1] == 0:  # no rows
        base = torch.zeros(lo.shape[:-1])
    else:
        base = torch.maximum(lo.abs().amax(-1), hi.abs().amax(-1)).float()

    def code(m):
        m = m.abs().double()
        q = torch.round(-SCALE_STEPS * torch.log2(m / base.double().unsqueeze(-1).clamp(min=1e-300)))
        return torch.where(m > 0, q.clamp(0, SCALE_ZERO - 1), torch.full_like(q, SCALE_ZERO)).long()

    return code(lo), code(hi), base


def scale_values(q: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Magnitudes (float32) of 6-bit log codes q [..., rows] against base [...]."""
    m = base.float().unsqueeze(-1) * torch.exp2(-q.float() / SCALE_STEPS)
    return torch.where(q == SCALE_ZERO, torch.zeros_like(m), m)


@dataclass
class TernaryGrid:
    group_size: int | None = None  # per row over all columns

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q_lo, q_hi, base = scale_codes(w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0))
        return -scale_values(q_lo, base).to(w.dtype), scale_values(q_hi, base).to(w.dtype)

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
