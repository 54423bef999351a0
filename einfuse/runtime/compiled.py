"""CompiledModule: an nn.Module that runs compiled variants, each behind guards (as dynamo's are).

A variant records what it assumed when it was compiled — the nesting of the call's arguments, every
input's dtype, device and sizes (a size `dynamic_shapes` made symbolic is a range, not a value), the
values of non-tensor arguments, the training flag of every submodule, which submodules the model has,
and the identity, `_version`, storage and metadata of every parameter, buffer and constant it reads — and
a call checks them before it runs (a few microseconds). A call that violates a guard runs a variant
whose guards hold, or compiles a new one. Parameters are read live: an in-place update is seen by the
next call, and a replaced parameter (`lin.weight = nn.Parameter(...)`) is re-bound by its state-dict
name. Calls that need autograd run in eager PyTorch (einfuse.compile is inference-only)."""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.utils._pytree as pytree

from ..ir.evaluator import EvaluationError
from ..ir.module import Module

log = logging.getLogger("einfuse")


@dataclass
class Variant:
    """One specialization: the final IR, how to call it, what compiling it reported, and its guards."""

    ir: Module | None
    run: Callable[[dict], dict]  # IR inputs by name -> IR outputs by name
    bindings: dict  # weights and constants by IR input name (the model's live tensors once bound)
    user_inputs: list  # flat user-input leaves -> IR input name (None for non-tensor leaves)
    out_leaves: list  # ("tensor", IR name) | ("value", constant), in flat output order
    out_spec: pytree.TreeSpec | None
    lowering: object  # LoweringReport
    timings: list = field(default_factory=list)
    backend: str = "reference"
    fallback: str | None = None  # why the whole model runs eagerly, when it does
    dump_dir: str | None = None
    # what the compiler assumed (filled in by the compile driver; None: exactly the call it was compiled for)
    assumed: list | None = None  # per flat user leaf: ("tensor", dtype, device, dims) | ("value", v)
    ranges: dict = field(default_factory=dict)  # symbolic size -> (lowest, highest or None)
    targets: dict = field(default_factory=dict)  # IR input name -> the model's attribute path (state-dict name)
    # guards, set when the variant joins a CompiledModule
    guards: Guards | None = None
    weights: list = field(default_factory=list)  # [Weight]
    tensors: list = field(default_factory=list)  # the weights' live tensors, in `weights` order
    training: tuple = ()  # every submodule's `training` flag at capture
    module_ids: tuple = ()  # the submodules (by identity) at capture
    modules_ok: bool = True  # the model still has the submodules and weights it had at capture
    version_sum: int | None = None  # the weights' `_version`s summed (versions only grow: equal sums, no writes)
    cuts: dict = field(default_factory=dict)  # IR name -> its slice of the model's tensor (a rank's share, dist)
    device: torch.device | None = None  # the first weight's device


@dataclass
class Weight:
    """A parameter, buffer or constant a variant reads: where it lives in the model and what it looked like."""

    ir_name: str
    target: str | None  # attribute path in the model; None for a constant made inside forward
    tensor: torch.Tensor
    dtype: torch.dtype
    shape: tuple
    device: torch.device
    cut: Callable | None = None  # the variant reads cut(tensor), this rank's slice of it (einfuse.Dist)

    def matches(self, t: torch.Tensor) -> bool:
        return t.dtype == self.dtype and tuple(t.shape) == self.shape and t.device == self.device

    def describe(self) -> str:
        return f"{_dtype(self.dtype)}{list(self.shape)} on {self.device}"


@dataclass
class Explanation:
    """What `explain()` tells: the lowered share, every fallback with its count and reason, timings."""

    share: float
    fallbacks: dict  # op -> (count, reason)
    text: str
    timings: list

    def __str__(self) -> str:
        return self.text


class GuardText(str):
    """`cm.guards()`: readable lines, printed as text in a REPL too."""

    def __repr__(self) -> str:
        return str(self)


def _dtype(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


# ---------------------------------------------------------------- guards on the call's arguments

def _symbol_name(d) -> str | None:
    """The name of a size that is one bare symbol (`s31`), else None."""
    return str(d) if getattr(d, "is_Symbol", False) else None


def _value_check(var: str, v, consts: dict, n: int) -> tuple[str, str]:
    """(condition that fails the guard, readable text) for a non-tensor leaf."""
    if v is None or isinstance(v, bool):
        return f"{var} is not {v!r}", f"is {v!r}"
    if type(v) in (int, str) or (type(v) is float and v == v):  # (nan equals nothing: compared by repr below)
        consts[f"c{n}"], consts[f"t{n}"] = v, type(v)
        return f"type({var}) is not t{n} or {var} != c{n}", f"== {v!r} ({type(v).__name__})"
    consts[f"r{n}"] = repr(v)
    return f"repr({var}) != r{n}", f"has repr {repr(v)[:60]}"


@dataclass
class Guards:
    """The checks of one variant on a call's flat arguments, compiled into one Python function."""

    structure: object  # (positional count, keyword names) for flat calls, else the TreeSpec
    assumed: list
    ranges: dict
    check: Callable[[list], bool]
    lines: list
    source: str

    @staticmethod
    def build(structure, assumed: list, ranges: dict) -> Guards:
        consts: dict = {"Tensor": torch.Tensor, "strided": torch.strided}
        body = [f"if len(flat) != {len(assumed)}: return False"]
        lines = []
        bound: dict = {}  # symbol -> the variable holding its value in this call
        exprs = []  # (variable, sympy expression) checked once every symbol is bound
        for k, spec in enumerate(assumed):
            var = f"x{k}"
            body.append(f"{var} = flat[{k}]")
            if spec[0] == "value":
                cond, text = _value_check(var, spec[1], consts, k)
                body.append(f"if {cond}: return False")
                lines.append(f"argument {k} {text}")
                continue
            _, dtype, device, dims = spec
            consts[f"dt{k}"], consts[f"dev{k}"] = dtype, device
            body.append(f"if not isinstance({var}, Tensor) or {var}.dtype is not dt{k} or {var}.device != dev{k} "
                        f"or {var}.layout is not strided: return False")
            if all(isinstance(d, int) for d in dims):
                body.append(f"if {var}.shape != {tuple(dims)!r}: return False")
            else:
                body.append(f"s = {var}.shape")
                body.append(f"if len(s) != {len(dims)}: return False")
                for j, d in enumerate(dims):
                    name = _symbol_name(d)
                    if isinstance(d, int):
                        body.append(f"if s[{j}] != {d}: return False")
                    elif name is not None and name in bound:
                        body.append(f"if s[{j}] != {bound[name]}: return False")
                    elif name is not None:
                        v = bound[name] = f"v{len(bound)}"
                        lo, hi = ranges.get(name, (0, None))
                        # a size-0 call runs in eager PyTorch (no kernel has work to do; eager's errors stay its own)
                        body.append(f"{v} = s[{j}]")
                        body.append(f"if {v} < {max(lo, 1)}" + (f" or {v} > {hi}" if hi is not None else "")
                                    + ": return False")
                    else:
                        exprs.append((f"{var}.shape[{j}]", d))
            shown = ", ".join(str(d) for d in dims)
            lines.append(f"argument {k}: Tensor {_dtype(dtype)}[{shown}] on {device} (any strides: the runtime reads "
                         "inputs through .contiguous())")
        for n, (where, expr) in enumerate(exprs):  # a size that is an expression of symbols (2*s0)
            names = sorted(str(s) for s in expr.free_symbols)
            if not all(s in bound for s in names):
                body.append("return False  # a size expression over a symbol no input gives alone")
                break
            consts[f"e{n}"] = (expr, {s: sym for s in names for sym in expr.free_symbols if str(sym) == s})
            args = ", ".join(f"{s!r}: {bound[s]}" for s in names)
            body.append(f"if {where} != _size(e{n}, {{{args}}}): return False")
        body.append("return True")
        for name, (lo, hi) in sorted(ranges.items()):
            if name in bound:
                lines.append(f"size {name}: {max(lo, 1)} <= {name}" + (f" <= {hi}" if hi is not None else "")
                             + " (symbolic: a new value does not recompile)")
        consts["_size"] = _eval_size
        source = "def check(flat):\n" + "\n".join("    " + b for b in body) + "\n"
        scope = dict(consts)
        exec(compile(source, "<einfuse guards>", "exec"), scope)  # noqa: S102 (code built above, no user text)
        return Guards(structure, assumed, ranges, scope["check"], lines, source)

    def failures(self, flat: list, structure) -> list[str]:
        """The violated guards, in words (the slow path: only when no variant's guards hold)."""
        if structure != self.structure:
            return [f"the arguments are nested differently ({_structure_text(structure)} instead of "
                    f"{_structure_text(self.structure)})"]
        if len(flat) != len(self.assumed):
            return [f"{len(flat)} arguments instead of {len(self.assumed)}"]
        out = []
        values: dict = {}
        for k, (x, spec) in enumerate(zip(flat, self.assumed)):
            if spec[0] == "value":
                if not Guards.build(None, [spec], {}).check([x]):
                    out.append(f"argument {k} is {x!r}, the variant assumed {spec[1]!r}")
                continue
            _, dtype, device, dims = spec
            if not isinstance(x, torch.Tensor):
                out.append(f"argument {k} is a {type(x).__name__}, the variant assumed a tensor")
                continue
            if x.dtype != dtype:
                out.append(f"argument {k} is {_dtype(x.dtype)}, the variant assumed {_dtype(dtype)}")
            if x.device != device:
                out.append(f"argument {k} is on {x.device}, the variant assumed {device}")
            if x.layout != torch.strided:
                out.append(f"argument {k} has layout {x.layout}, the variant assumed strided")
            if x.dim() != len(dims):
                out.append(f"argument {k} has {x.dim()} dimensions, the variant assumed {len(dims)}")
                continue
            for j, (have, d) in enumerate(zip(x.shape, dims)):
                name = _symbol_name(d)
                if isinstance(d, int):
                    if have != d:
                        out.append(f"argument {k} has size {have} in dimension {j}, the variant assumed {d}")
                elif name is not None:
                    lo, hi = self.ranges.get(name, (0, None))
                    if name in values and values[name] != have:
                        out.append(f"argument {k} dimension {j} is {have} but {name} is {values[name]} elsewhere")
                    values.setdefault(name, have)
                    if have < max(lo, 1) or (hi is not None and have > hi):
                        out.append(f"argument {k} dimension {j} ({name}) is {have}, outside "
                                   f"{max(lo, 1)}..{hi if hi is not None else 'inf'}")
        return out or ["a size expression over the symbolic sizes does not hold"]


def _eval_size(entry, values: dict) -> int:
    expr, symbols = entry
    return int(expr.xreplace({symbols[k]: v for k, v in values.items()}))


def _structure_text(structure) -> str:
    if isinstance(structure, tuple) and len(structure) == 2 and isinstance(structure[0], int):
        n, names = structure
        return f"{n} positional" + (f", keywords {', '.join(names)}" if names else "")
    return "nested arguments"


def flatten_call(args: tuple, kwargs: dict) -> tuple[list, object]:
    """The call's flat leaves and its structure: (positional count, keyword names) when every argument is a
    tensor (the fast path), else pytree's TreeSpec. Keywords are in sorted order, as capture saw them."""
    flat = list(args)
    if kwargs:
        flat.extend(kwargs.values())
    for x in flat:
        if not isinstance(x, torch.Tensor):
            break
    else:
        return flat, (len(args), tuple(kwargs))
    flat, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    return flat, spec


def exact_assumptions(flat: list) -> list:
    """Guards that hold for exactly this call (a variant that runs in eager PyTorch assumes no ranges)."""
    return [("tensor", x.dtype, x.device, tuple(int(d) for d in x.shape)) if isinstance(x, torch.Tensor)
            else ("value", x) for x in flat]


# ---------------------------------------------------------------- parameter, buffer and submodule changes

# Bumped whenever a module of a compiled model registers a parameter, buffer or submodule (`lin.weight =
# nn.Parameter(...)`, `model.act = nn.ReLU()`): a call re-reads the model's weights by name only after such a change.
_GENERATION = [0]
_TRACKED: set = set()  # ids of the modules of compiled models (a stale id only costs a needless re-read)
_HOOKS: list = []


def _bump(module, name, value):
    # not while torch.compile traces: dynamo would guard on the counter (and modules built inside a traced
    # forward, like ModuleList slices, are not a compiled model's)
    if not torch.compiler.is_compiling() and id(module) in _TRACKED:
        _GENERATION[0] += 1


def _install_hooks() -> None:
    if not _HOOKS:
        from torch.nn.modules import module as nn_module

        _HOOKS.extend([nn_module.register_module_parameter_registration_hook(_bump),
                       nn_module.register_module_buffer_registration_hook(_bump),
                       nn_module.register_module_module_registration_hook(_bump)])


def resolve(model: torch.nn.Module, target: str):
    """The model's tensor at an attribute path (`layers.0.mlp.weight`), or None when there is none."""
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.Tensor) else None


_TRAINING = operator.attrgetter("training")
_TRAINING_ITEM = operator.itemgetter("training")
_VERSION = operator.attrgetter("_version")


# ---------------------------------------------------------------- the module

class CompiledModule(torch.nn.Module):
    """Behaves like the original module; a call no variant's guards accept compiles a new variant."""

    def __init__(self, model, compile_variant: Callable, args: tuple, kwargs: dict):
        super().__init__()
        _install_hooks()
        self._model = [model]  # a list so nn.Module does not register the original as a submodule
        self._compile_variant = compile_variant
        self._variants: list[Variant] = []
        self._generation = -1
        self._mods: list = []  # the submodules' __dict__s (or the modules), whose training flags are guarded
        self._flag = _TRAINING
        self._module_ids: tuple = ()
        self._recompiles: list[str] = []  # why each variant after the first was compiled
        self._eager_calls: dict = {}  # reason -> count, for calls that ran in eager PyTorch
        kwargs = dict(sorted(kwargs.items()))
        self._example = (tuple(args), kwargs)
        self._last: Variant | None = None
        self._refresh()
        flat, structure = flatten_call(tuple(args), kwargs)
        self._last = self._add(tuple(args), kwargs, flat, structure)

    # ---- calling
    def forward(self, *args, **kwargs):
        if kwargs:
            kwargs = dict(sorted(kwargs.items()))
        flat, structure = flatten_call(args, kwargs)
        v = self._select(args, kwargs, flat, structure)
        if v is None:  # a call that needs autograd
            return self._model[0](*args, **kwargs)
        if v.fallback is not None:
            try:
                return self._model[0](*args, **kwargs)
            except Exception as exc:
                exc.add_note(f"einfuse: this call ran in eager PyTorch: {v.fallback}")
                raise
        inputs = dict(v.bindings)
        for leaf, name in zip(flat, v.user_inputs):
            if name is not None:
                inputs[name] = leaf
        try:
            with torch.no_grad():
                out = v.run(inputs)
        except EvaluationError:  # raised by the input check before any work: did a weight change behind the guards?
            if all(w.matches(t) for w, t in zip(v.weights, v.tensors)):
                raise
            v.version_sum = -1  # e.g. `lin.weight.data = x.double()`: the next check re-specializes
            return self.forward(*args, **kwargs)
        leaves = [out[x] if kind == "tensor" else x for kind, x in v.out_leaves]
        return pytree.tree_unflatten(leaves, v.out_spec) if v.out_spec is not None else leaves

    def _select(self, args, kwargs, flat, structure) -> Variant | None:
        """The variant whose guards hold for this call (compiling one when none does); None when the call
        must run in eager PyTorch because it needs autograd."""
        if _GENERATION[0] != self._generation:
            self._refresh()
        training = tuple(map(self._flag, self._mods))
        if torch.is_grad_enabled():
            why = self._needs_autograd(flat, training)
            if why is not None:
                self._eager_calls[why] = self._eager_calls.get(why, 0) + 1
                return None
        v = self._last
        if v is not None and v.guards.structure == structure and v.guards.check(flat) and self._holds(v, training):
            return v
        for v in self._variants:
            if v.guards.structure == structure and v.guards.check(flat) and self._holds(v, training):
                self._last = v
                return v
        why = self._why_not(self._last, flat, structure, training)
        log.info("einfuse: compiling variant %d: %s", len(self._variants) + 1, "; ".join(why))
        self._recompiles.append(f"variant {len(self._variants) + 1}: " + "; ".join(why))
        self._last = self._add(args, kwargs, flat, structure)
        return self._last

    def _holds(self, v: Variant, training: tuple) -> bool:
        """The guards on the model's state: submodules, training flags, and the weights the variant reads."""
        if not v.modules_ok or v.training != training:
            return False
        ts = v.tensors
        if sum(map(_VERSION, ts)) != v.version_sum:  # written in place (or re-bound): still what it assumed?
            if not all(w.matches(t) for w, t in zip(v.weights, ts)):
                return False
            v.version_sum = sum(map(_VERSION, ts))
            for w in v.weights:  # a rank's slices are copies: cut again from what the model holds now
                if w.cut is not None:
                    v.bindings[w.ir_name] = w.cut(w.tensor)
        # `model.to(device)` gives every weight new storage without a version change; dtype and size changes
        # made that way are caught by the run's input check (see forward), a device change here
        return not ts or ts[0].device == v.device

    def _needs_autograd(self, flat: list, training: tuple) -> str | None:
        """Why this call (with grad enabled) must run in eager PyTorch, or None."""
        for k, x in enumerate(flat):
            if isinstance(x, torch.Tensor) and x.requires_grad:
                return (f"argument {k} requires grad: einfuse.compile is inference-only, so calls that need "
                        "autograd run in eager PyTorch (call under torch.no_grad() to run compiled)")
        if any(training) and any(p.requires_grad for p in self._model[0].parameters()):
            return ("the model is in train() mode with grad enabled: einfuse.compile is inference-only, so "
                    "such calls run in eager PyTorch (call model.eval() or use torch.no_grad() to run compiled)")
        return None

    def _add(self, args, kwargs, flat, structure) -> Variant:
        """Compile a variant for this call and put it behind its guards."""
        v = self._compile_variant(args, kwargs, len(self._variants))
        self._refresh()  # capture may have registered submodules or buffers (lazily built ones)
        assumed = v.assumed if v.assumed is not None else exact_assumptions(flat)
        v.guards = Guards.build(structure, assumed, v.ranges if v.assumed is not None else {})
        v.training = tuple(map(self._flag, self._mods))
        model = self._model[0]
        weights = []
        for name, tensor in v.bindings.items():
            target = v.targets.get(name)
            live = resolve(model, target) if target else None
            cut = v.cuts.get(name)
            if cut is not None and live is not None and live.dtype == tensor.dtype and cut(live).shape == tensor.shape:
                # a rank's slice: the model's tensor is followed (replaced or written in place: sliced again)
                weights.append(Weight(name, target, live, live.dtype, tuple(live.shape), live.device, cut))
                continue
            if live is not None and live.shape == tensor.shape and live.dtype == tensor.dtype:
                tensor = live  # read the model's own tensor: in-place updates are seen
            else:
                target = None  # made inside forward (a lifted constant): nothing in the model to follow
            v.bindings[name] = tensor
            weights.append(Weight(name, target, tensor, tensor.dtype, tuple(tensor.shape), tensor.device))
        v.weights = weights
        v.tensors = ts = [w.tensor for w in weights]
        v.version_sum, v.device = sum(map(_VERSION, ts)), ts[0].device if ts else None
        v.modules_ok = True
        v.module_ids = self._module_ids
        self._variants.append(v)
        return v

    def _refresh(self) -> None:
        """After any parameter, buffer or submodule registration in the process: re-read the model's
        submodules, and re-bind each variant's weights to the tensors now at their names."""
        model = self._model[0]
        mods = list(model.modules())
        self._module_ids = tuple(map(id, mods))
        _TRACKED.update(self._module_ids)
        # the training flags, read from each module's __dict__ (about twice as fast as getattr)
        dicts = [m.__dict__ for m in mods]
        plain = all("training" in d for d in dicts)
        self._mods, self._flag = (dicts, _TRAINING_ITEM) if plain else (mods, _TRAINING)
        for v in self._variants:
            v.modules_ok = v.module_ids == self._module_ids
            for k, w in enumerate(v.weights):
                if w.target is None:
                    continue
                live = resolve(model, w.target)
                if live is None:
                    v.modules_ok = False  # the weight is gone: the graph no longer describes the model
                elif live is not w.tensor:
                    w.tensor = v.tensors[k] = live
                    v.bindings[w.ir_name] = w.cut(live) if w.cut and w.matches(live) else live
                    v.version_sum = None  # re-check its metadata on the next call
        self._generation = _GENERATION[0]

    def _why_not(self, v: Variant | None, flat, structure, training) -> list[str]:
        """Why the most recent variant's guards do not hold for this call, in words."""
        if v is None:
            return ["first call"]
        out = v.guards.failures(flat, structure) if not (v.guards.structure == structure and v.guards.check(flat)) \
            else []
        if not v.modules_ok:
            out.append("a submodule, parameter or buffer of the model was replaced or removed")
        if v.training != training:
            out.append("a submodule's train()/eval() mode changed")
        if v.modules_ok and v.training == training and not out:
            for w in v.weights:
                if not w.matches(w.tensor):
                    out.append(f"{w.target or w.ir_name} is now {_dtype(w.tensor.dtype)}{list(w.tensor.shape)} on "
                               f"{w.tensor.device}, the variant assumed {w.describe()}")
        return out or ["no variant's guards hold"]

    def variant_for(self, *args, **kwargs) -> Variant | None:
        """The variant a call with these arguments would run, found by the same guard checks a call makes
        (compiling one when no variant's guards hold); None when the call would run in eager PyTorch because
        it needs autograd. Nothing runs: this is a call's overhead before its kernels."""
        if kwargs:
            kwargs = dict(sorted(kwargs.items()))
        flat, structure = flatten_call(args, kwargs)
        return self._select(args, kwargs, flat, structure)

    # ---- inspection
    @property
    def variant(self) -> Variant:
        """The variant of the most recent call (or of the example inputs)."""
        return self._last

    @property
    def variants(self) -> list[Variant]:
        return list(self._variants)

    @property
    def ir(self) -> Module:
        """The final IR of the most recent variant."""
        if self._last.ir is None:
            raise RuntimeError(f"einfuse: this model runs in eager PyTorch, so it has no IR: {self._last.fallback}")
        return self._last.ir

    def guards(self) -> GuardText:
        """What each variant assumed and every call checks, as readable text."""
        out = []
        for n, v in enumerate(self._variants, 1):
            head = f"variant {n}" + (" (runs in eager PyTorch: " + v.fallback + ")" if v.fallback else "")
            out.append(head + (" — the most recent" if v is self._last else "") + ":")
            out.append(f"  arguments: {_structure_text(v.guards.structure)}")
            out.extend(f"  {line}" for line in v.guards.lines)
            out.append(f"  aliasing: not assumed (the graph mutates none of its inputs, and inputs that shared "
                       f"storage were captured as separate tensors)")
            modes = {"train" if t else "eval" for t in v.training}
            out.append(f"  train/eval mode of the model's {len(v.training)} module(s) as at capture "
                       f"({', '.join(sorted(modes))}); the same submodule objects")
            for w in v.weights:
                where = f"model.{w.target}" if w.target else "a constant made in forward"
                out.append(f"  {w.ir_name} <- {where}: {w.describe()}")
        out.append("weights are read live (in-place updates are seen); each call checks their identity (a replaced "
                   "one is re-bound by its name), `_version`s (a write re-checks dtype, sizes and device) and device; "
                   "new storage of another dtype or size (`.data = `) is caught by the run's input check and "
                   "re-specializes")
        out.append("calls with grad enabled that need autograd (an input that requires grad, or train() mode with "
                   "parameters that require grad) run in eager PyTorch")
        out.append("not guarded: other Python attributes the forward reads — compile again after changing them")
        return GuardText("\n".join(out))

    def explain(self, print_it: bool = True) -> Explanation:
        """What was lowered, what fell back to torch and why, and how long each pass took."""
        v = self._last
        lines = [v.lowering.text(), f"backend: {v.backend}"]
        lines += [f"  MoE experts {g}: {how}" for g, how in getattr(v.run, "moe_chains", None) or []]
        lines += [f"  {note}" for note in getattr(v.run, "notes", None) or []]
        if v.timings:
            lines.append("passes:")
            for t in v.timings:
                ms = f"{t['ms']:.2f} ms" if t.get("ms") is not None else "-"
                lines.append(f"  {t['index']:02d} {t['pass']:<22} {ms:>10}  {t['statements']} statements")
        if v.dump_dir:
            lines.append(f"IR dumps: {v.dump_dir}")
        if len(self._variants) > 1:
            lines.append(f"{len(self._variants)} variants compiled (cm.guards() lists what each assumed):")
            lines.extend(f"  {r}" for r in self._recompiles)
        for why, count in self._eager_calls.items():
            lines.append(f"{count} call(s) ran in eager PyTorch: {why}")
        text = "\n".join(lines)
        if print_it:
            print(text)
        return Explanation(v.lowering.share, {k: tuple(x) for k, x in v.lowering.fallbacks.items()}, text, v.timings)

    def _triton_runner(self, v: Variant):
        from .triton_backend import triton_backend

        return v.run if hasattr(v.run, "steps") else triton_backend(v.ir)

    def _call_variant(self, args, kwargs) -> tuple[Variant, dict]:
        """The variant for a call (compiling it if needed) and its IR inputs, ignoring autograd."""
        kwargs = dict(sorted(kwargs.items()))
        flat, structure = flatten_call(args, kwargs)
        with torch.no_grad():
            v = self._select(args, kwargs, flat, structure)
        inputs = dict(v.bindings)
        for leaf, name in zip(flat, v.user_inputs):
            if name is not None:
                inputs[name] = leaf
        return v, inputs

    def report(self, *args, eager: bool = True, **kwargs):
        """Run once (on the example inputs unless given) with every kernel's memory traffic measured
        under Triton's interpreter; FLOPs from the IR; an H100 roofline model. Written to the dump folder."""
        from ..ir.evaluator import bind_sizes
        from .report import build_report, eager_bytes

        if not args and not kwargs:
            args, kwargs = self._example
        v, inputs = self._call_variant(args, kwargs)
        if v.ir is None:
            raise RuntimeError(f"einfuse: no report: the model runs in eager PyTorch ({v.fallback})")
        runner = self._triton_runner(v)
        runner.measure, runner.stats = True, {}
        try:
            with torch.no_grad():
                runner(inputs)
        finally:
            runner.measure = False
        sizes = {k: int(x) for k, x in bind_sizes(v.ir, inputs).items()}
        rep = build_report(runner, sizes, eager_bytes(self._model[0], args, kwargs) if eager else None)
        if v.dump_dir:
            rep.write(v.dump_dir)
        return rep

    def check_gpu(self, archs=(80, 90), jobs=None):
        """Compile every distinct kernel ahead of time for each CUDA arch (no GPU needed): ok, registers,
        spills, shared memory and tensor-core use per kernel (a kernel launched for every layer, once)."""
        from ..codegen.aot import check_gpu

        if self._last.ir is None:
            raise RuntimeError(f"einfuse: no GPU check: the model runs in eager PyTorch ({self._last.fallback})")
        specs = self._triton_runner(self._last).specs
        distinct = list({(spec.name, spec.source): spec for spec in specs}.values())  # one kernel launched per layer
        return check_gpu(distinct, archs=archs, jobs=jobs)

    def __repr__(self) -> str:
        return f"CompiledModule({type(self._model[0]).__name__}, {len(self._variants)} variant(s))"
