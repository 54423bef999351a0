"""Liveness-based buffer planning: an intermediate tensor takes the storage of one that is dead."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Allocation:
    """One entry of the allocation log: which tensor, its size, and whether it reused a buffer."""

    name: str
    shape: tuple
    dtype: torch.dtype
    nbytes: int
    buffer: int  # index of the pool buffer it lives in
    reused: bool


@dataclass
class Pool:
    """Byte buffers handed out best-fit and returned when the tensor living in them dies."""

    device: torch.device
    buffers: list = field(default_factory=list)  # [uint8 tensor]
    free: list = field(default_factory=list)  # indices of free buffers
    log: list = field(default_factory=list)

    def take(self, name: str, shape: tuple, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
        """A tensor of `shape` in a pool buffer, and the buffer's index (-1: an empty tensor needs none)."""
        numel = 1
        for n in shape:
            numel *= n
        if numel == 0:  # nothing to store: no buffer and no log entry (a 1-byte buffer
            # cannot be viewed as a wider dtype)
            return torch.empty(shape, dtype=dtype, device=self.device), -1
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        fits = [b for b in self.free if self.buffers[b].numel() >= nbytes]
        if fits:
            b = min(fits, key=lambda i: self.buffers[i].numel())
            self.free.remove(b)
            reused = True
        else:
            self.buffers.append(torch.empty(nbytes, dtype=torch.uint8, device=self.device))
            b = len(self.buffers) - 1
            reused = False
        self.log.append(Allocation(name, tuple(shape), dtype, nbytes, b, reused))
        return self.buffers[b][:nbytes].view(dtype).view(shape), b

    def give_back(self, b: int) -> None:
        if b >= 0:
            self.free.append(b)

    @property
    def peak_bytes(self) -> int:
        return sum(b.numel() for b in self.buffers)
