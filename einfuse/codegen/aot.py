"""Ahead-of-time GPU checks of generated kernels, on a machine without a GPU.

`check_gpu(specs)` compiles every kernel with Triton's CUDA backend for sm_80 and sm_90a (ptxas ships
with Triton, no device is needed) and reports what a GPU run would meet: compile errors, registers,
spills, shared memory, and whether a contraction reaches the tensor cores.

Compiles run in worker subprocesses. On a CPU machine einfuse selects Triton's interpreter in-process,
and Triton fixes that choice when it is imported, so a worker starts with TRITON_INTERPRET unset and
imports triton before any einfuse code. A worker imports only this module and `libm` (through stub
packages, not einfuse's __init__), so it starts in well under a second instead of importing torch.
Results are cached in einfuse's disk cache (namespace `aot`) per (compile key, arch, Triton version).
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .cache import Cache

if TYPE_CHECKING:
    from ..kinds.spec import KernelSpec

_PACKAGE = Path(__file__).resolve().parents[1]  # the einfuse package directory
_RESULT_FIELDS = ("ok", "registers", "spills", "shared_bytes", "tensor_core", "error")
# Triton's names of torch storage dtypes, as its JIT canonicalizes a tensor argument's dtype.
_TRITON_TYPES = {"float64": "fp64", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16",
                 "float8_e4m3fn": "fp8e4nv", "float8_e5m2": "fp8e5", "int64": "i64", "int32": "i32",
                 "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "u1"}


@dataclass(frozen=True)
class GpuCheck:
    """How one kernel compiles for one GPU architecture."""

    name: str
    arch: int  # compute capability x 10: 80 is sm_80 (A100), 90 is sm_90a (H100)
    ok: bool
    registers: int | None  # per thread
    spills: int | None  # bytes of spill stores + spill loads; 0 means no spills
    shared_bytes: int | None  # shared memory per block
    tensor_core: bool  # the PTX holds the arch's MMA instruction (mma.sync; wgmma on sm_90a)
    error: str | None = None  # the compile error's first lines
    key: str = ""  # compile key: kernels with equal keys compile to the same binary


@dataclass
class CacheStats:
    """Counters over every check_gpu call in this process, for reports and tests."""

    hits: int = 0  # (kernel, arch) results read from the disk cache
    compiled: int = 0  # (kernel, arch) compiles run in workers


stats = CacheStats()


def check_gpu(specs: list[KernelSpec], archs=(80, 90), jobs: int | None = None, cache_dir=None, *,
              progress: bool = True, timeout: float = 600.0) -> list[GpuCheck]:
    """Compile every kernel for every arch, once per distinct compile key, and report each kernel by name.

    Never raises for a kernel: a compile error, a crashed worker or a compile running longer than
    `timeout` seconds gives ok=False with the error's first lines."""
    cache = result_cache(cache_dir)
    keyed = [(spec, compile_key(spec)) for spec in specs]
    unique: dict = {}
    for spec, key in keyed:
        for arch in archs:
            unique.setdefault((key, arch), spec)
    results = {ka: hit for ka in unique if (hit := _cached(cache, *ka)) is not None}
    stats.hits += len(results)
    todo = sorted(((ka, spec) for ka, spec in unique.items() if ka not in results),
                  key=lambda t: t[1].mapping.kind != "dot")  # the slow compiles first
    with _progress_bar(len(todo), progress) as advance:
        def record(ka, result: dict, cacheable: bool) -> None:
            results[ka] = result
            if cacheable:
                _store(cache, *ka, result)
            advance()

        _run_jobs([(ka, _job(spec, ka[1])) for ka, spec in todo], jobs or os.cpu_count() or 1, timeout, record)
    stats.compiled += len(todo)
    return [GpuCheck(name=spec.name, arch=arch, key=key, **results[(key, arch)])
            for spec, key in keyed for arch in archs]


# ---------------------------------------------------------------------------------------------- keys


def signature(spec: KernelSpec) -> dict:
    """Triton's signature of a launch with torch tensors: pointers typed by the tensors' storage
    dtype (a packed i4 tensor is u8 bytes), i32 sizes, constexpr tiles."""
    from ..ir import dtypes  # not at the top: the worker imports this module without torch

    sig = {}
    for a in spec.args:
        if a.kind == "ptr":
            sig[a.name] = "*" + _TRITON_TYPES[str(dtypes.by_name(a.dtype).storage).removeprefix("torch.")]
        else:
            sig[a.name] = "i32"
    return {**sig, **{k: "constexpr" for k in spec.constexprs}}


def canonical_source(source: str, kernel: str) -> tuple[str, dict]:
    """The kernel module without docstring and comments and with the names the kernel binds numbered
    in order of appearance: kernels differing only in names compile to the same binary.
    Returns (text, {old name: new name})."""
    tree = ast.parse(source)
    if tree.body and isinstance(tree.body[0], ast.Expr) and isinstance(tree.body[0].value, ast.Constant):
        tree.body.pop(0)
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == kernel]
    bound = {kernel} | {a.arg for f in fns for a in f.args.args}
    bound |= {n.id for f in fns for n in ast.walk(f) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    names: dict = {}
    for node in ast.walk(tree):
        attr = {ast.Name: "id", ast.arg: "arg", ast.FunctionDef: "name"}.get(type(node))
        if attr and getattr(node, attr) in bound:
            setattr(node, attr, names.setdefault(getattr(node, attr), f"n{len(names)}"))
    return ast.unparse(tree), names


def compile_key(spec: KernelSpec) -> str:
    """Hash of what determines the binary: the source up to names and comments, the argument types,
    the constexprs and num_warps (spec.key hashes the text itself and leaves the types out)."""
    try:
        source, names = canonical_source(spec.source, spec.name)
    except SyntaxError:
        source, names = spec.source, {}
    consts = sorted((names.get(k, k), repr(v)) for k, v in spec.constexprs.items())
    blob = json.dumps([source, consts, list(signature(spec).values()), spec.mapping.num_warps])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# --------------------------------------------------------------------------------------------- cache


def result_cache(cache_dir=None) -> Cache:
    """AOT results in einfuse's disk cache (namespace `aot`, under `cache_dir` when given)."""
    return Cache("aot", str(cache_dir) if cache_dir else None)


def result_key(key: str, arch: int) -> str:
    """One entry per (compile key, arch, Triton version): the compile key hashes the kernel itself, so an
    edit of einfuse that leaves a kernel unchanged keeps its result."""
    return f"{key}-sm{arch}-triton{importlib.metadata.version('triton')}"


def result_path(cache_dir, key: str, arch: int) -> Path:
    """Where the result of (key, arch) is stored (its entry's `result.json`)."""
    return Path(result_cache(cache_dir).path(result_key(key, arch))) / "result.json"


def _cached(cache: Cache, key: str, arch: int) -> dict | None:
    entry = cache.get(result_key(key, arch))
    try:
        data = json.loads(entry["result.json"]) if entry else None
    except (KeyError, ValueError):
        return None
    valid = isinstance(data, dict) and set(data) == set(_RESULT_FIELDS) and isinstance(data["ok"], bool)
    return data if valid else None


def _store(cache: Cache, key: str, arch: int, result: dict) -> None:
    """A cache that cannot be written only costs recompiles, so that warns instead of failing the check."""
    try:
        cache.put(result_key(key, arch), {"result.json": json.dumps(result)})
    except OSError as e:
        warnings.warn(f"einfuse AOT cache not written: {e}", stacklevel=2)


# ----------------------------------------------------------------------------------- parent: workers


def _job(spec: KernelSpec, arch: int) -> dict:
    """What a worker needs to compile one kernel for one arch (JSON-serializable)."""
    return {"name": spec.name, "source": spec.source, "signature": signature(spec),
            "constexprs": dict(spec.constexprs), "num_warps": spec.mapping.num_warps, "arch": arch}


def _failed(error: str) -> dict:
    return {"ok": False, "registers": None, "spills": None, "shared_bytes": None, "tensor_core": False, "error": error}


def _worker_env() -> dict:
    """The parent's environment without TRITON_INTERPRET, so the worker's Triton compiles for GPUs."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


_BOOT = """\
import sys, types
import triton  # before any einfuse code, so Triton is in GPU mode
for name, path in {packages!r}:
    stub = types.ModuleType(name)
    stub.__path__ = [path]
    sys.modules[name] = stub
from einfuse.codegen.aot import serve
serve()
"""


class _Worker:
    """A compile server: a subprocess reading jobs on stdin and writing results on stdout, a JSON line each."""

    def __init__(self):
        packages = [("einfuse", str(_PACKAGE)), ("einfuse.codegen", str(_PACKAGE / "codegen"))]
        self.log = tempfile.TemporaryFile()
        self.timed_out = False
        self.proc = subprocess.Popen([sys.executable, "-c", _BOOT.format(packages=packages)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, env=_worker_env(), text=True)

    def run(self, job: dict, timeout: float) -> dict | None:
        """The job's result, or None when the worker died or ran past `timeout` (then it is killed)."""
        timer = threading.Timer(timeout, self._kill)
        timer.start()
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except OSError:  # the worker is gone (broken pipe)
            line = ""
        finally:
            timer.cancel()
        return json.loads(line) if line else None

    def _kill(self) -> None:
        self.timed_out = True
        self.proc.kill()

    def failure(self, timeout: float) -> str:
        """Why the worker stopped: a timeout, or its exit status and the tail of its stderr."""
        self.close()
        if self.timed_out:
            return f"compile timed out after {timeout:g} s"
        self.log.seek(0)
        tail = self.log.read().decode(errors="replace").splitlines()[-15:]
        return "\n".join([f"compile worker exited with status {self.proc.returncode}"] + tail)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _run_jobs(jobs: list, n: int, timeout: float, record) -> None:
    """Run (key, job) pairs on up to n workers; a thread drives each worker and replaces it if it dies."""
    pending: queue.SimpleQueue = queue.SimpleQueue()
    for item in jobs:
        pending.put(item)

    def drain() -> None:
        worker = None
        try:
            while True:
                try:
                    ka, job = pending.get_nowait()
                except queue.Empty:
                    return
                worker = worker or _Worker()
                result = worker.run(job, timeout)
                if result is None:
                    record(ka, _failed(worker.failure(timeout)), False)  # not cached: it may not happen again
                    worker = None
                else:
                    record(ka, result, True)
        finally:
            if worker is not None:
                worker.close()

    n = max(1, min(n, len(jobs)))
    with ThreadPoolExecutor(n) as pool:
        for future in [pool.submit(drain) for _ in range(n)]:
            future.result()


@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool):
    """A progress bar on stderr, silent when stderr is no terminal; yields the advance-by-one callback."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    show = enabled and total > 0 and console.is_terminal
    with Progress(TextColumn("compiling kernels for GPUs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not show) as bar:
        task = bar.add_task("compile", total=total)
        yield lambda: bar.advance(task)


# ----------------------------------------------------------------------------------- worker process


def serve() -> None:
    """Worker loop: results go to the original stdout; anything else printed lands on stderr."""
    import triton

    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    triton.knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v's report: registers and spills
    triton.knobs.compilation.always_compile = True  # ... which a hit in Triton's own cache would skip
    for line in sys.stdin:
        out.write(json.dumps(compile_job(json.loads(line))) + "\n")
        out.flush()


def compile_job(job: dict) -> dict:
    """Compile one kernel for one arch and measure it; a compile error is a result, not an exception."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    log = io.StringIO()
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(log):
            fn = _load_kernel(job["source"], job["name"], Path(tmp))
            # pointers 16-byte aligned, as the JIT marks fresh torch tensors
            aligned = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
                       for n, t in job["signature"].items() if t.startswith("*")}
            src = ASTSource(fn=fn, signature=job["signature"], constexprs=job["constexprs"], attrs=aligned)
            kernel = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32),
                                    options={"num_warps": job["num_warps"]})
    except Exception as e:  # noqa: BLE001 - any compile failure is the kernel's result
        return _failed(_first_lines(f"{type(e).__name__}: {e}"))
    registers, spills = _ptxas_usage(log.getvalue()) or _cubin_usage(kernel.asm["cubin"])
    return {"ok": True, "registers": registers, "spills": spills, "shared_bytes": int(kernel.metadata.shared),
            "tensor_core": mma_instruction(job["arch"]) in kernel.asm["ptx"], "error": None}


def _load_kernel(source: str, name: str, tmp: Path):
    """The @triton.jit function of a kernel module (from a file: Triton reads the function's source)."""
    path = tmp / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"einfuse_aot_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def mma_instruction(arch: int) -> str:
    """The PTX instruction of the arch's tensor-core matmul as Triton emits it."""
    return {90: "wgmma.mma_async", 100: "tcgen05.mma", 103: "tcgen05.mma"}.get(arch, "mma.sync")


def _first_lines(text: str, lines: int = 20, chars: int = 4000) -> str:
    return "\n".join(text.splitlines()[:lines])[:chars]


def _ptxas_usage(log: str) -> tuple[int, int] | None:
    """(registers, spill store + load bytes) from ptxas -v's report of the entry function."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(regs[1]), int(spills[1]) + int(spills[2])) if regs and spills else None


def _cubin_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, local memory bytes) from cuobjdump, for when no ptxas report was printed."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    usage = re.search(r"REG:(\d+) .*LOCAL:(\d+)", text)
    return int(usage[1]), int(usage[2])
