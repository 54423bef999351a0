"""The cdot kernel kind: fused decompress + GEMV / skinny GEMM over dictionary-coded ternary expert weights.

`cdot(x, ct, d, seg, experts)` computes, for each active expert `experts[a]`, `y[seg[a]:seg[a+1]] =
x[seg[a]:seg[a+1]] @ W_e.T` with W_e never materialized (format einfuse-ternary-dict/2). The Triton kernel
(`cdot_triton.cdot_kernel`) runs one program per (active expert, `ROWS_PER_PROGRAM` rows: 16-row groups in
a loop; `rows_per_program` chooses). A group's codewords parse its rows as one symbol stream (a codeword
may run across a row boundary), so a program decodes the rows of a group in sequence from the group's
base, carrying the first codeword touching the next row; each row reads its codewords `BLOCK_W` at a
time from the packed stream, looks each up in the int64 dictionary in global memory (one load per
codeword: length, nonzero count and up to 7 (offset, sign) fields), and multiplies only the nonzeros
with the activations they select. Tokens are sorted by expert (the decode regime: 1-16 tokens per expert,
`BLOCK_T`); an expert no token routes to is not in `experts` and its bytes are never read.

`reference(...)` is dequantize-then-matmul, the definition the kernel is tested against; `spec(...)` is
the kernel as a `KernelSpec` for einfuse.codegen.aot.check_gpu (sm_80 / sm_90a, registers and spills).
"""
from __future__ import annotations

import os

import torch

from ..compress.codec import NZ_MAX, Dictionary
from ..compress.format import GROUP, CompressedTensor
from .spec import Arg, KernelSpec, Mapping

KERNEL = "cdot_kernel"
BLOCK_W = 32  # codeword lanes a row decodes at a time
NZ = 8  # (offset, sign) fields per entry the kernel unpacks: NZ_MAX (7) rounded up to a power of two
assert NZ >= NZ_MAX


def padded_dictionary(d: Dictionary) -> torch.Tensor:
    """The dictionary as the kernel reads it: int64 [2^bits], the entries then zeros (L = 0 padding), so
    that any `bits`-bit value indexes inside it."""
    entries = d.entries.to(torch.int64)
    return torch.cat([entries, torch.zeros((1 << d.bits) - entries.numel(), dtype=torch.int64)])


def block_t(tokens_per_expert: int) -> int:
    """Token block: the next power of two >= the most tokens one expert gets, between 1 and 16."""
    b = 1
    while b < min(max(tokens_per_expert, 1), 16):
        b *= 2
    return b


def num_warps(bt: int) -> int:
    """8 warps from 8 tokens on: the [16, BLOCK_W, NZ] gather tile of 16 tokens spills with 4 (sm_80 and
    sm_90a), with 8 it needs about 80 registers."""
    return 8 if bt >= 8 else 4


def chunks(ct: CompressedTensor) -> int:
    """Chunks of BLOCK_W codewords a row loops over: enough for the most codewords any row touches."""
    return max(1, -(-int(ct.row_codes) // BLOCK_W))


ROWS_PER_PROGRAM: int | None = None  # set (a multiple of 16): every launch uses it; None: `rows_per_program`
MIN_PROGRAMS = 264  # keep at least this many programs (two per SM of an H100) before merging row groups
MAX_GROUPS_PER_PROGRAM = 8


def rows_per_program(active: int, groups: int) -> int:
    """Rows one program computes (a power-of-two number of 16-row groups, at most 8): as many as keep at
    least MIN_PROGRAMS programs, so that a large expert runs fewer, longer programs while a small decode
    step still spreads over the GPU. (A program's own setup is small now: the expert id, token range and
    sbase, 16 bytes; the dictionary is read per codeword, not loaded per program.) `ROWS_PER_PROGRAM`
    overrides."""
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
    return {"BITS": d.bits, "BLOCK_R": GROUP, "BLOCK_T": bt, "BLOCK_W": BLOCK_W, "NZ": NZ,
            "ROWS_PER_PROGRAM": rows}


def cdot(x: torch.Tensor, ct: CompressedTensor, d: Dictionary, seg: torch.Tensor, experts: torch.Tensor,
         out: torch.Tensor | None = None, dict_table: torch.Tensor | None = None) -> torch.Tensor:
    """y [S, rows] for x [S, cols] (tokens sorted by expert), seg [A+1] token offsets, experts [A] ids.
    `dict_table`: `padded_dictionary(d)` computed once by the caller, on x's device (else per call)."""
    import triton  # noqa: F401  (selects the interpreter on CPU before the kernel module is imported)

    from .cdot_triton import cdot_kernel

    _, N, K = ct.shape
    if x.shape[-1] != K:
        raise ValueError(f"einfuse.kinds.cdot: activations have {x.shape[-1]} features, the compressed "
                         f"weight {tuple(ct.shape)} needs {K}")
    if ct.bits != d.bits:
        raise ValueError(f"einfuse.kinds.cdot: the weight is coded in {ct.bits}-bit codewords, the "
                         f"dictionary has {d.bits}")
    x = x.contiguous().float()
    y = out if out is not None else torch.empty(x.shape[0], N, dtype=torch.float32, device=x.device)
    A = experts.numel()
    if A == 0 or N == 0 or x.shape[0] == 0:
        return y.zero_() if out is None else y
    G = ct.bases.shape[1]
    dt = dict_table if dict_table is not None else padded_dictionary(d).to(x.device)
    seg = seg.to(torch.int32).contiguous()
    most = int((seg[1:] - seg[:-1]).max())
    rows = rows_per_program(A, G)
    consts = constexprs(ct, d, block_t(most), rows)
    cdot_kernel[(A, -(-G // (rows // GROUP)))](
        x, y, seg, experts.to(torch.int32).contiguous(), ct.codes, ct.bases, ct.scales, ct.sbase, dt,
        N, K, G, ct.ncodes, chunks(ct), x.stride(0), y.stride(0), **consts,
        num_warps=num_warps(consts["BLOCK_T"]))
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
    ptrs = [("x_ptr", "f32"), ("y_ptr", "f32"), ("seg_ptr", "i32"), ("expert_ptr", "i32"), ("codes_ptr", "u8"),
            ("bases_ptr", "i32"), ("scales_ptr", "u8"), ("sbase_ptr", "f32"), ("dict_ptr", "i64")]
    sizes = ("N", "K", "G", "NCODES", "CHUNKS", "stride_x", "stride_y")
    args = [Arg(n, "ptr", n, t) for n, t in ptrs] + [Arg(n, "size", n) for n in sizes]
    consts = constexprs(ct, d, bt, rows)
    return KernelSpec(name=KERNEL, statements=(name,), outputs=("y",), source=source, args=args,
                      constexprs=consts, grid=[], mapping=Mapping("cdot", tiles=tuple(
                          (k, v) for k, v in consts.items() if k.startswith("BLOCK")), num_warps=num_warps(bt)),
                      meta={"label": name})
