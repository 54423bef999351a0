"""The compressed expert weight in the IR: an encoded element type for the code stream, and the decode the
reference evaluator runs (an opaque call `einfuse.compress.ir:decode_experts`).

`tdict<b>` (b = codeword width, 6..16) is the dtype of a packed dictionary-code stream: category "encoded",
stored as bytes; the tensor's shape is its byte count. Printed, parsed and verified like any dtype
(einfuse.ir.dtypes.register_dtype).
"""
from __future__ import annotations

import torch

from ..ir import dtypes as dt
from .codec import Dictionary
from .format import CompressedTensor


def code_dtype(bits: int) -> dt.DType:
    """The IR dtype of a stream of `bits`-bit codewords (registered on first use)."""
    name = f"tdict{bits}"
    if dt.is_dtype_name(name):
        return dt.by_name(name)
    return dt.register_dtype(dt.DType(name, None, torch.uint8, "encoded", 8, signed=False))


for _b in range(2, 17):  # registered at import, so any dump parses back
    code_dtype(_b)


def stored_weight(codes, bases, scales, sbase, dictionary, *, shape, ncodes, bits, row_codes,
                  checksums=None) -> tuple[CompressedTensor, Dictionary]:
    """The `CompressedTensor` and `Dictionary` a `decode_experts` call's arrays hold (views, no copy; the
    dictionary array is the kernel's padded table: entries of length 0 past its last are padding)."""
    size = int(((dictionary & 127) > 0).sum())
    d = Dictionary(int(bits), (0, 0, 0), dictionary[:size])
    ct = CompressedTensor(tuple(int(s) for s in shape), int(bits), int(ncodes), int(row_codes), codes, bases, scales,
                          sbase, checksums if checksums is not None else torch.zeros(int(shape[0]), 3, dtype=torch.int64))
    return ct, d


def decode_experts(codes, bases, scales, sbase, dictionary, *, shape, ncodes, bits, row_codes, dtype="float32",
                   checksums=None, stored_bytes=None, dense_bytes=None, bits_per_param=None):
    """Dense W [E, rows, cols] from the stored arrays (the reference evaluator's decode of a compressed
    weight; the fused kernel computes with the same values). Verifies per-expert checksums when given.
    `stored_bytes`, `dense_bytes`, `bits_per_param` are the sizes the dump shows (informational).
    The torch backend's routed experts never call it: they compute with the stored arrays directly
    (einfuse.codegen.torch_moe, `MoEPlan.compressed`)."""
    ct, d = stored_weight(codes, bases, scales, sbase, dictionary, shape=shape, ncodes=ncodes, bits=bits,
                          row_codes=row_codes, checksums=checksums)
    if checksums is not None:
        ct.verify("compressed expert weight")
    return ct.dequantize(d).to(getattr(torch, dtype))
