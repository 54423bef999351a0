"""The Triton backend: a launch plan over generated kernels and opaque calls, run natively on CUDA or
under Triton's interpreter on CPU tensors (the same program), with buffers planned by liveness."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import sympy
import torch

from ..codegen import Arg, KernelSpec, Mapping, float32_precision, generate
from ..codegen.cache import Cache, key_of
from ..ir import index as ix
from ..ir.evaluator import bind_sizes, check_inputs, run_opaque
from ..ir.module import Module, Opaque, Statement
from ..ir.parser import parse_index
from .autotune import Autotuner
from .backends import register_backend
from .graphs import GraphReplay
from .memory import Pool
from .traffic import Traffic, counting

log = logging.getLogger("einfuse")


def interpreting() -> bool:
    import triton

    return bool(triton.knobs.runtime.interpret)


def _skip_discarded_overflow_checks() -> None:
    """Triton checks integer overflow through device_assert, which does nothing unless debug is on;
    the interpreter still computes every check first (about a third of its time), so skip them then."""
    from triton.runtime.interpreter import interpreter_builder as builder

    if builder.options.sanitize_overflow and not builder.options.debug:
        builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)


def _own_outputs(op: Opaque, env: dict) -> None:
    """Kernels index a tensor as contiguous row-major memory that nothing else writes, so an opaque
    call's output that is a strided view, or shares storage with one of its inputs (whose pool buffer
    is handed out again once that input dies), is copied."""
    shared = {env[n].untyped_storage().data_ptr() for n in op.reads() if isinstance(env.get(n), torch.Tensor)}
    for name in op.outputs:
        t = env[name]
        if not t.is_contiguous() or t.untyped_storage().data_ptr() in shared:
            env[name] = t.clone(memory_format=torch.contiguous_format)


# ---------------------------------------------------------------- kernels: generate or load from cache

def _spec_from_json(d: dict, source: str) -> KernelSpec:
    mp = d["mapping"]
    rank = lambda names: tuple(sympy.Symbol(n, integer=True, nonnegative=True) for n in names)  # noqa: E731
    mapping = Mapping(mp["kind"], rank(mp["rows"]), rank(mp["cols"]), rank(mp["red"]), rank(mp["batch"]),
                      tuple(tuple(t) for t in mp["tiles"]), mp["input_precision"], mp["num_warps"])
    return KernelSpec(d["name"], tuple(d["statements"]), tuple(d["outputs"]), source,
                      [Arg(**a) for a in d["args"]], dict(d["constexprs"]), [parse_index(g) for g in d["grid"]],
                      mapping, d.get("flops", 0), d.get("meta", {}))


def kernels_for(m: Module, cache: Cache) -> tuple[list[KernelSpec], str, bool]:
    """The module's kernels, from the disk cache when the same module was compiled before.
    Returns (kernels, the directory holding their sources, whether the cache had them)."""
    key = key_of(str(m), float32_precision())
    entry = cache.get(key)
    if entry is not None:
        index = json.loads(entry["index.json"])
        return [_spec_from_json(d, entry[f"{d['name']}.py"].decode()) for d in index], cache.path(key), True
    specs = generate(m)
    first: dict = {}  # kernel name -> its first spec's JSON (a layer's instances share name, grid and tiling)
    index = []
    for s in specs:
        index.append(s.to_json(first.get(s.name)) | {"source": None})
        first.setdefault(s.name, index[-1])
    files = {"index.json": json.dumps(index)}
    files.update({f"{s.name}.py": s.source for s in specs})
    return specs, cache.put(key, files), False


_loaded: dict = {}


def load_kernel(spec: KernelSpec, directory: str):
    """Import the kernel's module from its cache file (Triton reads the source back from the file)."""
    path = f"{directory}/{spec.name}.py"
    mod_name = f"einfuse_kernels.{spec.key}"
    fn = _loaded.get(mod_name)
    if fn is None:
        s = importlib.util.spec_from_file_location(mod_name, path)
        mod = importlib.util.module_from_spec(s)
        sys.modules[mod_name] = mod
        s.loader.exec_module(mod)
        fn = _loaded[mod_name] = getattr(mod, spec.name)
    return fn


# ---------------------------------------------------------------- the launch plan

@dataclass
class KernelStats:
    """Per kernel: what it moved (measured) and computed (from the IR)."""

    name: str
    statements: tuple
    bytes_loaded: int = 0
    bytes_stored: int = 0
    unique_bytes: int = 0
    flops: int = 0
    launches: int = 0


@dataclass
class Step:
    op: Statement | Opaque
    spec: KernelSpec | None = None
    fn: object = None
    tuned: bool = False  # CUDA: the tiling was chosen by timing candidates
    skip: bool = False  # a group member computed by the group's kernel
    routed: object = None  # a MoE chain on compressed experts (MoEPlan), run by `routed_moe` at this step


@dataclass
class TritonRunner:
    """Runs a module: kernels for statements, torch for opaque calls, intermediates from a pool."""

    module: Module
    specs: list
    directory: str
    cache_hit: bool = False
    measure: bool = False
    cuda_graphs: bool = False  # replay the whole launch sequence as one CUDA graph (no opaque calls)
    autotuner: Autotuner | None = None  # set: contractions pick their tiling by timing candidates (CUDA default)
    steps: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # a kernel launch's statements -> KernelStats
    allocations: list = field(default_factory=list)  # the pool's log of the last call
    peak_bytes: int = 0  # bytes the pool held at the end of the last call (it only grows within a call)
    graph: GraphReplay | None = None
    notes: list = field(default_factory=list)  # what runs other than the kinds would: lines for explain()

    def __post_init__(self):
        by_stmt = {n: s for s in self.specs for n in s.statements}
        for op in self.module.body:
            if not isinstance(op, Opaque):  # a statement or an update: a kernel
                spec = by_stmt[op.name]
                if spec.statements[0] != op.name:  # a later member of a kernel group: it ran with the first
                    self.steps.append(Step(op, None, None, skip=True))
                else:
                    self.steps.append(Step(op, spec, self.load(spec)))
            else:
                self.steps.append(Step(op))
        self._types = self.module.types()
        self._last = self.module.last_uses()
        self._verified: set = set()
        self._operands: dict = {}
        self.notes += self._route_compressed_experts()
        if self.cuda_graphs and any(step.routed is not None for step in self.steps):
            # the routed step sorts tokens by expert: data-dependent sizes a CUDA graph cannot capture
            self.notes.append("CUDA graphs off: the routed compressed experts sort tokens by expert (data-dependent "
                              "sizes a graph cannot capture); each call launches its kernels")
            log.warning("einfuse: %s", self.notes[-1])
        elif self.cuda_graphs:
            stable = [i.name for i in self.module.inputs if i.kind != "in"]
            self.graph = GraphReplay(self._run, stable)

    def _route_compressed_experts(self) -> list:
        """MoE chains whose experts are stored compressed (`MoEPlan.compressed`) run on the stored codes: at
        the gate/up statement's step, `compress.experts.routed_moe` through the fused cdot kernel; the MoE
        kernels and the dense decode_experts calls are skipped. A chain whose intermediates are read
        elsewhere keeps its kernels (on the densely decoded weights). Returns a line per chain."""
        from ..codegen.torch_moe import COMPRESSED_NOTE, moe_plans
        where = {name: n for n, op in enumerate(self.module.body) for name in op.outputs}
        notes = []
        for plan in moe_plans(self.module):
            if not plan.compressed:
                continue
            if not plan.self_contained(self.module):
                notes.append(f"MoE experts {plan.name}: compressed experts decoded densely every call (decode_experts) "
                             "for the MoE kernels — an intermediate of the chain is read outside it")
                log.warning("einfuse: %s", notes[-1])
                continue
            for c in plan.compressed:
                self.steps[where[c.decode]] = Step(self.module.body[where[c.decode]], skip=True)
            up, down = plan.chain.up.stmt, plan.chain.down.stmt
            self.steps[where[up.name]] = Step(up, routed=plan)
            self.steps[where[down.name]] = Step(down, skip=True)
            notes.append(f"MoE experts {plan.name}: routed, compressed experts: {COMPRESSED_NOTE}")
        return notes

    def routed_moe(self, plan, env: dict, sizes: dict) -> None:
        """A compressed chain's combine from its token states and routing weights (evaluated from the IR
        expressions the MoE kernels would compute them with) and the stored arrays."""
        from ..compress.experts import routed_moe
        from ..ir import dtypes as dt
        from ..ir.evaluator import evaluate
        from ..ir.module import Input, TensorType
        f = plan.chain.up
        sub = self._operands.get(plan.name)
        if sub is None:
            T, E, _ = f.stmt.type.shape
            H = f.stmt.reduce.ranks[0][1]
            body = (Statement("__moe_x", TensorType(dt.f32, (T, H)), (f.t, f.h), f.a),
                    Statement("__moe_gate", TensorType(dt.f32, (T, E)), (f.t, f.e), plan.chain.gate))
            reads = sorted(set().union(*(s.reads() for s in body)))
            ins = [Input(r, self._types[r]) for r in reads]
            syms = tuple(self.module.sizes)
            if syms:
                ins.append(Input("__sizes", TensorType(dt.u8, syms)))
            sub = self._operands[plan.name] = Module(f"{self.module.name}_{plan.name}_operands", tuple(ins), body,
                                                     ("__moe_x", "__moe_gate"), syms, self.module.size_hints)
        given = {i.name: env[i.name] for i in sub.inputs if i.name != "__sizes"}
        if sub.sizes:
            given["__sizes"] = torch.zeros((), dtype=torch.uint8).expand(*[int(sizes[s]) for s in sub.sizes])
        vals = evaluate(sub, given)
        cu, cd = plan.compressed
        arrays = lambda c: tuple(env[a] for a in c.arrays)  # noqa: E731
        env[plan.chain.comb.name] = routed_moe(
            vals["__moe_x"].contiguous(), vals["__moe_gate"], arrays(cu), dict(cu.meta), arrays(cd), dict(cd.meta),
            kernel=True, seen=self._verified, up_checksums=env[cu.checksums] if cu.checksums else None,
            down_checksums=env[cd.checksums] if cd.checksums else None)

    def load(self, spec: KernelSpec):
        """The launchable @triton.jit function of a spec (its source written to the kernel cache first)."""
        directory = self.directory
        if not os.path.exists(os.path.join(directory, f"{spec.name}.py")):
            directory = Cache("kernels").put(key_of(spec.source), {f"{spec.name}.py": spec.source})
        return load_kernel(spec, directory)

    def __call__(self, inputs: dict) -> dict:
        first = next(iter(inputs.values()), None)
        if self.graph is not None and not self.measure:
            if first is not None and not first.is_cuda:
                raise RuntimeError("einfuse: cuda_graphs=True replays CUDA graphs, but this call's inputs are on "
                                   f"{first.device}; compile with cuda_graphs=False for CPU tensors")
            if any(s.spec is None and not s.skip for s in self.steps):
                return self._run(inputs)  # opaque calls may synchronize or allocate: no capture
            return self.graph(inputs)
        return self._run(inputs)

    def _run(self, inputs: dict) -> dict:
        m = self.module
        sizes = bind_sizes(m, inputs)
        check_inputs(m, inputs, sizes)
        int_sizes = {k: int(v) for k, v in sizes.items()}
        first = next(iter(inputs.values()), None)
        device = first.device if first is not None else torch.device("cpu")
        if device.type == "cpu" and not interpreting():
            raise RuntimeError("einfuse's Triton backend got CPU tensors but Triton is not in interpreter mode: "
                               "import einfuse before triton (or set TRITON_INTERPRET=1), or use backend='reference'")
        if interpreting():
            _skip_discarded_overflow_checks()
        env = {i.name: inputs[i.name].contiguous() for i in m.inputs}
        pool = Pool(device)
        holders: dict = {}
        outputs = set(m.outputs)
        # Lanes outside a mask compute on zeros (rsqrt(0), x / 0) and are never stored; a GPU does that
        # silently, the interpreter's numpy would warn.
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for n, step in enumerate(self.steps):
                if step.skip:
                    pass
                elif step.routed is not None:
                    self.routed_moe(step.routed, env, sizes)
                elif step.spec is None:
                    run_opaque(step.op, env, sizes)
                    _own_outputs(step.op, env)
                else:
                    self._launch(step, env, pool, holders, outputs, int_sizes, device)
                for name in self._last.get(n, ()):
                    env.pop(name, None)
                    if name in holders:
                        pool.give_back(holders.pop(name))
        self.allocations, self.peak_bytes = pool.log, pool.peak_bytes
        return {o: env[o] for o in m.outputs}

    def _launch(self, step: Step, env, pool, holders, outputs, sizes, device):
        spec = step.spec
        aliases = spec.meta.get("aliases", {})
        for name in spec.outputs:  # tensors a group keeps in registers get no memory at all
            t = self._types[name]
            shape = t.concrete_shape(sizes)
            if name in aliases:  # an update writes into its state's buffer: the new version is that buffer
                env[name] = env[aliases[name]]
            elif name in outputs:
                env[name] = torch.empty(shape, dtype=t.dtype.storage, device=device)
            else:
                env[name], holders[name] = pool.take(name, shape, t.dtype.storage)
        if 0 in spec.grid_for(sizes):  # its outputs have no elements: no program has anything to do
            return
        if self.autotuner is not None and not step.tuned and not self.measure:
            step.tuned = True
            best = self.autotuner.choose(spec, env, sizes)
            if best is not spec:
                step.spec, step.fn = best, self.load(best)
                spec = best
        args = [env[a.ref] if a.kind == "ptr" else sizes[ix.size(a.ref)] for a in spec.args]
        grid = spec.grid_for(sizes)
        launch = step.fn[grid]
        if self.measure:
            st = self.stats.setdefault(spec.statements, KernelStats(spec.name, spec.statements))
            t = Traffic(regions=[(x.data_ptr(), x.numel() * x.element_size(), x.element_size())
                                 for x in args if isinstance(x, torch.Tensor)])
            with counting(t):
                launch(*args, **spec.constexprs)
            st.bytes_loaded += t.bytes_loaded
            st.bytes_stored += t.bytes_stored
            st.unique_bytes += t.unique_bytes
            st.launches += 1
        elif interpreting():
            launch(*args, **spec.constexprs)
        else:
            launch(*args, **spec.constexprs, num_warps=spec.mapping.num_warps)


@register_backend("triton")
def triton_backend(module: Module, cuda_graphs: bool = False, autotune: bool | None = None):
    """Kernels generated (or loaded from the disk cache) and launched in body order. `autotune` (default:
    on a CUDA device) times each contraction's candidates on the first call and keeps the fastest."""
    specs, directory, hit = kernels_for(module, Cache("kernels"))
    runner = TritonRunner(module, specs, directory, hit, cuda_graphs=cuda_graphs)
    if autotune if autotune is not None else not interpreting():
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        runner.autotuner = Autotuner(module, runner.load, device=device)
    return runner

