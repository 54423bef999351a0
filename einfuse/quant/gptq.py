"""GPTQ (Frantar et al. 2022): one-shot weight quantization with second-order information, batched.

A linear layer `y = x @ W.T` (W: [rows, cols]) is quantized column by column; each column's rounding error
is spread onto the columns not yet quantized through the inverse Hessian `H = 2/n * X.T @ X` of the layer
inputs seen on calibration tokens. As in the paper: dampening (`damp` * mean diagonal added to the
diagonal), lazy block updates (`block` columns at a time, the rest updated once per block), and the upper
Cholesky factor of `H^-1` in place of the inverse itself.

Everything is batched over leading dimensions: W `[..., rows, cols]` with H `[..., cols, cols]` quantizes
all experts of a layer at once (each with its own Hessian).

The grid is a callback object (`Grid`) so any quantizer plugs in:

* `fit(w)` -> params: grid parameters for a slab of columns `w` `[..., rows, n]` (per row over all
  columns when `group_size` is None, else one call per group of `group_size` columns, fitted on the
  error-updated weights as GPTQ does);
* `quantize(w, params)` -> `(values, codes)`: one column `w` `[..., rows]` rounded to the grid; `values`
  are the dequantized floats, `codes` the integer symbols a codec stores.

`UniformGrid` (b-bit asymmetric min/max, optional groups) is the standard grid; ternary expert grids live
in `einfuse.compress.ternary`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

__all__ = ["GPTQResult", "Grid", "Hessian", "UniformGrid", "gptq", "rtn"]


class Grid(Protocol):
    group_size: int | None

    def fit(self, w: torch.Tensor) -> Any: ...

    def quantize(self, w: torch.Tensor, params: Any) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class UniformGrid:
    """`bits`-bit asymmetric grid from each row's (group's) min and max; zero is always representable."""

    bits: int = 4
    group_size: int | None = None

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo = w.amin(-1).clamp(max=0)
        hi = w.amax(-1).clamp(min=0)
        maxq = 2 ** self.bits - 1
        scale = (hi - lo) / maxq
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale)
        return scale, zero

    def quantize(self, w, params):
        scale, zero = params
        q = torch.clamp(torch.round(w / scale) + zero, 0, 2 ** self.bits - 1)
        return scale * (q - zero), q.to(torch.int32)


class Hessian:
    """Running `2/n * X.T @ X` per expert (leading shape `batch`), fed token rows `x` `[n, cols]`."""

    def __init__(self, cols: int, batch: tuple[int, ...] = (), dtype=torch.float64):
        self.H = torch.zeros(*batch, cols, cols, dtype=dtype)
        self.count = torch.zeros(batch, dtype=torch.long)

    def add(self, x: torch.Tensor, index: tuple[int, ...] | int = ()) -> None:
        """Accumulate tokens `x` [n, cols] into expert `index` (an empty tuple when unbatched)."""
        x = x.reshape(-1, x.shape[-1]).to(self.H.dtype)
        n = x.shape[0]
        if n == 0:
            return
        if isinstance(index, int):
            index = (index,)
        total = int(self.count[index]) + n
        h = self.H[index]
        h.mul_((total - n) / total)
        h.add_(x.T @ x, alpha=2.0 / total)
        self.count[index] = total


@dataclass
class GPTQResult:
    weight: torch.Tensor  # dequantized weights, the input's shape and dtype
    codes: torch.Tensor  # int32 symbols from Grid.quantize, same shape
    params: list[Any]  # one entry (per-row grid) or one per group of columns, in column order
    loss: torch.Tensor  # [..., rows]: sum over columns of err^2 / d^2 / 2 (the GPTQ objective's proxy)
    dead: torch.Tensor = field(default=None)  # [..., cols] bool: columns no calibration token touched


def _prepare_hessian(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    H = H.to(torch.float64).clone()
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1.0  # a column no token touched: no error to spread from/onto it; quantized as by RTN
    mean = diag.mean(-1, keepdim=True)
    diag.add_(damp * mean)
    return H, dead


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1; retries with 10x dampening (up to 3 times) if H is not PD."""
    for attempt in range(4):
        L, info = torch.linalg.cholesky_ex(H)
        if int(info.max()) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info.max()) == 0:
                return U
        diag = torch.diagonal(H, dim1=-2, dim2=-1)
        diag.add_(damp * 10 ** attempt * diag.mean(-1, keepdim=True))
    raise RuntimeError("einfuse.quant.gptq: the Hessian is not positive definite even with 1000x dampening; "
                       "pass more calibration tokens or a larger damp=")


def gptq(W: torch.Tensor, H: torch.Tensor, grid: Grid, *, damp: float = 0.01, block: int = 128,
         act_order: bool = False) -> GPTQResult:
    """Quantize W `[..., rows, cols]` onto `grid` with GPTQ using Hessians H `[..., cols, cols]`.

    `act_order` visits columns in order of decreasing Hessian diagonal (per expert); with groups the group
    parameters are then fitted up front on the original weights ("static groups").
    """
    if W.dim() < 2 or H.shape[-1] != W.shape[-1] or H.shape[-2] != W.shape[-1]:
        raise ValueError(f"einfuse.quant.gptq: weight {tuple(W.shape)} needs Hessians [..., {W.shape[-1]}, "
                         f"{W.shape[-1]}], got {tuple(H.shape)}")
    H = H.expand(*W.shape[:-2], *H.shape[-2:])
    out_dtype = W.dtype
    cols = W.shape[-1]
    W = W.to(torch.float64).clone()
    H, dead = _prepare_hessian(H, damp)
    gs = grid.group_size
    if gs is not None:
        block = max(gs, block // gs * gs)  # a group never straddles two blocks
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H, dim1=-2, dim2=-1), dim=-1, descending=True)
        static = [grid.fit(W[..., g:g + gs]) for g in range(0, cols, gs)] if gs else None
        W = torch.gather(W, -1, perm.unsqueeze(-2).expand_as(W))
        H = torch.gather(H, -1, perm.unsqueeze(-2).expand_as(H))
        H = torch.gather(H, -2, perm.unsqueeze(-1).expand_as(H))
    U = _inverse_cholesky(H, damp)
    Q = torch.zeros_like(W)
    codes = torch.zeros(W.shape, dtype=torch.int32)
    losses = torch.zeros(W.shape[:-1], dtype=torch.float64)
    params_list: list[Any] = []
    params = None if gs is not None else grid.fit(W)
    if gs is None:
        params_list.append(params)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[..., i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[..., i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if gs is not None:
                if act_order:
                    # static groups: the group of the column's original position
                    g = perm[..., col] // gs  # [...]
                    params = _select_group(static, g)
                elif col % gs == 0:
                    params = grid.fit(W1[..., i:i + gs])
                    params_list.append(params)
            w = W1[..., i]
            d = U1[..., i, i].unsqueeze(-1)
            q, c = grid.quantize(w, params)
            q = q.to(torch.float64)
            Q[..., col] = q
            codes[..., col] = c
            losses += (w - q) ** 2 / d ** 2 / 2
            err = (w - q) / d
            W1[..., i:] -= err.unsqueeze(-1) * U1[..., i, i:].unsqueeze(-2)
            Err1[..., i] = err
        W[..., i2:] -= Err1 @ U[..., i1:i2, i2:]
    if act_order:
        inv = torch.argsort(perm, dim=-1)
        Q = torch.gather(Q, -1, inv.unsqueeze(-2).expand_as(Q))
        codes = torch.gather(codes, -1, inv.unsqueeze(-2).expand_as(codes))
        if gs is not None:
            params_list = static
    return GPTQResult(Q.to(out_dtype), codes, params_list, losses, dead)


def _select_group(static: list, g: torch.Tensor):
    """Per-expert group parameters for act-order: params of group g[e] for each expert e (rows kept)."""
    first = static[0]
    if isinstance(first, tuple):
        return tuple(_select_group([p[k] for p in static], g) for k in range(len(first)))
    stacked = torch.stack(static, 0)  # [groups, ..., rows]
    idx = g.reshape(1, *g.shape, *([1] * (stacked.dim() - 1 - g.dim()))).expand(1, *stacked.shape[1:])
    return torch.gather(stacked, 0, idx)[0]


def rtn(W: torch.Tensor, grid: Grid) -> GPTQResult:
    """Round-to-nearest onto the same grid (the baseline GPTQ is measured against)."""
    cols = W.shape[-1]
    Wd = W.to(torch.float64)
    gs = grid.group_size or cols
    Q = torch.zeros_like(Wd)
    codes = torch.zeros(W.shape, dtype=torch.int32)
    params_list = []
    for g in range(0, cols, gs):
        params = grid.fit(Wd[..., g:g + gs])
        params_list.append(params)
        q, c = grid.quantize(Wd[..., g:g + gs], _broadcast_cols(params))
        Q[..., g:g + gs] = q
        codes[..., g:g + gs] = c
    loss = torch.zeros(W.shape[:-1], dtype=torch.float64)
    return GPTQResult(Q.to(W.dtype), codes, params_list, loss, torch.zeros(*W.shape[:-2], cols, dtype=torch.bool))


def _broadcast_cols(params):
    """Grid params shaped [..., rows] -> [..., rows, 1] so quantize() rounds a slab of columns at once."""
    if isinstance(params, tuple):
        return tuple(_broadcast_cols(p) for p in params)
    return params.unsqueeze(-1)
