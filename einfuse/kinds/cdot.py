"""The cdot kernel kind: fused decompress + GEMV / skinny GEMM over dictionary-coded ternary expert weights.

`cdot(x, ct, d, seg, experts)` computes, for each active expert `experts[a]`, `y[seg[a]:seg[a+1]] =
x[seg[a]:seg[a+1]] @ W_e.T` with W_e never materialized: the Triton kernel (`cdot_triton.cdot_kernel`)
reads each row's codewords from the packed stream, expands them through the dictionary (in registers /
shared memory via tl.gather when it has at most `DICT_IN_REGS_MAX` entries) and multiplies. Tokens are
sorted by expert (the decode regime: 1-16 tokens per expert, `BLOCK_T`), one program per (active expert,
`ROWS_PER_PROGRAM` rows: 16-row groups in a loop, the dictionary loaded once per program;
`rows_per_program` chooses). An expert no token routes to is not in `experts` and its bytes are never read.

`reference(...)` is dequantize-then-matmul, the definition the kernel is tested against; `spec(...)` is
the kernel as a `KernelSpec` for einfuse.codegen.aot.check_gpu (sm_80 / sm_90a, registers and spills).
"""
from __future__ import annotations

import os

import torch

from ..compress.codec import MAX_LEN, Dictionary
from ..compress.format import GROUP, CompressedTensor
from .spec import Arg, KernelSpec, Mapping

DICT_IN_REGS_MAX = 4096
KERNEL = "cdot_kernel"


def padded_dictionary(d: Dictionary) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    size = 1 << d.bits
    pad = size - d.size
    z8 = torch.zeros(pad, dtype=torch.uint8)
    z32 = torch.zeros(pad, dtype=torch.int32)
    return torch.cat([d.lengths, z8]), torch.cat([d.nz, z32]), torch.cat([d.neg, z32]), size


def block_t(tokens_per_expert: int) -> int:
    """Token block: the next power of two >= the most tokens one expert gets, between 1 and 16."""
    b = 1
    while b < min(max(tokens_per_expert, 1), 16):
        b *= 2
    return b


def num_warps(bt: int) -> int:
    """8 warps once the [BLOCK_T, 16, 32] product tile is 4096+ elements (no spills at 12-bit codes, sm_80)."""
    return 8 if bt >= 8 else 4


ROWS_PER_PROGRAM: int | None = None  # set (a multiple of 16): every launch uses it; None: `rows_per_program`
MIN_PROGRAMS = 264  # keep at least this many programs (two per SM of an H100) before merging row groups
MAX_GROUPS_PER_PROGRAM = 8


def rows_per_program(active: int, groups: int) -> int:
    """Rows one program computes (a power-of-two number of 16-row groups, at most 8): as many as keep at
    least MIN_PROGRAMS programs, so that a large expert loads the dictionary once per 128 rows instead of
    once per 16 while a small decode step still spreads over the GPU. `ROWS_PER_PROGRAM` overrides."""
    if ROWS_PER_PROGRAM is not None:
        if ROWS_PER_PROGRAM <= 0 or ROWS_PER_PROGRAM % GROUP:
            raise ValueError(f"einfuse.kinds.cdot: ROWS_PER_PROGRAM={ROWS_PER_PROGRAM} is not a positive "
                             f"multiple of {GROUP}")
        return ROWS_PER_PROGRAM
    k = 1
    while k < MAX_GROUPS_PER_PROGRAM and active * -(-groups // (2 * k)) >= MIN_PROGRAMS:
        k *= 2
    return k * GROUP


def constexprs(ct: CompressedTensor, d: Dictionary, bt: int, rows: int = GROUP) -> dict:
    size = 1 << d.bits
    return {"BITS": d.bits, "MAX_LEN": MAX_LEN, "BLOCK_R": GROUP, "BLOCK_T": bt, "DICT": size,
            "DICT_IN_REGS": size <= DICT_IN_REGS_MAX, "ROWS_PER_PROGRAM": rows}


def cdot(x: torch.Tensor, ct: CompressedTensor, d: Dictionary, seg: torch.Tensor, experts: torch.Tensor,
         out: torch.Tensor | None = None, dict_tensors=None) -> torch.Tensor:
    """y [S, rows] for x [S, cols] (tokens sorted by expert), seg [A+1] token offsets, experts [A] ids.
    `dict_tensors`: `padded_dictionary(d)` computed once by the caller (else per call)."""
    import triton  # noqa: F401  (selects the interpreter on CPU before the kernel module is imported)

    from .cdot_triton import cdot_kernel

    _, N, K = ct.shape
    if x.shape[-1] != K:
        raise ValueError(f"einfuse.kinds.cdot: activations have {x.shape[-1]} features, the compressed "
                         f"weight {tuple(ct.shape)} needs {K}")
    x = x.contiguous().float()
    y = out if out is not None else torch.empty(x.shape[0], N, dtype=torch.float32, device=x.device)
    A = experts.numel()
    if A == 0 or N == 0 or x.shape[0] == 0:
        return y.zero_() if out is None else y
    G = ct.bases.shape[1]
    dl, dn, dg, _ = dict_tensors or padded_dictionary(d)
    seg = seg.to(torch.int32).contiguous()
    most = int((seg[1:] - seg[:-1]).max())
    rows = rows_per_program(A, G)
    consts = constexprs(ct, d, block_t(most), rows)
    cdot_kernel[(A, -(-G // (rows // GROUP)))](x, y, seg, experts.to(torch.int32).contiguous(), ct.codes, ct.counts, ct.bases,
                        ct.scales, dl, dn, dg, N, K, G, x.stride(0), y.stride(0), **consts, num_warps=num_warps(consts["BLOCK_T"]))
    return y


def reference(x: torch.Tensor, W: torch.Tensor, seg: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Dequantize-then-matmul: the same result from dense W [E, rows, cols] (float32)."""
    y = torch.zeros(x.shape[0], W.shape[1], dtype=torch.float32)
    for a, e in enumerate(experts.tolist()):
        s, t = int(seg[a]), int(seg[a + 1])
        y[s:t] = x[s:t].float() @ W[e].T
    return y


def spec(ct: CompressedTensor, d: Dictionary, bt: int = 16, name: str = "cdot", rows: int = 8 * GROUP) -> KernelSpec:
    """The kernel as einfuse's AOT check compiles it (pointer dtypes of `ct`, the chosen constexprs)."""
    path = os.path.join(os.path.dirname(__file__), "cdot_triton.py")
    with open(path) as f:
        source = f.read()
    count_dtype = "u8" if ct.counts.dtype == torch.uint8 else "i16"
    ptrs = [("x_ptr", "f32"), ("y_ptr", "f32"), ("seg_ptr", "i32"), ("expert_ptr", "i32"), ("codes_ptr", "u8"),
            ("counts_ptr", count_dtype), ("bases_ptr", "i32"), ("scales_ptr", "f16"), ("dict_len_ptr", "u8"),
            ("dict_nz_ptr", "i32"), ("dict_neg_ptr", "i32")]
    args = [Arg(n, "ptr", n, t) for n, t in ptrs] + [Arg(n, "size", n) for n in
                                                     ("N", "K", "G", "stride_x", "stride_y")]
    consts = constexprs(ct, d, bt, rows)
    return KernelSpec(name=KERNEL, statements=(name,), outputs=("y",), source=source, args=args,
                      constexprs=consts, grid=[], mapping=Mapping("cdot", tiles=tuple(
                          (k, v) for k, v in consts.items() if k.startswith("BLOCK")), num_warps=num_warps(bt)),
                      meta={"label": name})
