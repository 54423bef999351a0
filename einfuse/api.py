"""`einfuse.compile` and `torch.compile(backend="einfuse")`: capture -> lower -> passes -> backend, through one
driver; `einfuse.compile` makes one variant per input signature."""
from __future__ import annotations

import inspect
import json
import logging
import os
import time
import weakref
from dataclasses import dataclass

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .codegen.cache import Cache, key_of
from .frontend.capture import Captured, NotCompilable, decomposition_table, export
from .frontend.dynamo import COMPILED, as_captured
from .frontend.lower import LoweringReport, lower_graph
from .ir import parse
from .passes import Dump, NumericCheck, Timing, Verify, default_pipeline, run_pipeline
from .passes.regions import run_regional
from .runtime import backends
from .runtime.compiled import CompiledModule, Variant

DEFAULT_BACKEND = None  # None: per call, "triton" for CUDA inputs, "torch" otherwise (see default_backend)
log = logging.getLogger("einfuse")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def optimize(module, passes=None, dump_dir=None, like=None, check=False, first_ms=None, instances=()):
    """Run a pipeline over an IR module with the standard instruments; returns (module, timings). With
    lowering's repeated-block `instances`, the pipeline runs once per distinct layer (passes.regions)."""
    passes = default_pipeline() if passes is None else list(passes)
    if instances:
        done = run_regional(module, instances, passes, dump_dir, like, check, first_ms)
        if done is not None:
            return done
    timing = Timing()
    instruments = [Verify(), timing]
    if dump_dir:
        instruments.append(Dump(dump_dir, "lower", first_ms))
    checker = NumericCheck(like) if check else None
    if checker is not None:
        instruments.append(checker)
    out = run_pipeline(module, passes, instruments)
    timings = [{"index": 0, "pass": "lower", "ms": first_ms, "statements": len(module.body)}] + timing.records
    if checker is not None:  # each pass's worst relative change of the outputs, beside its time
        for record, checked in zip(timing.records, checker.errors):
            record["max_rel_error"] = checked["max_rel_error"]
    return out, timings


def write_kernels(specs, directory: str) -> None:
    """One readable .py per Triton kernel, beside the IR dumps."""
    os.makedirs(directory, exist_ok=True)
    for f in os.listdir(directory):
        if f.endswith(".py"):
            os.remove(os.path.join(directory, f))
    for name, source in {spec.name: spec.source for spec in specs}.items():  # a layer's instances share one
        with open(os.path.join(directory, f"{name}.py"), "w") as f:
            f.write(source)


def write_program(run, directory: str) -> None:
    """The torch backend's generated program, `<module>.py`, beside the IR dumps."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{run.name}.py"), "w") as f:
        f.write(run.source)


@dataclass
class Driver:
    """The one compile driver: a captured graph -> lowered IR -> the pipeline (with dumps, numeric check
    and the on-disk pipeline cache) -> a backend's runner. `einfuse.compile` and
    `torch.compile(backend="einfuse")` both go through it."""

    passes: list | None
    dump_dir: str | None
    backend: str
    check: bool
    backend_options: dict
    prepare: tuple = ()  # passes run on the whole lowered module before the pipeline (which may run per layer)
    dist: object = None  # an einfuse.dist Session: no pipeline cache, no per-layer regions, weights sliced per rank

    def build(self, cap: Captured, name: str, like: dict, out_dir: str | None, report: LoweringReport) -> Variant:
        """A variant computing `cap`'s graph; `like` holds example inputs by IR name for the numeric check."""
        cached = self._cached(cap, name) if not (self.check or out_dir or self.dist) else None
        if cached is not None:
            final, report, out_leaves, timings = cached
        else:
            t0 = time.perf_counter()
            try:
                lowered = lower_graph(cap.gm, cap.kinds, name)
            except Exception as exc:
                return eager_variant(report, f"lowering failed ({_first_line(exc)})", self.backend)
            lowered.report.capture = report.capture
            regional = True
            if self.prepare:
                before = {o for op in lowered.module.body for o in op.outputs}
                dumps = [Dump(os.path.join(out_dir, "prepare"), "lower", None)] if out_dir else []
                lowered.module = run_pipeline(lowered.module, list(self.prepare), [Verify()] + dumps)
                # a prepare pass that added or removed statements (quantization) leaves lowering's repeated
                # blocks behind: the pipeline then runs on the whole module
                regional = before == {o for op in lowered.module.body for o in op.outputs}
            ms = round((time.perf_counter() - t0) * 1e3, 3)
            like = {**cap.bindings, **{k: v for k, v in like.items() if k in {i.name for i in lowered.module.inputs}}}
            final, timings = optimize(lowered.module, self.passes, out_dir, like, self.check, ms,
                                      () if self.dist or not regional else lowered.instances)
            report, out_leaves = lowered.report, lowered.out_leaves
            self._store(cap, name, final, report, out_leaves, timings)
        run = backends.build(self.backend, final, **self.backend_options)
        if out_dir and hasattr(run, "specs"):
            write_kernels(run.specs, os.path.join(out_dir, "kernels"))
        if out_dir and hasattr(run, "source"):
            write_program(run, os.path.join(out_dir, "torch"))
        user = [n if n in {i.name for i in final.inputs} else None for n in cap.user_inputs]
        v = Variant(final, run, dict(cap.bindings), user, out_leaves, cap.out_spec, report, timings, self.backend,
                    None, out_dir)
        return self.dist.bind(v) if self.dist is not None else v

    # ---- the pipeline cache: a warm compile skips lowering and passes
    def _key(self, cap: Captured, name: str) -> str:
        shapes = [(n.name, str(n.meta.get("val").shape) if hasattr(n.meta.get("val"), "shape") else "",
                   str(getattr(n.meta.get("val"), "dtype", ""))) for n in cap.gm.graph.nodes if n.op == "placeholder"]
        fps = [p.fingerprint() for p in list(self.prepare) + (self.passes if self.passes is not None else default_pipeline())]
        return key_of(cap.gm.code, repr(shapes), repr(fps), name)

    def _cached(self, cap: Captured, name: str):
        entry = Cache("modules").get(self._key(cap, name))
        if entry is None:
            return None
        meta = json.loads(entry["meta.json"])
        report = LoweringReport(meta["total"], meta["lowered"], capture=meta["capture"], notes=list(meta["notes"]))
        for target, (count, why) in meta["fallbacks"].items():
            report.fallbacks[target] = [count, why]
        timings = [{"index": 0, "pass": "pipeline cache hit", "ms": None, "statements": meta["statements"]}]
        leaves = [tuple(x) for x in meta["out_leaves"]]
        return parse(entry["module.ir"].decode()), report, leaves, timings

    def _store(self, cap, name, final, report, out_leaves, timings) -> None:
        meta = {"total": report.total, "lowered": report.lowered, "capture": report.capture,
                "fallbacks": {k: list(v) for k, v in report.fallbacks.items()}, "notes": report.notes, "out_leaves": out_leaves,
                "statements": len(final.body)}
        try:
            blob = json.dumps(meta)
        except TypeError:  # an output constant JSON cannot hold: do not cache this graph
            return
        Cache("modules").put(self._key(cap, name), {"module.ir": str(final), "meta.json": blob})


def eager_variant(report: LoweringReport, why: str, backend: str) -> Variant:
    """A variant that leaves the model to eager PyTorch, with the reason reported."""
    report.whole_graph_fallback = why
    return Variant(None, None, {}, [], [], None, report, backend=backend, fallback=why)


@dataclass
class _Compiler:
    """Compiles one variant of `model` per set of guards: torch.export, then the driver. Records what the
    variant assumes about its inputs (dtypes, devices, sizes or symbolic ranges, values) for its guards."""

    model: torch.nn.Module
    driver: Driver
    dynamic_shapes: object

    def __call__(self, args: tuple, kwargs: dict, n: int) -> Variant:
        dump = self.driver.dump_dir
        out_dir = dump if not dump or n == 0 else os.path.join(dump, f"variant_{n}")
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        backend = self.driver.backend
        if any(isinstance(x, torch.Tensor) and x.numel() == 0 for x in leaves):
            return eager_variant(LoweringReport(), "an input is empty (a size-0 dimension): there is no kernel work, "
                                 "so calls with empty inputs run in eager PyTorch", backend)
        report = LoweringReport()
        try:
            cap = self._export(args, kwargs, report)
        except NotCompilable as why:
            return eager_variant(report, str(why), backend)
        except Exception as exc:  # a capture failure leaves the model to eager PyTorch, reported
            return eager_variant(report, f"torch.export failed ({_first_line(exc)})", backend)
        try:  # a graph that mutates nothing: eager PyTorch may run it once to say whether these inputs are valid
            with torch.no_grad():
                self.model(*args, **kwargs)
        except Exception as exc:  # e.g. an f64 input to an f32 Linear: export traces it, eager refuses it
            return eager_variant(report, f"eager PyTorch raises for these inputs ({_first_line(exc)}), so calls "
                                 "with them run in eager PyTorch and raise the same error", backend)
        like = dict(zip(cap.user_inputs, leaves))
        v = self.driver.build(cap, type(self.model).__name__.lower(), like, out_dir, report)
        v.assumed = [_assumption(val, leaf) for val, leaf in zip(cap.user_values(), leaves)]
        v.ranges, v.targets = cap.size_ranges(), dict(cap.targets)
        bind_derived(v, self.model)
        return v

    def _export(self, args, kwargs, report: LoweringReport) -> Captured:
        """torch.export with the user's dynamic_shapes; a call they do not fit is captured with static sizes."""
        try:
            return export(self.model, args, kwargs, dynamic_shapes=self.dynamic_shapes)
        except NotCompilable:
            raise
        except Exception as exc:
            if self.dynamic_shapes is None:
                raise
            report.capture = f"torch.export, static sizes (dynamic_shapes did not fit this call: {_first_line(exc)})"
            return export(self.model, args, kwargs)


def _assumption(val, leaf) -> tuple:
    """What a variant assumes about one flat input: ("tensor", dtype, device, sizes) where a size is an int or
    a sympy expression over symbolic sizes, or ("value", the constant the graph was specialized on)."""
    if isinstance(val, torch.Tensor):
        dims = []
        for d in val.shape:
            if isinstance(d, torch.SymInt):
                expr = d.node.expr
                dims.append(int(expr) if expr.is_number else expr)
            else:
                dims.append(int(d))
        return ("tensor", val.dtype, val.device, tuple(dims))
    if isinstance(leaf, torch.Tensor):  # no example value recorded: exactly this tensor's sizes
        return ("tensor", leaf.dtype, leaf.device, tuple(int(d) for d in leaf.shape))
    return ("value", leaf)


def bind_derived(v: Variant, model: torch.nn.Module) -> None:
    """Bind the weight inputs a pass added (they are in no capture): `<input>_<suffix>`, derived from an input
    bound to the model's `<target>` (quantize_weights' `W_q`, `W_s`, ...), reads the model's `<target>_<suffix>`
    (einfuse.quant registers those buffers)."""
    if v.ir is None:
        return
    live = dict(model.named_parameters(remove_duplicate=False))
    live.update(model.named_buffers(remove_duplicate=False))
    for i in v.ir.inputs:
        if i.kind in ("in", "state") or i.name in v.bindings:
            continue
        bases = [b for b in v.targets if i.name.startswith(b + "_")]
        target = v.targets[max(bases, key=len)] + i.name[len(max(bases, key=len)):] if bases else None
        if target not in live:
            raise RuntimeError(f"einfuse: the program reads {i.name} ({i.type.dtype}{list(i.type.shape)}), which the "
                               f"model does not hold{f' as {target}' if target else ''}; quantize the model with "
                               "einfuse.quant.calibrate (or load a checkpoint with einfuse.quant.load) first")
        v.bindings[i.name] = live[target]
        v.targets[i.name] = target


def default_backend(tensors=()) -> str:
    """DEFAULT_BACKEND when set; else "triton" when the inputs are on CUDA (or, without tensor inputs, a
    CUDA device is available): native kernels; else "torch": the generated torch program, eager's speed on
    CPU, where Triton only interprets (`backend="triton"` still picks the interpreter)."""
    if DEFAULT_BACKEND:
        return DEFAULT_BACKEND
    devices = {t.device.type for t in tensors if isinstance(t, torch.Tensor)}
    return "triton" if "cuda" in devices or (not devices and torch.cuda.is_available()) else "torch"


def _settings(dump_dir, check, backend, tensors=()) -> tuple:
    """Options with their environment defaults: EINFUSE_DUMP_DIR, EINFUSE_CHECK, EINFUSE_BACKEND."""
    dump_dir = dump_dir or os.environ.get("EINFUSE_DUMP_DIR") or None
    check = bool(int(os.environ.get("EINFUSE_CHECK", "0"))) if check is None else check
    backend = backend or os.environ.get("EINFUSE_BACKEND") or default_backend(tensors)
    if backend not in backends.BACKENDS:
        raise ValueError(f"einfuse: unknown backend {backend!r}; available: {', '.join(sorted(backends.BACKENDS))}")
    return dump_dir, check, backend


def compile(model: torch.nn.Module, args=(), kwargs=None, *, passes=None, dump_dir=None, backend=None,
            check=None, dynamic_shapes=None, cuda_graphs: bool = False, prepare=(), dist=None) -> CompiledModule:
    """Compile `model` for inputs like `args`/`kwargs`; the result is called like `model`.

    passes: the pipeline (default `einfuse.passes.default_pipeline()`); dump_dir (or $EINFUSE_DUMP_DIR):
    write the IR after every pass and the generated kernels or program; backend: "triton" (generated
    kernels, natively on CUDA, under Triton's interpreter on CPU), "torch" (a generated torch program) or
    "reference" (the IR evaluated with torch ops); the default is "triton" for CUDA inputs, else "torch";
    check (or $EINFUSE_CHECK=1): compare every pass's numerics with the one before on random inputs;
    dynamic_shapes: as for torch.export (those sizes stay symbolic); cuda_graphs: on CUDA, replay the
    kernels of a call as one CUDA graph; prepare: passes run on the whole lowered module before the pipeline
    (quantization: `einfuse.quant` passes its scheme's here); dist: an `einfuse.Dist` (inside a torchrun job): this rank's share
    of the model split by tensor parallelism (see einfuse.dist).
    """
    kwargs = dict(kwargs or {})
    args = args if isinstance(args, tuple) else (args,)
    dump_dir, check, backend = _settings(dump_dir, check, backend, torch.utils._pytree.tree_leaves((args, kwargs)))
    options = {"cuda_graphs": True} if cuda_graphs and backend == "triton" else {}
    session = dist.start(model) if dist is not None else None
    if session is not None:
        passes = session.pipeline(passes)
    driver = Driver(None if passes is None else list(passes), dump_dir, backend, check, options,
                    tuple(prepare) + (session.prepare() if session else ()), session)
    return CompiledModule(model, _Compiler(model, driver, dynamic_shapes), args, kwargs)


# ---------------------------------------------------------------- torch.compile(backend="einfuse")

def _forward_compiler(gm: torch.fx.GraphModule, example_inputs):
    """AOTAutograd's forward compiler: the graph goes through the same driver as `einfuse.compile`."""
    dump_dir, check, backend = _settings(None, None, None, example_inputs)
    out_dir = os.path.join(dump_dir, f"dynamo_{len(COMPILED)}") if dump_dir else None
    cap = as_captured(gm)
    report = LoweringReport(capture="torch.compile (dynamo + AOTAutograd)")
    with unset_fake_temporarily():  # AOTAutograd calls us under its fake mode; the numeric check needs real tensors
        v = Driver(None, dump_dir, backend, check, {}).build(cap, "dynamo_graph", {}, out_dir, report)
    if v.fallback is not None:  # never fail compilation: run this graph as torch would
        log.warning("einfuse: graph left to torch: %s", v.fallback)
        return make_boxed_func(gm.forward)
    COMPILED.append(v)
    names = {i.name for i in v.ir.inputs}

    def forward(args):
        inputs = {**v.bindings, **{p: a for p, a in zip(cap.user_inputs, args) if p in names}}
        args.clear()  # boxed calling convention: let the caller's inputs be freed
        with torch.no_grad():
            out = v.run(inputs)
        return [out[x] if kind == "tensor" else x for kind, x in v.out_leaves]

    forward._boxed_call = True
    return forward


einfuse_backend = aot_autograd(fw_compiler=_forward_compiler, decompositions=decomposition_table())


def register_dynamo_backend() -> None:
    """Make "einfuse" a name torch.compile accepts (also declared as a torch_dynamo_backends entry point)."""
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if "einfuse" not in _COMPILER_FNS:
        register_backend(name="einfuse")(einfuse_backend)


# ---------------------------------------------------------------- serving: programs over a paged KV cache

@dataclass
class CachedPrograms:
    """A decoder's prefill program (B sequences, T new tokens each after a cached prefix) and decode program
    (B sequences, one token each), derived from one capture (passes.serving): both read and write the same
    paged KV cache, the `states` (each [NB, block_size, ...]), through `block_table[b, j]`."""

    prefill: Variant
    decode: Variant
    states: tuple  # Input (kind "state") of each cache, shapes over the symbolic NB
    block_size: int

    def rebind(self, model: torch.nn.Module) -> None:
        """Point both programs' weights at `model`'s tensors as they are now (a replaced parameter of the
        same shape and dtype is read from then on); a changed shape or dtype is an error."""
        live = dict(model.named_parameters(remove_duplicate=False))
        live.update(model.named_buffers(remove_duplicate=False))
        for v in (self.prefill, self.decode):
            for name, target in v.targets.items():
                t = live.get(target)
                if t is None or name not in v.bindings:
                    continue
                old = v.bindings[name]
                if t.shape != old.shape or t.dtype != old.dtype:
                    raise RuntimeError(f"einfuse: {target} is now {t.dtype}{list(t.shape)}, compiled for "
                                       f"{old.dtype}{list(old.shape)}; make a new LLM (or runner) for the model")
                v.bindings[name] = t


    def kernels(self) -> list:
        """The Triton kernels of both programs, each distinct one once (a layer's are launched per layer)."""
        from .runtime.triton_backend import triton_backend

        specs = []
        for v in (self.prefill, self.decode):
            specs += (v.run if hasattr(v.run, "specs") else triton_backend(v.ir, autotune=False)).specs
        return list({(s.name, s.source): s for s in specs}.values())

    def check_gpu(self, archs=(80, 90), jobs=None, kinds=None) -> list:
        """Compile every distinct kernel of both programs ahead of time for each CUDA arch (no GPU needed);
        `kinds` keeps only kernels of those kinds (e.g. ("update", "attention"))."""
        from .codegen.aot import check_gpu

        specs = [s for s in self.kernels() if kinds is None or s.mapping.kind in kinds]
        return check_gpu(specs, archs=archs, jobs=jobs)


_CACHED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {(block size, backend): programs}


def compile_cached(model: torch.nn.Module, *, block_size: int = 16, backend: str | None = None,
                   dump_dir: str | None = None, check: bool | None = None, prepare=(),
                   after_cache=(), dist=None) -> CachedPrograms:
    """Capture `model`'s forward once (input_ids and position_ids of B sequences of T tokens, the logits of
    the last token only) and derive its prefill and decode programs over a paged KV cache. The programs
    are kept per model (a second runner for it compiles nothing) and read its weights as they are at each
    call of this function. prepare: passes run on the whole captured module first; after_cache: passes run
    right after cache_kv (quantization: einfuse.quant gives its scheme's); dist: an `einfuse.Dist` (in a
    torchrun job): this rank's share of both programs, the KV cache split by heads (compiled afresh, not kept)."""
    device = next(model.parameters()).device
    _, _, chosen = _settings(None, False, backend, [torch.empty(0, device=device)])
    if dist is not None:
        return _compile_cached(model, block_size, chosen, dump_dir, check, prepare, after_cache, dist.start(model))
    memo = _CACHED.setdefault(model, {})
    extra = tuple(p.fingerprint() for p in list(prepare) + list(after_cache))
    key = (block_size, chosen, str(device), next(model.parameters()).dtype) + extra
    if key not in memo or dump_dir:
        disk = key_of("serving", _model_fingerprint(model), str(block_size), chosen, device.type, *extra)
        warm = None if (dump_dir or check) else _load_cached_programs(disk, model, chosen)
        memo[key] = warm or _compile_cached(model, block_size, chosen, dump_dir, check, prepare, after_cache)
        if warm is None and not dump_dir:
            _store_cached_programs(disk, memo[key], model)
    memo[key].rebind(model)
    return memo[key]


def _model_fingerprint(model: torch.nn.Module) -> str:
    """What a capture of `model` depends on besides its weights' values: its class, its config, its
    tensors' names, shapes and dtypes, and the transformers version (the forward's source)."""
    config = getattr(model, "config", None)
    text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(config)
    attn = getattr(config, "_attn_implementation", None)
    tensors = [(n, tuple(t.shape), str(t.dtype)) for n, t in list(model.named_parameters(remove_duplicate=False))
               + list(model.named_buffers(remove_duplicate=False))]
    try:
        import transformers

        version = transformers.__version__
    except ImportError:
        version = ""
    return f"{type(model).__module__}.{type(model).__qualname__}|{text}|{attn}|{tensors}|{version}"


def _store_cached_programs(key: str, programs: "CachedPrograms", model: torch.nn.Module) -> None:
    """The derived programs' IR, where their weights come from in the model (state-dict names) and the
    constants the capture made (safetensors, never pickle): a later start skips the capture."""
    from safetensors.torch import save

    live = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    live |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    meta, constants = {"block_size": programs.block_size}, {}
    for label in ("prefill", "decode"):
        v = getattr(programs, label)
        meta[label] = {"targets": v.targets, "user_inputs": v.user_inputs, "out_leaves": v.out_leaves}
        for name, t in v.bindings.items():
            if v.targets.get(name) not in live:
                constants[f"{label}/{name}"] = t.detach().cpu().contiguous()
    try:
        blob = json.dumps(meta)
    except TypeError:  # an output constant JSON cannot hold: no disk entry
        return
    Cache("serving").put(key, {"prefill.ir": str(programs.prefill.ir), "decode.ir": str(programs.decode.ir),
                               "meta.json": blob, "constants.safetensors": save(constants)})


def _load_cached_programs(key: str, model: torch.nn.Module, backend: str) -> "CachedPrograms | None":
    from safetensors.torch import load

    entry = Cache("serving").get(key)
    if entry is None:
        return None
    meta = json.loads(entry["meta.json"])
    constants = load(entry["constants.safetensors"])
    device = next(model.parameters()).device
    live = dict(model.named_parameters(remove_duplicate=False))
    live.update(model.named_buffers(remove_duplicate=False))
    programs = {}
    for label in ("prefill", "decode"):
        ir = parse(entry[f"{label}.ir"].decode())
        m = meta[label]
        bindings = {}
        for i in ir.inputs:
            if i.kind == "in" or i.kind == "state":
                continue
            t = constants.get(f"{label}/{i.name}")
            bindings[i.name] = t.to(device) if t is not None else live.get(m["targets"].get(i.name))
            if bindings[i.name] is None:
                return None  # the model no longer has what the entry names: compile afresh
        timings = [{"index": 0, "pass": "serving cache hit", "ms": None, "statements": len(ir.body)}]
        v = Variant(ir, backends.build(backend, ir), bindings, m["user_inputs"],
                    [tuple(x) for x in m["out_leaves"]], None, LoweringReport(), timings, backend)
        v.targets = m["targets"]
        programs[label] = v
    states = tuple(i for i in programs["decode"].ir.inputs if i.kind == "state")
    return CachedPrograms(programs["prefill"], programs["decode"], states, meta["block_size"])


def _compile_cached(model, block_size, backend, dump_dir, check, prepare=(), after_cache=(),
                    session=None) -> CachedPrograms:
    from .passes import cleanup_passes, fusion_passes
    from .passes.serving import CacheKV, Specialize

    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 32
    g = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (2, 8), generator=g).to(device)
    kwargs = {"input_ids": ids, "position_ids": torch.arange(8, device=device).expand(2, 8).contiguous(), "use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    batch, tokens = torch.export.Dim("batch", min=1), torch.export.Dim("tokens", min=1)
    dims = {k: ({0: batch, 1: tokens} if k in ("input_ids", "position_ids") else None) for k in kwargs}
    dump_dir, check, backend = _settings(dump_dir, check, backend, [ids])
    model = model.eval()
    try:
        cap = export(model, (), kwargs, dynamic_shapes=dims)
    except Exception as exc:
        raise RuntimeError(f"einfuse: cannot capture {type(model).__name__} for serving: {_first_line(exc)}") from exc
    programs = {}
    for label, fixed in (("prefill", {}), ("decode", {"input_ids": {1: 1}})):
        passes = cleanup_passes() + [CacheKV(block_size)] + list(after_cache) + cleanup_passes() + fusion_passes()
        if session is not None:  # split after the cache exists (its states split with the heads)
            passes = passes[:-len(fusion_passes())] + list(session.prepare()) + fusion_passes()
        out_dir = os.path.join(dump_dir, label) if dump_dir else None
        like = dict(zip(cap.user_inputs, torch.utils._pytree.tree_leaves(((), kwargs))))
        driver = Driver(passes, out_dir, backend, check, {}, prepare=(Specialize(fixed),) + tuple(prepare),
                        dist=session)
        v = driver.build(cap, f"{type(model).__name__.lower()}_{label}", like, out_dir, LoweringReport())
        if v.fallback is not None:
            raise RuntimeError(f"einfuse: the {label} program of {type(model).__name__} cannot be compiled: "
                               f"{v.fallback}")
        v.targets = dict(cap.targets)
        bind_derived(v, model)
        programs[label] = v
    states = tuple(i for i in programs["decode"].ir.inputs if i.kind == "state")
    return CachedPrograms(programs["prefill"], programs["decode"], states, block_size)
