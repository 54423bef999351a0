"""The number formats of docs/quant.md as torch functions on weights: what `quantize_weights`' params hold
(codes, scales, zeros), and the float weight each format stands for. These are the oracle for the IR's
dequantization statements and the quantizer GPTQ calls per column."""
from __future__ import annotations

import torch

PROTECT = 119  # QServe's protective range: level-1 int8 values in [-119, 119]
FP8_MAX = 448.0


def pack_u4(codes: torch.Tensor) -> torch.Tensor:
    """[.., K] codes 0..15 -> [.., ceil(K/2)] bytes, low nibble first (the IR's packed u4 storage)."""
    codes = codes.to(torch.uint8)
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_u4(packed: torch.Tensor, k: int) -> torch.Tensor:
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack([lo, hi], -1).reshape(*packed.shape[:-1], -1)[..., :k]


def groups(k: int, group: int) -> int:
    return (k + group - 1) // group


def expand_groups(t: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """[N, G] per-group values -> [N, K] (the IR's `t[n, k // group]`)."""
    return t.repeat_interleave(group, dim=-1)[..., :k]


# ---------------------------------------------------------------- per-channel

def sym8_scale(w: torch.Tensor, qmax: float = 127.0) -> torch.Tensor:
    return (w.abs().amax(-1).float() / qmax).clamp_min(1e-12)


def quant_sym8(w: torch.Tensor, scale: torch.Tensor | None = None, qmax: float = 127.0):
    """Symmetric int8 per output channel: (codes i8 [N, K], scale f32 [N])."""
    scale = sym8_scale(w, qmax) if scale is None else scale
    q = torch.round(w.float() / scale[:, None]).clamp(-qmax, qmax).to(torch.int8)
    return q, scale


def quant_fp8(w: torch.Tensor, scale: torch.Tensor | None = None):
    """e4m3 per output channel: (codes f8e4m3 [N, K], scale f32 [N] = amax / 448)."""
    scale = sym8_scale(w, FP8_MAX) if scale is None else scale
    return (w.float() / scale[:, None]).to(torch.float8_e4m3fn), scale


# ---------------------------------------------------------------- 4 bits per group

def progressive_params(w8: torch.Tensor, group: int):
    """Level 2 of QServe's progressive quantization, on level-1 integers w8 ([N, K], values in ±119):
    per group an unsigned scale s = max(ceil((max - min) / 15), 1) and zero z = round(-min / s) in [0, 15].
    Returns (s u8 [N, G], z u8 [N, G])."""
    n, k = w8.shape
    g = groups(k, group)
    pad = g * group - k
    x = torch.nn.functional.pad(w8.float(), (0, pad)).view(n, g, group)
    if pad:  # the ragged last group: its padding must not widen the range
        last = x[:, -1, group - pad:]
        last.copy_(x[:, -1, :group - pad].mean(-1, keepdim=True).expand_as(last))
    lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
    s = torch.ceil((hi - lo) / 15).clamp(1, 16)
    z = torch.round(-lo / s).clamp(0, 15)
    return s.to(torch.uint8), z.to(torch.uint8)


def progressive_codes(w8: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group: int) -> torch.Tensor:
    k = w8.shape[-1]
    sf, zf = expand_groups(s, k, group).float(), expand_groups(z, k, group).float()
    return (torch.round(w8.float() / sf) + zf).clamp(0, 15).to(torch.uint8)


def progressive_w8(codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group: int) -> torch.Tensor:
    """The IR's `W_w8 = i8(q * s - z * s)`: level-1 integers from the codes."""
    k = codes.shape[-1]
    sf, zf = expand_groups(s, k, group).to(torch.int16), expand_groups(z, k, group).to(torch.int16)
    return (codes.to(torch.int16) * sf - zf * sf).to(torch.int8)


def asym4_params(w: torch.Tensor, group: int, clip: torch.Tensor | float = 1.0):
    """Asymmetric 4-bit per group of a float weight: (scale f16 [N, G], zero f16 [N, G]) with
    w ~ (q - zero) * scale; `clip` shrinks each group's range (a float, or [N, G])."""
    n, k = w.shape
    g = groups(k, group)
    pad = g * group - k
    x = torch.nn.functional.pad(w.float(), (0, pad)).view(n, g, group)
    if pad:
        last = x[:, -1, group - pad:]
        last.copy_(x[:, -1, :group - pad].mean(-1, keepdim=True).expand_as(last))
    lo, hi = x.amin(-1).clamp(max=0) * clip, x.amax(-1).clamp(min=0) * clip
    scale = ((hi - lo) / 15).clamp_min(1e-8).half().float()
    zero = torch.round(-lo / scale).clamp(0, 15)
    return scale.half(), zero.half()


def asym4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    k = w.shape[-1]
    sf, zf = expand_groups(scale, k, group).float(), expand_groups(zero, k, group).float()
    return (torch.round(w.float() / sf) + zf).clamp(0, 15).to(torch.uint8)


def asym4_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    k = codes.shape[-1]
    return (codes.float() - expand_groups(zero, k, group).float()) * expand_groups(scale, k, group).float()
