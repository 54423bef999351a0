"""All-reduce + residual add + RMSNorm as one call (TokenWeave's fused communication kernel).

On CUDA with torch's symmetric memory (`torch.distributed._symmetric_memory`), each rank copies its partial
sum into a symmetric buffer and one Triton kernel reads every peer's row straight over NVLink, adds the
residual and normalizes the row: one launch, no separate all-reduce. Elsewhere (gloo on CPU, no symmetric
memory) the same function is an all-reduce followed by the same arithmetic in torch. `KERNEL` is the Triton
source; `aot_check` compiles it for sm_80/sm_90a without a GPU. The CUDA path has not run on GPUs yet (no
multi-GPU machine was available): it is compiled, not measured."""
from __future__ import annotations

import torch
import torch.distributed as tdist

from ..ir import collective as coll

KERNEL_NAME = "allreduce_residual_rmsnorm"
KERNEL = '''import triton
import triton.language as tl


@triton.jit
def allreduce_residual_rmsnorm(peers, residual, weight, out, resid_out, N,
                               WORLD: tl.constexpr, BLOCK: tl.constexpr, EPS: tl.constexpr):
    """One row per program: the sum of the row over every rank's symmetric buffer (peers: a device array of
    their addresses), plus the residual (stored: the next residual), normalized by its RMS and scaled."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for p in tl.static_range(WORLD):
        peer = tl.load(peers + p).to(tl.pointer_type(tl.float32))
        acc += tl.load(peer + row * N + cols, mask=mask, other=0.0)
    h = acc + tl.load(residual + row * N + cols, mask=mask, other=0.0)
    tl.store(resid_out + row * N + cols, h, mask=mask)
    ms = tl.sum(h * h, axis=0) / N
    y = tl.load(weight + cols, mask=mask, other=0.0) * (h * tl.rsqrt(ms + EPS))
    tl.store(out + row * N + cols, y, mask=mask)
'''


def symmetric_memory_available() -> bool:
    """torch's symmetric memory API is importable (it also needs CUDA devices at run time)."""
    try:
        import torch.distributed._symmetric_memory as symm

        return hasattr(symm, "empty") and hasattr(symm, "rendezvous")
    except ImportError:
        return False


def kernel_spec(world: int = 8, hidden: int = 4096, eps: float = 1e-6):
    """The fused kernel as a KernelSpec (for einfuse.codegen.aot.check_gpu)."""
    import triton

    from ..kinds.spec import Arg, KernelSpec, Mapping

    args = [Arg("peers", "ptr", "peers", "i64")] + [Arg(n, "ptr", n, "f32") for n in
                                                     ("residual", "weight", "out", "resid_out")]
    args.append(Arg("N", "size", "N"))
    return KernelSpec(KERNEL_NAME, (), (), KERNEL, args,
                      {"WORLD": world, "BLOCK": triton.next_power_of_2(hidden), "EPS": eps}, ["rows"],
                      Mapping("allreduce_norm", num_warps=8))


def aot_check(archs=(80, 90), world: int = 8, hidden: int = 4096) -> list:
    """Compile the fused kernel ahead of time for each arch (no GPU needed): einfuse.codegen.aot's results."""
    from ..codegen.aot import check_gpu

    return check_gpu([kernel_spec(world, hidden)], archs=archs, progress=False)


_kernel = {}


def _launch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, ranks: tuple):
    import torch.distributed._symmetric_memory as symm
    import triton

    if "fn" not in _kernel:  # Triton reads a kernel's source from its file: load it from one
        import hashlib
        import importlib.util
        import tempfile
        from pathlib import Path

        path = Path(tempfile.gettempdir()) / f"einfuse_{KERNEL_NAME}_{hashlib.sha256(KERNEL.encode()).hexdigest()[:12]}.py"
        if not path.exists():
            path.write_text(KERNEL)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _kernel["fn"] = getattr(module, KERNEL_NAME)
    key = (tuple(x.shape), x.device, ranks)
    if key not in _kernel:  # one symmetric buffer per shape and group, made once (a rendezvous is collective)
        group = coll.group_for(ranks) or tdist.group.WORLD
        buf = symm.empty(tuple(x.shape), dtype=torch.float32, device=x.device)
        handle = symm.rendezvous(buf, group)
        peers = torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=x.device)
        _kernel[key] = (buf, handle, peers)
    buf, handle, peers = _kernel[key]
    buf.copy_(x)
    handle.barrier()
    rows, n = residual.numel() // residual.shape[-1], residual.shape[-1]
    out, h = torch.empty_like(residual), torch.empty_like(residual)
    _kernel["fn"][(rows,)](peers, residual, weight, out, h, n, WORLD=len(ranks),
                           BLOCK=triton.next_power_of_2(n), EPS=eps)
    handle.barrier()  # every peer has read this rank's buffer before it is reused
    return h, out


def allreduce_residual_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                               ranks=()) -> tuple:
    """(h, rmsnorm(h) * weight) with h = residual + all_reduce(x) over `ranks`; x holds the row-major rows of
    `residual`'s shape. The fused kernel on CUDA with symmetric memory, else an all-reduce and torch ops."""
    ranks = tuple(ranks)
    x = x.reshape(residual.shape)
    if x.is_cuda and x.dtype == torch.float32 and symmetric_memory_available():
        return _launch(x.contiguous(), residual.contiguous(), weight.contiguous(), eps, ranks)
    h = residual + coll.start("all_reduce", x, ranks, what="all_reduce (fused with rmsnorm)").wait()
    y = weight * (h * torch.rsqrt(torch.mean(h * h, dim=-1, keepdim=True) + eps))
    return h, y
