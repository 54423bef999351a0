"""Measured memory traffic: the bytes each kernel loads and stores while it runs under Triton's
interpreter, counting only lanes whose mask is on, plus the distinct bytes it touched."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Traffic:
    """Counters of one kernel launch. `unique` tracks each touched element once per tensor."""

    bytes_loaded: int = 0
    bytes_stored: int = 0
    regions: list = field(default_factory=list)  # (base address, nbytes, element size) of the launch's tensors
    _seen: dict = field(default_factory=dict)  # region index -> bool array of touched elements

    def touch(self, addrs: np.ndarray, elem: int) -> None:
        """Mark the elements at `addrs` touched, each in the first region that holds it (a tensor listed
        twice, or a view inside another listed tensor, is counted once)."""
        for n, (base, nbytes, esize) in enumerate(self.regions):
            inside = (addrs >= base) & (addrs < base + nbytes)
            if not inside.any():
                continue
            seen = self._seen.get(n)
            if seen is None:
                seen = self._seen[n] = np.zeros(max(1, nbytes // esize), dtype=bool)
            seen[((addrs[inside] - base) // esize).astype(np.int64)] = True
            addrs = addrs[~inside]
            if not addrs.size:
                return

    @property
    def unique_bytes(self) -> int:
        return int(sum(int(s.sum()) * self.regions[n][2] for n, s in self._seen.items()))


_active: list = []  # the Traffic being counted (a stack, so nested launches are impossible to confuse)


def _elem_size(handle) -> int:
    ty = handle.get_element_ty()
    return max(1, ty.primitive_bitwidth // 8)


@contextlib.contextmanager
def counting(t: Traffic):
    """Count the loads and stores of interpreter launches inside the block into `t`."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    load, store = builder.create_masked_load, builder.create_masked_store

    def counted_load(ptrs, mask, other, cache_policy, is_volatile):
        if _active:
            _record(_active[-1], ptrs, mask, loaded=True)
        return load(ptrs, mask, other, cache_policy, is_volatile)

    def counted_store(ptrs, value, mask, cache_policy):
        if _active:
            _record(_active[-1], ptrs, mask, loaded=False)
        return store(ptrs, value, mask, cache_policy)

    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    _active.append(t)
    try:
        yield t
    finally:
        _active.pop()
        if not _active:
            builder.create_masked_load, builder.create_masked_store = load, store


def _record(t: Traffic, ptrs, mask, loaded: bool) -> None:
    elem = _elem_size(ptrs)
    on = np.broadcast_to(mask.data, ptrs.data.shape)
    addrs = ptrs.data[on]
    n = int(addrs.size) * elem
    if loaded:
        t.bytes_loaded += n
    else:
        t.bytes_stored += n
    if addrs.size:
        t.touch(addrs.astype(np.uint64).astype(np.int64), elem)
