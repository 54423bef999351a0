"""The traffic report: measured bytes per kernel, FLOPs from the IR, and an H100 roofline *model*."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..ir.cost import min_bytes, statement_flops
from ..ir.module import Opaque

H100_BYTES_PER_S = 3.35e12  # HBM3
H100_FLOPS = 989e12  # bf16 dense tensor-core peak
MODEL_LABEL = "roofline model for H100 (3.35 TB/s, 989 TFLOP/s bf16 dense), not a timing"


def roofline_us(nbytes: float, flops: float) -> float:
    return max(nbytes / H100_BYTES_PER_S, flops / H100_FLOPS) * 1e6


@dataclass
class KernelReport:
    """One kernel: measured bytes (all accesses, and distinct addresses), FLOPs, the model's time."""

    name: str
    statements: tuple
    bytes_loaded: int
    bytes_stored: int
    unique_bytes: int
    flops: int
    measured: bool = True  # False for opaque calls: their bytes are their tensors' sizes

    @property
    def total_bytes(self) -> int:
        return self.bytes_loaded + self.bytes_stored

    @property
    def intensity(self) -> float:
        return self.flops / max(1, self.total_bytes)

    @property
    def roofline_us(self) -> float:
        return roofline_us(self.unique_bytes, self.flops)


@dataclass
class Report:
    """Per-kernel records and totals beside the minimum possible and eager PyTorch's op-by-op bytes."""

    kernels: list
    min_bytes: int
    eager_bytes: int | None
    label: str = MODEL_LABEL
    allocations: list = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(k.total_bytes for k in self.kernels)

    @property
    def unique_bytes(self) -> int:
        return sum(k.unique_bytes for k in self.kernels)

    @property
    def flops(self) -> int:
        return sum(k.flops for k in self.kernels)

    @property
    def roofline_us(self) -> float:
        return sum(k.roofline_us for k in self.kernels)

    def text(self, top: int = 20) -> str:
        rows = sorted(self.kernels, key=lambda k: -k.total_bytes)
        lines = [f"{'kernel':<44}{'loaded':>12}{'stored':>12}{'distinct':>12}{'FLOPs':>14}{'FLOP/B':>8}{'model us':>10}"]
        for k in rows[:top]:
            tag = "" if k.measured else " (opaque)"
            lines.append(f"{(k.name + tag)[:43]:<44}{k.bytes_loaded:>12,}{k.bytes_stored:>12,}{k.unique_bytes:>12,}"
                         f"{k.flops:>14,}{k.intensity:>8.2f}{k.roofline_us:>10.3f}")
        if len(rows) > top:
            lines.append(f"... and {len(rows) - top} more kernels")
        lines.append(f"{len(self.kernels)} kernels: {self.total_bytes:,} bytes accessed, {self.unique_bytes:,} distinct, "
                     f"{self.flops:,} FLOPs")
        lines.append(f"minimum bytes (inputs, weights, outputs once): {self.min_bytes:,}")
        if self.eager_bytes is not None:
            lines.append(f"eager PyTorch op-by-op bytes: {self.eager_bytes:,}")
        lines.append(f"{self.roofline_us:.2f} us total — {self.label}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"label": self.label, "total_bytes": self.total_bytes, "unique_bytes": self.unique_bytes,
                "min_bytes": self.min_bytes, "eager_bytes": self.eager_bytes, "flops": self.flops,
                "roofline_us": self.roofline_us,
                "kernels": [asdict(k) | {"intensity": k.intensity, "roofline_us": k.roofline_us} for k in self.kernels]}

    def write(self, directory: str) -> None:
        """report.json and roofline.png in `directory`."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "report.json"), "w") as f:
            json.dump(self.to_json(), f, indent=1)
        self.plot(os.path.join(directory, "roofline.png"))

    def plot(self, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        ridge = H100_FLOPS / H100_BYTES_PER_S
        xs = [0.01, ridge, 1e4]
        ax.plot(xs, [min(x * H100_BYTES_PER_S, H100_FLOPS) / 1e12 for x in xs], "k-", lw=1.5, label="H100 roof")
        for k in self.kernels:
            if k.flops and k.unique_bytes:
                x = k.flops / k.unique_bytes
                y = k.flops / (k.roofline_us * 1e-6) / 1e12
                ax.scatter([x], [y], s=14, alpha=0.7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (FLOP / distinct byte)")
        ax.set_ylabel("attainable TFLOP/s")
        ax.set_title("einfuse kernels on the H100 roofline (a model, not a timing)", fontsize=10)
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


# ---------------------------------------------------------------- eager PyTorch's bytes

class EagerBytes(TorchDispatchMode):
    """Counts, for every ATen op that is not a view, the bytes of its tensor inputs and outputs: what
    eager PyTorch moves when each op reads its operands from memory and writes its result."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not (getattr(func, "is_view", False) or func.__name__.startswith(("_assert", "detach", "lift"))):
            tensors = [x for x in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(x, torch.Tensor)]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
            self.ops += 1
        return out


def eager_bytes(model, args, kwargs) -> int:
    with torch.no_grad(), EagerBytes() as counter:
        model(*args, **kwargs)
    return counter.bytes


def _nbytes(t, sizes: dict) -> int:
    n = 1
    for d in t.storage_shape(sizes):
        n *= d
    return n * t.dtype.storage.itemsize


def build_report(runner, sizes: dict, eager: int | None) -> Report:
    """Combine a measured run of a TritonRunner with FLOPs from the IR."""
    m = runner.module
    flops = {op.name: statement_flops(op, sizes) for op in m.statements}
    types = m.types()
    kernels = []
    for step in runner.steps:
        if step.skip:
            continue
        if step.spec is not None:
            st = runner.stats.get(step.spec.name)
            if st is None:
                continue
            kernels.append(KernelReport(st.name, st.statements, st.bytes_loaded, st.bytes_stored, st.unique_bytes,
                                        sum(flops.get(s, 0) for s in st.statements)))
        else:
            op: Opaque = step.op
            ins = sum(_nbytes(types[n], sizes) for n in op.reads())
            outs = sum(_nbytes(types[n], sizes) for n in op.outputs)
            kernels.append(KernelReport(f"opaque {op.target}", op.outputs, ins, outs, ins + outs, 0, measured=False))
    return Report(kernels, min_bytes(m, sizes), eager, allocations=list(runner.allocations))
