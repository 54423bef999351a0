"""The traffic report: measured bytes per kernel, FLOPs from the IR, and an H100 roofline *model*."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..codegen import ModuleInfo, cost
from ..ir.cost import min_bytes
from ..ir.module import Opaque

H100_BYTES_PER_S = 3.35e12  # HBM3
# H100 SXM dense peaks (NVIDIA's datasheet, no sparsity) by what a kernel computes with: a contraction on tensor
# cores in its operand type, every other kernel on CUDA cores.
PEAKS = {
    "fp32": 67e12,  # CUDA cores (and IEEE-f32 contractions, which do not use tensor cores)
    "fp64": 67e12,  # fp64 tensor cores (fp64 CUDA cores: 34)
    "tf32": 495e12,
    "bf16/fp16": 989e12,
    "fp8/int8": 1979e12,
}
H100_FLOPS = PEAKS["bf16/fp16"]  # bf16 dense tensor-core peak
MODEL_LABEL = ("roofline model for H100 (3.35 TB/s; each kernel against the peak of its type: fp32 67, tf32 495, "
               "bf16/fp16 989, fp8/int8 1979 TFLOP/s dense), not a timing")
INTENSITY = "FLOP/B: FLOPs per distinct byte (each address once), the intensity the roofline plot uses"


def roofline_us(nbytes: float, flops: float, peak: float = H100_FLOPS) -> float:
    return max(nbytes / H100_BYTES_PER_S, flops / peak) * 1e6


@dataclass
class KernelReport:
    """One kernel: measured bytes (all accesses, and distinct addresses), FLOPs, the peak of its type, the
    model's time."""

    name: str
    statements: tuple
    bytes_loaded: int
    bytes_stored: int
    unique_bytes: int
    flops: int
    measured: bool = True  # False for opaque calls: their bytes are their tensors' sizes
    peak: str = "fp32"  # a key of PEAKS: the compute the kernel runs on

    @property
    def total_bytes(self) -> int:
        return self.bytes_loaded + self.bytes_stored

    @property
    def intensity(self) -> float:
        """FLOPs per distinct byte: the roofline's x (HBM traffic, assuming caches catch re-reads)."""
        return self.flops / max(1, self.unique_bytes)

    @property
    def peak_flops(self) -> float:
        return PEAKS[self.peak]

    @property
    def roofline_us(self) -> float:
        return roofline_us(self.unique_bytes, self.flops, self.peak_flops)


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
        lines = [f"{'kernel':<44}{'loaded':>12}{'stored':>12}{'distinct':>12}{'FLOPs':>14}{'FLOP/B':>8}{'peak':>10}"
                 f"{'model us':>10}"]
        for k in rows[:top]:
            tag = "" if k.measured else " (opaque)"
            lines.append(f"{(k.name + tag)[:43]:<44}{k.bytes_loaded:>12,}{k.bytes_stored:>12,}{k.unique_bytes:>12,}"
                         f"{k.flops:>14,}{k.intensity:>8.2f}{k.peak if k.flops else '-':>10}{k.roofline_us:>10.3f}")
        if len(rows) > top:
            lines.append(f"... and {len(rows) - top} more kernels")
        lines.append(f"{len(self.kernels)} kernels: {self.total_bytes:,} bytes accessed, {self.unique_bytes:,} distinct, "
                     f"{self.flops:,} FLOPs")
        lines.append(INTENSITY)
        lines.append(f"minimum bytes (inputs, weights, outputs once): {self.min_bytes:,}")
        if self.eager_bytes is not None:
            lines.append(f"eager PyTorch op-by-op bytes (ops that move data; views move none): {self.eager_bytes:,}")
        lines.append(f"{self.roofline_us:.2f} us total — {self.label}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"label": self.label, "intensity": INTENSITY, "total_bytes": self.total_bytes,
                "unique_bytes": self.unique_bytes, "min_bytes": self.min_bytes, "eager_bytes": self.eager_bytes,
                "flops": self.flops, "roofline_us": self.roofline_us,
                "kernels": [asdict(k) | {"intensity": k.intensity, "peak_flops": k.peak_flops,
                                         "roofline_us": k.roofline_us} for k in self.kernels]}

    def write(self, directory: str) -> None:
        """report.json and roofline.png in `directory`."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "report.json"), "w") as f:
            json.dump(self.to_json(), f, indent=1)
        self.plot(os.path.join(directory, "roofline.png"))

    def plot(self, path: str, labels: int = 8) -> list[str]:
        """The roofline model: one roof per peak the kernels use, each kernel at (FLOP per distinct byte,
        attainable FLOP/s), marker area by distinct bytes, the `labels` kernels with the most bytes named.
        Returns the named kernels."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        shown = [k for k in self.kernels if k.flops and k.unique_bytes]
        peaks = sorted({k.peak for k in shown}, key=lambda p: PEAKS[p]) or ["fp32"]
        colors = dict(zip(sorted(PEAKS, key=PEAKS.get), ["tab:blue", "tab:purple", "tab:orange", "tab:red",
                                                           "tab:green"]))
        fig, ax = plt.subplots(figsize=(10, 6))
        xs = [k.intensity for k in shown] or [1.0]
        lo, hi = min(min(xs) / 4, 0.05), max(max(xs) * 4, 2 * max(PEAKS[p] for p in peaks) / H100_BYTES_PER_S)
        for n, p in enumerate(peaks):
            ridge = PEAKS[p] / H100_BYTES_PER_S
            line = [lo, ridge, hi]
            ax.plot(line, [min(x * H100_BYTES_PER_S, PEAKS[p]) / 1e12 for x in line], ("-", "--", "-.", ":")[n % 4],
                    color=colors[p], lw=1.5, label=f"roof: 3.35 TB/s, {p} {PEAKS[p] / 1e12:.0f} TFLOP/s")
        biggest = max((k.unique_bytes for k in shown), default=1)
        for p in peaks:
            ks = [k for k in shown if k.peak == p]
            ax.scatter([k.intensity for k in ks], [k.flops / (k.roofline_us * 1e-6) / 1e12 for k in ks],
                       s=[20 + 280 * k.unique_bytes / biggest for k in ks], color=colors[p], alpha=0.55,
                       edgecolors="black", linewidths=0.5, label=f"{p} kernels ({len(ks)})", zorder=3)
        named = _label_points(ax, sorted(shown, key=lambda k: -k.unique_bytes)[:labels])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_xlabel("arithmetic intensity: FLOP per distinct byte (the table's FLOP/B)")
        ax.set_ylabel("attainable TFLOP/s (model)")
        hidden = len(self.kernels) - len(shown)
        note = f"; {hidden} kernel(s) without FLOPs (copies, opaque calls) not shown" if hidden else ""
        ax.set_title(f"einfuse kernels on an H100 roofline — a model, not a timing\n{len(shown)} kernels, marker "
                     f"area ~ distinct bytes, the {min(labels, len(shown))} with the most bytes named{note}",
                     fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return named


def _label_points(ax, kernels: list) -> list[str]:
    """Name kernels without overlaps: the names stack in a column in the plot's empty upper left (low
    intensity, high FLOP/s: no kernel can sit there), highest point first, each with a leader line to its
    marker. Returns the names in the order shown."""
    names = []
    ordered = sorted(kernels, key=lambda k: -k.flops / (k.roofline_us * 1e-6))
    for n, k in enumerate(ordered):
        y = k.flops / (k.roofline_us * 1e-6) / 1e12
        name = k.name if len(k.name) <= 36 else k.name[:34] + "…"
        ax.annotate(f"{name} ({k.unique_bytes / 1e6:.3g} MB)", (k.intensity, y), xytext=(0.02, 0.95 - 0.06 * n),
                    textcoords="axes fraction", fontsize=7.5, ha="left", va="center",
                    arrowprops=dict(arrowstyle="-", lw=0.6, color="0.45", shrinkA=2, shrinkB=3),
                    bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="0.75", alpha=0.9), zorder=4)
        names.append(k.name)
    return names


# ---------------------------------------------------------------- eager PyTorch's bytes

def _touched(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (a broadcast dimension, stride 0, is read once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if size == 0:
            return 0
        if stride != 0:
            n *= size
    return n * t.element_size()


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def op_bytes(func, args: tuple, kwargs: dict, out) -> int:
    """The bytes an ATen op moves, decided by what it does to storage: an op whose tensor outputs all share
    an input's storage and that writes nothing is a view (`view`, `_unsafe_view`, `t`, `expand`, `detach`):
    0; otherwise every tensor it reads (an in-place op's self included) plus every tensor it writes (an
    in-place op's self, an `out=` argument, and outputs in new storage). Ops that only allocate
    (`empty*`: the memory is not written) move nothing."""
    schema = func._schema
    reads = writes = 0
    inputs = set()
    written = False
    for i, a in enumerate(schema.arguments):
        v = args[i] if i < len(args) and not a.kwarg_only else kwargs.get(a.name, None)
        ts = [x for x in torch.utils._pytree.tree_leaves(v) if isinstance(x, torch.Tensor)]
        write = a.alias_info is not None and a.alias_info.is_write
        for t in ts:
            inputs.add(_storage(t))
            if write:
                writes += _touched(t)
                written = True
            if not (write and a.kwarg_only):  # an out= argument is written, not read
                reads += _touched(t)
    outs = [x for x in torch.utils._pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
    fresh = [o for o in outs if _storage(o) not in inputs]
    if not written and not fresh:
        if outs or not schema.returns:
            return 0  # a view (or an op that returns nothing, like an assert): no data moves
        return reads  # a value out of tensors (item, equal): it reads them
    if func.__name__.split(".")[0].lstrip("_").startswith(("empty", "new_empty")):
        return 0  # allocation only: nothing is read or written
    return reads + writes + sum(_touched(o) for o in fresh)


class EagerBytes(TorchDispatchMode):
    """Counts what eager PyTorch moves when each ATen op reads its operands from memory and writes its result
    (`op_bytes`): views move nothing; a broadcast operand is read once."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.ops = 0
        self.by_op: dict = {}  # op name -> bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        n = op_bytes(func, args, kwargs, out)
        if n:
            self.bytes += n
            self.ops += 1
            name = str(func)
            self.by_op[name] = self.by_op.get(name, 0) + n
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


def kernel_peak(m, statements, spec=None) -> str:
    """The PEAKS key a kernel computes at: a contraction on tensor cores in its operand type (f32 as tf32 when
    the kernel's dots use tf32: its mapping says so, or its source asks for it), anything else on CUDA cores."""
    from ..ir import dtypes as dt
    from ..ir.contraction import contraction
    from ..ir.module import Statement

    types = m.types()
    by_name = {s.name: s for s in m.body if isinstance(s, Statement)}
    operands = []
    for name in statements:
        s = by_name.get(name)
        c = contraction(s, lambda n: types[n].dtype) if s is not None else None
        if c is not None:
            operands.append(c.operand)
    if not operands:
        return "fp64" if any(by_name[n].type.dtype == dt.f64 for n in statements if n in by_name) else "fp32"
    widest = max(operands, key=lambda d: d.bits)
    if widest.bits <= 8:
        return "fp8/int8"
    if widest.bits == 16:
        return "bf16/fp16"
    if widest == dt.f64:
        return "fp64"
    mapping, source = getattr(spec, "mapping", None), getattr(spec, "source", "") or ""
    tf32 = getattr(mapping, "input_precision", "") == "tf32" or 'input_precision="tf32"' in source
    return "tf32" if tf32 else "fp32"


def build_report(runner, sizes: dict, eager: int | None) -> Report:
    """Combine a measured run of a TritonRunner with FLOPs from the IR."""
    m = runner.module
    info = ModuleInfo(m)
    types = m.types()
    kernels = []
    for step in runner.steps:
        if step.skip:
            continue
        if step.spec is not None:
            st = runner.stats.get(step.spec.statements)
            if st is None:
                continue
            peak = kernel_peak(m, st.statements, step.spec)
            # a kernel reused for another layer is reported per launch, named after the tensor it computed
            name = st.name if st.statements[-1] in st.name else f"{st.name} @{st.statements[-1]}"
            flops = cost(m, step.spec, sizes, info).flops  # what the kernel's kind says it computes
            kernels.append(KernelReport(name, st.statements, st.bytes_loaded, st.bytes_stored, st.unique_bytes,
                                        flops, peak=peak))
        else:
            op: Opaque = step.op
            ins = sum(_nbytes(types[n], sizes) for n in op.reads())
            outs = sum(_nbytes(types[n], sizes) for n in op.outputs)
            kernels.append(KernelReport(f"opaque {op.target}", op.outputs, ins, outs, ins + outs, 0, measured=False))
    return Report(kernels, min_bytes(m, sizes), eager, allocations=list(runner.allocations))
