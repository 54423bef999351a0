"""The torch backend: the module's generated torch program (`einfuse.codegen.torch_gen`), cached on disk,
loaded with importlib and run on the inputs' device. On CPU it runs at eager PyTorch's speed, where
Triton's interpreter is a validation tool; statements the generator cannot emit run through the
reference evaluator and are listed in `runner.fallbacks`."""
from __future__ import annotations

import importlib.util
import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field

import torch

from ..codegen.cache import Cache, key_of
from ..codegen.torch_gen import generate
from ..ir import dtypes as dt
from ..ir import collective as collectives
from ..ir import index as ix
from ..ir.evaluator import EvaluationError, bind_sizes, check_inputs, evaluate, run_opaque, run_update, unpack
from ..ir.module import Input, Module, Opaque, Statement, TensorType, Update
from .backends import register_backend

log = logging.getLogger("einfuse")
_loaded: dict = {}


def _dense(t: torch.Tensor) -> torch.Tensor:
    """`t` as the program assumes every bound tensor is: contiguous, starting at its storage's first element."""
    if t.is_contiguous() and t.storage_offset() == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def program_for(m: Module, cache: Cache) -> tuple[dict, str, bool]:
    """The module's program (source and what it reports), from the disk cache when the same module was
    generated before. Returns (entry, the directory holding `<module>.py`, whether the cache had it)."""
    key = key_of(str(m), "torch-program")
    entry = cache.get(key)
    if entry is not None:
        meta = json.loads(entry["meta.json"])
        return meta, cache.path(key), True
    prog = generate(m)
    fname = re.sub(r"\W", "_", prog.name) or "module"
    meta = {"file": f"{fname}.py", "name": prog.name, "fallbacks": prog.fallbacks, "attention": prog.attention,
            "moe": prog.moe}
    return meta, cache.put(key, {meta["file"]: prog.source, "meta.json": json.dumps(meta, indent=1)}), False


def load_program(path: str, key: str):
    """Import a generated program from its cache file; returns its module."""
    name = f"einfuse_torch_programs.m{key}"
    mod = _loaded.get(name)
    if mod is None:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        _loaded[name] = mod
    return mod


@dataclass
class TorchRunner:
    """Runs a module's generated torch program: `runner(inputs) -> outputs`, both by IR name."""

    module: Module
    directory: str
    meta: dict
    cache_hit: bool = False
    _consts: dict = field(default_factory=dict)
    _aranges: dict = field(default_factory=dict)
    _sub: dict = field(default_factory=dict)
    _put_last: tuple | None = None  # the last put's positions, their bounds and the checked index
    timeline: list | None = None  # (body position, perf_counter s) from `mark`, when a timeline is recorded
    compressed_experts: str | None = None  # "kernel" | "decode": overrides `compressed_path`'s default
    _verified: set = field(default_factory=set)  # compressed weights whose checksums passed (moe_compressed)

    def __post_init__(self):
        self.path = f"{self.directory}/{self.meta['file']}"
        self._program = load_program(self.path, self.directory.rstrip("/").rsplit("/", 1)[-1])
        self._inputs = [i.name for i in self.module.inputs]
        self._types = self.module.types()
        self._ops = {n: op for n, op in enumerate(self.module.body) if isinstance(op, (Opaque, Update))}

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def source(self) -> str:
        """The generated Python program (also `<dump_dir>/torch/<module>.py` when dumping)."""
        with open(self.path) as f:
            return f.read()

    @property
    def fallbacks(self) -> list:
        """(statement, reason) for each statement the reference evaluator runs."""
        return [tuple(x) for x in self.meta["fallbacks"]]

    @property
    def attention(self) -> list:
        """(attention group, how it runs: "sdpa", "3-pass (why)" or "statements (why)")."""
        return [tuple(x) for x in self.meta["attention"]]

    @property
    def moe_chains(self) -> list:
        """(MoE chain, how it runs: "routed", "routed, compressed experts: ..." or "statements")."""
        return [tuple(x) for x in self.meta.get("moe", [])]

    def __call__(self, inputs: dict) -> dict:
        with torch.no_grad():
            return self._program.run(inputs, self)

    # ---- what the generated program calls
    def bind(self, inputs: dict) -> tuple:
        try:
            return tuple(_dense(inputs[n]) for n in self._inputs)
        except KeyError:
            self.bad_inputs(inputs)
            raise

    def bad_inputs(self, inputs: dict):
        for n in self._inputs:
            if n not in inputs:
                t = self._types[n]
                raise EvaluationError(f"input {n!r} ({t.dtype}{list(t.shape)}) was not given")
        check_inputs(self.module, inputs, bind_sizes(self.module, inputs))
        raise EvaluationError("inputs do not match the module's input types")

    @staticmethod
    def missing_size(name: str):
        raise EvaluationError(f"size {name} is not the size of any input dimension")

    @staticmethod
    def unpack(t: torch.Tensor, signed: bool) -> torch.Tensor:
        return unpack(t, dt.i4 if signed else dt.u4)

    def consts(self, device) -> tuple:
        k = self._consts.get(device)
        if k is None:
            k = self._consts[device] = self._program.consts(device)
        return k

    def ar(self, n: int, d: int, nd: int, device) -> torch.Tensor:
        """arange(n) along dim d of nd dims (a symbolic size's; static ones are constants of the program)."""
        key = (n, d, nd, device)
        t = self._aranges.get(key)
        if t is None:
            shape = [1] * nd
            shape[d] = n
            t = self._aranges[key] = torch.arange(n, device=device).view(shape)
        return t

    @staticmethod
    def cat(d: int, parts, shape, dtype) -> torch.Tensor:
        """Pieces along dim d (each (tensor or scalar, length)) broadcast to `shape` elsewhere, one tensor."""
        ts = []
        device = next((x.device for x, _ in parts if isinstance(x, torch.Tensor)), None)
        for x, n in parts:
            want = list(shape)
            want[d] = n
            if isinstance(x, torch.Tensor):
                ts.append(x.to(dtype).expand(want))
            else:
                ts.append(torch.full(want, x, dtype=dtype, device=device))
        return torch.cat(ts, d)

    @staticmethod
    def take(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """src[index] for one index tensor along dim 0, as indexing gives it (a negative index counts from
        the end; one out of range raises IndexError), copying whole rows at once (index_select)."""
        flat = index.reshape(-1)
        flat = torch.where(flat < 0, flat + src.shape[0], flat)
        return src.index_select(0, flat).view(*index.shape, *src.shape[1:])

    @staticmethod
    def moe(x: torch.Tensor, gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        """Routed SwiGLU experts (einfuse.codegen.torch_moe): x [T, H], gate [T, E] (0 where a token does
        not use the expert), w_up [E, 2I, H] (gate rows, then up rows), w_down [E, H2, I] -> [T, H2]: each
        expert's two GEMMs on the rows routed to it, added in weighted by the gate."""
        out = x.new_zeros(x.shape[0], w_down.shape[1])
        half = w_up.shape[1] // 2
        routed = gate != 0
        for e in routed.any(0).nonzero().flatten().tolist():
            rows = routed[:, e].nonzero().flatten()
            h = x.index_select(0, rows) @ w_up[e].t()
            act = torch.nn.functional.silu(h[:, :half]) * h[:, half:]
            out.index_add_(0, rows, (act @ w_down[e].t()) * gate.index_select(0, rows)[:, e, None])
        return out

    def moe_compressed(self, x: torch.Tensor, gate: torch.Tensor, up: tuple, up_checksums, up_meta: dict,
                       down: tuple, down_checksums, down_meta: dict) -> torch.Tensor:
        """`moe` with both expert weights kept dictionary-coded (einfuse.codegen.torch_moe, `MoEPlan.compressed`):
        `compress.experts.routed_moe` on the stored arrays — the fused decode-and-multiply kernel
        (einfuse.kinds.cdot) when `compressed_path(device)` says "kernel" (CUDA; on CPU under Triton's
        interpreter when EINFUSE_COMPRESSED_EXPERTS=kernel), else the activated experts alone decoded and
        multiplied. Only activated experts' bytes are read; the stored checksums are verified once per array."""
        from ..compress.experts import routed_moe
        return routed_moe(x, gate, up, up_meta, down, down_meta, kernel=self.compressed_path(x.device) == "kernel",
                          seen=self._verified, up_checksums=up_checksums, down_checksums=down_checksums)

    def compressed_path(self, device) -> str:
        """How compressed experts compute: "kernel" (the fused Triton kernel) or "decode" (the activated
        experts decoded, then torch GEMMs). `self.compressed_experts` or the environment variable
        EINFUSE_COMPRESSED_EXPERTS chooses; by default the kernel on CUDA, decode elsewhere (Triton's
        interpreter is a validation tool)."""
        import os
        how = self.compressed_experts or os.environ.get("EINFUSE_COMPRESSED_EXPERTS") or (
            "kernel" if torch.device(device).type == "cuda" else "decode")
        if how not in ("kernel", "decode"):
            raise ValueError(f"einfuse: EINFUSE_COMPRESSED_EXPERTS={how!r}: expected 'kernel' or 'decode'")
        return how

    @staticmethod
    def imin(a, b):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))
        return min(a, b)

    @staticmethod
    def imax(a, b):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))
        return max(a, b)

    def _sizes(self, sizes: dict) -> dict:
        return {ix.size(k): v for k, v in sizes.items()}

    def statement(self, name: str, tensors: dict, sizes: dict) -> torch.Tensor:
        """A statement the generator left to the reference evaluator: evaluated alone on its operands."""
        sub = self._sub.get(name)
        if sub is None:
            s = next(op for op in self.module.body if isinstance(op, Statement) and op.name == name)
            ins = []
            for r in sorted(s.reads() - {name}):
                t = self._types[r]
                d = t.dtype if not t.dtype.packed else (dt.i8 if t.dtype.signed else dt.u8)
                ins.append(Input(r, TensorType(d, t.shape)))
            syms = tuple(self.module.sizes)
            if syms:
                ins.append(Input("__sizes", TensorType(dt.u8, syms)))
            sub = self._sub[name] = Module(f"{self.module.name}_{name}", tuple(ins), (s,), (name,), syms,
                                           self.module.size_hints)
        env = dict(tensors)
        if sub.sizes:
            env["__sizes"] = torch.zeros((), dtype=torch.uint8).expand(*[sizes[str(s)] for s in sub.sizes])
        return _dense(evaluate(sub, env)[name])

    def collective(self, index: int, x: torch.Tensor):
        """Issue the collective at body position `index` (async); the program waits where it reads it."""
        op = self._ops[index]
        return collectives.start(op.kind, x, op.ranks, op=op.op, dim=op.dim, what=f"{op.kind} {op.name}")

    @staticmethod
    def wait(pending) -> torch.Tensor:
        return pending.wait()

    def mark(self, index: int) -> None:
        """The program reached body position `index` (a timeline records when; nothing when none is on)."""
        if self.timeline is not None:
            self.timeline.append((index, time.perf_counter()))

    def opaque(self, index: int, tensors: dict, sizes: dict) -> tuple:
        op = self._ops[index]
        env = dict(tensors)
        run_opaque(op, env, {ix.size(k): v for k, v in sizes.items()})
        return tuple(_dense(env[o]) for o in op.outputs)

    def put(self, target: torch.Tensor, positions: tuple, value: torch.Tensor) -> None:
        """target[positions] = value in place, for the points whose positions all fall inside `target` (a
        padded block-table entry, -1, writes nothing); positions index value's leading dims. The positions'
        check is kept for the next call with the same position tensors (every layer's K and V writes of a
        step share them)."""
        bounds = tuple(target.shape[:len(positions)])
        last = self._put_last
        versions = tuple(p._version for p in positions)  # an input written in place is another position
        if last is not None and last[1] == bounds and last[4] == versions and all(
                a is b for a, b in zip(last[0], positions)):  # (equal versions: as many positions)
            index, inside = last[2], last[3]
        else:
            inside = None
            for d, p in enumerate(positions):
                ok = (p >= 0) & (p < bounds[d])
                inside = ok if inside is None else inside & ok
            if inside is None or bool(inside.all()):
                index, inside = tuple(p.long() for p in positions), None
            else:
                index = tuple(p[inside].long() for p in positions)
            self._put_last = (positions, bounds, index, inside, versions)  # held: their ids stay theirs
        target.index_put_(index, value if inside is None else value[inside])

    def update(self, index: int, tensors: dict, sizes: dict) -> torch.Tensor:
        """An update of a state, in place (the new version is the state's own buffer)."""
        op = self._ops[index]
        return run_update(op, dict(tensors), self._types, {ix.size(k): v for k, v in sizes.items()})


@register_backend("torch")
def torch_backend(module: Module):
    """The generated torch program (or the one cached on disk for the same module)."""
    meta, directory, hit = program_for(module, Cache("torch"))
    runner = TorchRunner(module, directory, meta, hit)
    for name, why in runner.fallbacks:
        log.info("einfuse: statement %s runs through the reference evaluator: %s", name, why)
    return runner
