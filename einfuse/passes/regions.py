"""Pipelines over regions: a model's repeated layers are optimized once and instantiated per layer.

Lowering found the blocks of identical structure (frontend.blocks) and which tensors each block's
statements correspond to in the first block. Here the module is cut into regions: one *template* module
per structure (the first block's statements; its inputs are what they read from outside, its outputs
what is read outside the block in any instance) and one *outer* module (everything else: embedding, RoPE
tables, masks, the final norm and head). The pipeline runs on each region; the whole module is the outer
region's statements and every block's instance — the template's result, renamed — in dependency order.

Fusion on the whole module would have inlined cheap maps the layers share (a causal mask's index
condition) into every layer; such maps are copied into the template first, so it still does. When the
pieces do not fit back together (an output renamed onto another), `stitch` returns None and the caller
runs the pipeline on the whole module instead.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field

from ..ir.contraction import is_map
from ..ir.module import Input, Kernel, Module, Statement
from ..ir.printer import fmt_input, fmt_kernel, fmt_op, header_lines
from .base import Instrument, run_pipeline
from .fusion import transcendental_table
from .instruments import NumericCheck, Verify, dump_header, module_notes


@dataclass
class Region:
    """A module of its own. A template region has `instances`: for each block of its structure, the
    names its lowered statements had (template name -> block's name) and the block's first body position."""

    module: Module
    instances: list | None = None
    internal: frozenset = frozenset()  # the template's statements as lowered (the others were copied in or made)


@dataclass
class Partition:
    lowered: Module
    regions: list  # the outer region (if any) first
    positions: dict = field(default_factory=dict)  # lowered op output name -> body position
    _last: tuple | None = field(default=None, repr=False)  # (ids, modules, plan) of the last _plan call
    _memo: dict = field(default_factory=dict, repr=False)  # per region module and per-instance liveness: _Template
    _names: dict = field(default_factory=dict, repr=False)  # (region, instance, template name) -> derived name

    def stitch(self, finals: list[Module]) -> Module | None:
        """The whole module from each region's module after the pipeline (None: cannot be stitched)."""
        plan = self._plan(finals)
        if plan is None:
            return None
        pieces, skeleton = plan
        body, kernels = [], []
        for ops, ks, rename in pieces:
            body += [op.renamed(rename) for op in ops] if rename else ops
            kernels += [_rename_kernel(k, rename) for k in ks]
        return skeleton.replace(body=tuple(body), kernels=tuple(kernels))

    def stitch_text(self, modules: list[Module], cache: dict) -> str:
        """The whole module's text (for per-pass dumps) without building it: each piece's lines are printed
        once with their tensor names as format slots (cached per piece) and filled in per instance."""
        plan = self._plan(modules)
        if plan is None:
            return ""
        pieces, skeleton = plan
        lines, kernel_lines = header_lines(skeleton.replace(inputs=())), []
        for i in skeleton.inputs:  # hundreds of weights: each input's line printed once
            key = ("input", i.name, i.kind, id(i.type))
            hit = cache.get(key)
            if hit is None:
                hit = cache[key] = (i, f"  {fmt_input(i)}")
            lines.append(hit[1])
        for ops, ks, rename in pieces:
            key = (*map(id, ops), None, *map(id, ks))  # the cache holds what it keys, so no id is reused
            hit = cache.get(key)
            if hit is None:
                hit = cache[key] = (ops, ks, _Text(ops, ks, cache))
            text = hit[2]
            if ops:
                lines.append(text.body(rename))
            if ks:
                kernel_lines.append(text.kernels(rename))
        return "\n".join(lines + kernel_lines + [f"  out {', '.join(skeleton.outputs)}"]) + "\n"

    def _plan(self, finals: list[Module]):
        """(pieces in body order as (ops, kernels, rename or None), the module without its body: inputs,
        sizes and outputs, with what the passes added — a state, a block table — per instance), or None.
        Kept for the last list of modules asked about (stitching, then the final text, reuse it)."""
        key = tuple(map(id, finals))
        if self._last is not None and self._last[0] == key:
            return self._last[2]
        plan = self._make_plan(finals)
        self._last = (key, list(finals), plan)
        return plan

    def _template(self, final: Module) -> "_Template":
        hit = self._memo.get(id(final))
        if hit is None or hit[0] is not final:
            hit = self._memo[id(final)] = (final, _Template(final))
        return hit[1]

    def _make_plan(self, finals: list[Module]):
        entries = []  # (position, ops, kernels, rename, template or None): what must stay together, and its names
        used = set(self.positions)  # every lowered name: a name made for an instance must be new
        outputs = dict(zip(self.lowered.outputs, self.lowered.outputs))
        inputs: dict = {}  # whole-module input name -> Input, as the regions' pipelines left them
        extra_outputs: list = []
        for r, (region, final) in enumerate(zip(self.regions, finals)):
            out_map = dict(zip(region.module.outputs, final.outputs))
            if len(set(final.outputs)) < len(final.outputs):
                return None
            added = final.outputs[len(region.module.outputs):]  # outputs a pass added (a state's new version)
            if region.instances is None:  # the outer region keeps its names; its kernel groups stay whole
                inputs.update({i.name: i for i in final.inputs})
                extra_outputs += added
                outputs.update({o: out_map[o] for o in outputs if o in out_map})
                grouped = final.group_of()
                last = 0
                for op in final.body:
                    last = self.positions.get(op.outputs[0], last)
                    k = grouped.get(op.outputs[0])
                    if k is None:
                        entries.append((last, (op,), (), None, None))
                    elif op.outputs[0] == k.members[0]:
                        members = set(k.members)
                        entries.append((last, tuple(o for o in final.body if o.outputs[0] in members), (k,), None,
                                        None))
                    used.update(op.outputs)
                continue
            known = {i.name for i in region.module.inputs}
            template = self._template(final)
            for n, (names, first) in enumerate(region.instances):
                rename = self._instance_names(r, final, template, names, region.internal, out_map, n, used)
                if rename is None:
                    return None
                for i in final.inputs:  # an input a pass added is the instance's own if named after its statements
                    if i.name not in known and i.name not in rename:
                        rename[i.name] = _derived(i.name, names, region.internal, n, used, shared=True)
                    inputs.setdefault(rename.get(i.name, i.name), Input(rename.get(i.name, i.name), i.type, i.kind))
                extra_outputs += [rename.get(o, o) for o in added]
                entries.append((first, final.body, final.kernels, rename, template))
        defined = {}
        for n, (_, ops, _, rename, template) in enumerate(entries):
            for o in template.defined if template else [o for op in ops for o in op.outputs]:
                defined[rename.get(o, o) if rename else o] = n
        deps = []
        for n, (_, ops, _, rename, template) in enumerate(entries):
            reads = template.external if template else {r for op in ops for r in op.reads()}
            reads = {rename.get(r, r) for r in reads} if rename else reads
            deps.append({defined[r] for r in reads if r in defined} - {n})
        done, ordered = set(), []
        while len(done) < len(entries):  # a topological order, earliest lowered position first
            ready = [n for n in range(len(entries)) if n not in done and deps[n] <= done]
            if not ready:
                return None
            n = min(ready, key=lambda i: (entries[i][0], i))
            done.add(n)
            ordered.append(entries[n][1:])
        pieces = _live(ordered, set(outputs.values()) | set(extra_outputs))
        order = [i.name for i in self.lowered.inputs] + [n for n in inputs if n not in self.positions]
        module_inputs = tuple(inputs[n] for n in dict.fromkeys(order) if n in inputs)
        sizes = tuple(dict.fromkeys(x for f in finals for x in f.sizes))
        hints = tuple(dict.fromkeys((x, v) for f in finals for x, v in f.size_hints))
        skeleton = self.lowered.replace(inputs=module_inputs, sizes=sizes, size_hints=hints, body=(), kernels=(),
                                        outputs=tuple(outputs[o] for o in self.lowered.outputs) + tuple(extra_outputs))
        return pieces, skeleton

    def _instance_names(self, r: int, final: Module, template: "_Template", names: dict, internal: frozenset,
                        out_map: dict, n: int, used: set) -> dict | None:
        """Template name -> whole-module name for instance `n`: statements the lowered template had keep this
        block's names; statements passes made (attention's running max, ...) or copied in, and kernel groups,
        are named after the statement whose name they extend; an output a pass renamed keeps the name its
        readers use. Tensors the template reads from outside map to this block's. A derived name is kept from
        one plan to the next (the same tensor has the same name in every dump) unless it is taken."""
        out = {k: v for k, v in names.items() if k in internal or k not in template.inside}
        for before, after in out_map.items():
            if after != before:
                if after in names and names[after] != names[before]:
                    return None
                out[after] = names[before]

        def derive(name: str) -> str:
            key = (r, n, name)
            new = self._names.get(key)
            if new is None or new in used:
                new = self._names[key] = _derived(name, names, internal, n, used)
            used.add(new)
            return new

        for o in template.defined:
            if o not in out:
                out[o] = derive(o)
            used.add(out[o])
        for k in final.kernels:
            prefix = k.name[:len(k.name) - len(k.members[-1])] if k.name.endswith(k.members[-1]) else ""
            out[k.name] = prefix + out[k.members[-1]] if prefix else derive(k.name)
        return out


class _Template:
    """What a template region's module after a pass says the same for every instance: the names its
    statements define, what they read from outside, and per set of needed outputs which statements live."""

    def __init__(self, final: Module):
        self.defined = [o for op in final.body for o in op.outputs]
        self.inside = frozenset(self.defined)
        self.external = {r for op in final.body for r in op.reads()} - self.inside
        self.members = {n for k in final.kernels for n in k.members}
        self.body = final.body
        self.live: dict = {}  # needed template names -> (kept statements, their reads from outside)

    def prune(self, needed: frozenset) -> tuple:
        hit = self.live.get(needed)
        if hit is None:
            want, keep = set(needed) | self.members, []
            for op in reversed(self.body):
                if any(o in want for o in op.outputs):
                    keep.append(op)
                    want.update(op.reads())
            kept = tuple(keep[::-1])
            inside = {o for op in kept for o in op.outputs}
            hit = self.live[needed] = (kept, {r for op in kept for r in op.reads()} - inside)
        return hit


def _live(order: list, outputs: set) -> list:
    """The pieces without the statements nothing reads: a region's output that only another region's
    pre-pass form read (a mask a serving pass replaced) is dead once they are stitched. Kernel members stay.
    An instance's live statements depend only on which of its names are needed (cached per template)."""
    needed = set(outputs) | {n for ops, ks, rename, template in order if template is None for k in ks
                             for n in k.members}
    pieces = []
    for ops, ks, rename, template in reversed(order):
        if template is not None:
            kept, reads = template.prune(frozenset(o for o in template.defined if rename.get(o, o) in needed))
            needed.update(rename.get(r, r) for r in reads)
            pieces.append((kept, ks, rename))
            continue
        kept = tuple(op for op in ops if ks or any(o in needed for o in op.outputs))
        if kept:
            needed.update(r for op in kept for r in op.reads())
            pieces.append((kept, ks, None))
    return pieces[::-1]


class _Text:
    """A piece's printed lines with every tensor name a format slot: filled in per instance by one
    `str.format` call (a dump prints each layer's statements after every pass). Each statement is printed
    once per dump (`cache`): a pass that changes one statement of a layer reprints that one."""

    def __init__(self, ops: tuple, kernels: tuple, cache: dict):
        self.slots: dict = {}
        self._body = "\n".join(self._template(self._line(op, fmt_op, cache)) for op in ops)
        self._kernels = "\n".join(self._template(self._line(k, fmt_kernel, cache)) for k in kernels)
        self.names = list(self.slots)

    @staticmethod
    def _line(unit, fmt, cache: dict) -> list:
        """`unit`'s line split at its tensor names (odd positions)."""
        hit = cache.get(("line", id(unit)))
        if hit is None:
            hit = cache[("line", id(unit))] = (unit, fmt(unit, lambda n: f"\0{n}\0").split("\0"))
        return hit[1]

    def _template(self, parts: list) -> str:
        out = ["  "]
        for i, p in enumerate(parts):
            out.append("{%d}" % self.slots.setdefault(p, len(self.slots)) if i % 2 else
                       p.replace("{", "{{").replace("}", "}}"))
        return "".join(out)

    def body(self, rename: dict | None) -> str:
        return self._body.format(*self._names(rename))

    def kernels(self, rename: dict | None) -> str:
        return self._kernels.format(*self._names(rename))

    def _names(self, rename: dict | None) -> list:
        return [rename.get(n, n) for n in self.names] if rename else self.names


def _rename_kernel(k: Kernel, rename: dict | None) -> Kernel:
    if not rename:
        return k
    return Kernel(rename.get(k.name, k.name), k.kind, tuple(rename.get(n, n) for n in k.members), k.attrs, k.roles)


def _derived(name: str, names: dict, internal: frozenset, n: int, used: set, shared: bool = False) -> str:
    """An instance's name for a template name a pass made: the instance's name of the template statement
    it extends (`sdpa_lm` -> `sdpa_3_lm`); without one, `name_n` — or `name` itself when `shared` (an input
    every instance reads alike, a block table)."""
    base = next((b for b in _longest_first(internal) if name.startswith(b) and b in names), None)
    if base is None and shared:
        return name
    new = names[base] + name[len(base):] if base is not None else f"{name}_{n}"
    while new in used:
        new += f"_{n}"
    used.add(new)
    return new


@functools.lru_cache(maxsize=64)
def _longest_first(internal: frozenset) -> tuple:
    """A template's statement names, longest first (the first one a name starts with is the one it extends)."""
    return tuple(sorted(internal, key=len, reverse=True))


def partition(m: Module, instances: list, inlinable=None) -> Partition | None:
    """Regions of `m` from lowering's block instances (frontend.blocks.Instance), or None when no structure
    repeats. `inlinable(statement)` says whether a map of the outer region that every instance reads the
    same may be copied into the template (default: any map)."""
    by_template: dict = {}
    for inst in instances:
        by_template.setdefault(inst.template, []).append(inst)
    by_template = {t: insts for t, insts in by_template.items() if len(insts) > 1}
    if not by_template:
        return None
    prod, users, types = m.producers(), m.users(), m.types()
    positions = {o: n for n, op in enumerate(m.body) for o in op.outputs}
    module_inputs = {i.name: i for i in m.inputs}
    block_of = {name: (t, k) for t, insts in by_template.items() for k, inst in enumerate(insts)
                for name in inst.statements}
    inlinable = inlinable or (lambda s: True)
    regions, outer_read = [], set()
    for t, insts in by_template.items():
        template = insts[0]
        inside = set(template.statements)
        ops = list({id(op): op for op in (prod[n] for n in template.statements)}.values())
        escapes: set = set()
        for inst in insts:
            back = {v: k for k, v in inst.names.items() if k in inside}
            for name in inst.statements:
                if name in m.outputs or any(block_of.get(u.outputs[0]) != block_of[name] for u in users.get(name, [])):
                    escapes.add(back[name])
        imported = _shared_maps(ops, inside, insts, prod, block_of, inlinable)
        local = inside | {s.name for s in imported}
        body = sorted(imported, key=lambda s: positions[s.name]) + ops
        reads = list(dict.fromkeys(r for op in body for r in sorted(op.reads()) if r not in local))
        outputs = tuple(n for n in dict.fromkeys(template.statements) if n in escapes)
        if not outputs:
            return None
        inputs = [Input(r, types[r], module_inputs[r].kind if r in module_inputs else "in") for r in reads]
        outer_read |= {inst.names.get(r, r) for inst in insts for r in reads}
        module = Module(f"{m.name}_{_path(template.layer)}", tuple(inputs), tuple(body), outputs, m.sizes,
                        m.size_hints)
        regions.append(Region(module, [(inst.names, positions[inst.statements[0]]) for inst in insts],
                              frozenset(inside)))
    outer_ops = [op for op in m.body if op.outputs[0] not in block_of]
    if outer_ops:
        defined = {o for op in outer_ops for o in op.outputs}
        reads = list(dict.fromkeys(r for op in outer_ops for r in sorted(op.reads()) if r not in defined))
        inputs = [module_inputs[r] if r in module_inputs else Input(r, types[r], "in") for r in reads]
        outputs = tuple(o for o in sorted(defined, key=positions.__getitem__) if o in m.outputs or o in outer_read)
        if outputs:
            regions.insert(0, Region(Module(m.name, tuple(inputs), tuple(outer_ops), outputs, m.sizes,
                                            m.size_hints)))
    return Partition(m, regions, positions)


def _shared_maps(ops: list, inside: set, insts: list, prod: dict, block_of: dict, inlinable) -> list:
    """Maps of the outer region the template reads (directly or through other such maps) that every
    instance reads under the same name: the layers share them, so each may compute them itself."""
    out, seen = [], set()
    frontier = [r for op in ops for r in op.reads() if r not in inside]
    while frontier:
        r = frontier.pop()
        if r in seen or r in block_of:
            continue
        seen.add(r)
        src = prod.get(r)
        if (isinstance(src, Statement) and is_map(src) and inlinable(src)
                and all(inst.names.get(r, r) == r for inst in insts)):
            out.append(src)
            frontier += list(src.reads())
    return out


def _path(layer: tuple) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in layer[0]).strip("_") or "block"


# ---------------------------------------------------------------- running a pipeline over the regions

class _Snapshots(Instrument):
    """Keeps the module after every pass (references, no copies) and each pass's time."""

    def __init__(self):
        self.modules: list = []
        self.ms: list = []

    def start(self, module):
        self.modules.append(module)

    def after(self, p, before, after, ms, index):
        self.modules.append(after)
        self.ms.append(ms)


def run_regional(m: Module, instances: list, passes: list, dump_dir: str | None = None, like: dict | None = None,
                 check: bool = False, first_ms: float | None = None, inlinable=None):
    """The pipeline over `m`'s regions, stitched: (module, timings), or None when `m` has no repeated
    blocks (or they do not stitch back). Dumps and timings describe the whole module after each pass."""
    part = partition(m, instances, inlinable or (lambda s: not transcendental_table(s)))
    if part is None:
        return None
    snaps, checks = [], []
    for region in part.regions:
        snap = _Snapshots()
        instruments = [Verify(), snap]
        if check:
            checks.append(NumericCheck(like))
            instruments.append(checks[-1])
        run_pipeline(region.module, passes, instruments)
        snaps.append(snap)
    final = part.stitch([s.modules[-1] for s in snaps])
    if final is None:
        return None
    cache: dict = {}
    final.with_text(part.stitch_text([s.modules[-1] for s in snaps], cache))
    timings = [{"index": 0, "pass": "lower", "ms": first_ms, "statements": len(m.body),
                "regions": len(part.regions)}]
    for n, p in enumerate(passes, 1):
        record = {"index": n, "pass": p.pass_name, "ms": round(sum(s.ms[n - 1] for s in snaps), 3)}
        if check:
            record["max_rel_error"] = max(c.errors[n - 1]["max_rel_error"] for c in checks)
        timings.append(record)
    if dump_dir:
        _dump(part, snaps, passes, timings, dump_dir, cache)
    for n, t in enumerate(timings[1:], 1):
        t["statements"] = sum(len(s.modules[n].body) * len(r.instances or [None])
                              for s, r in zip(snaps, part.regions))
    return final, timings


def _dump(part: Partition, snaps: list, passes: list, timings: list, directory: str, cache: dict) -> None:
    """`NN_<pass>.ir` of the whole module after every pass, as the Dump instrument writes them; each
    region's notes once in the header (a layer's apply to every instance)."""
    os.makedirs(directory, exist_ok=True)
    for f in os.listdir(directory):
        if f.endswith(".ir") and f[:2].isdigit():
            os.remove(os.path.join(directory, f))
    labels = ["lower"] + [p.pass_name for p in passes]
    previous, text, region_notes = [None] * len(snaps), "", {}
    for n, label in enumerate(labels):
        modules = [s.modules[n] for s in snaps]
        if any(a is not b for a, b in zip(modules, previous)):  # a pass that changed nothing: the same text
            text = part.stitch_text(modules, cache)
        previous = modules
        body = sum(len(mod.body) * len(r.instances or [None]) for mod, r in zip(modules, part.regions))
        notes = []
        for mod, region in zip(modules, part.regions):
            hit = region_notes.get(id(mod))
            if hit is None or hit[0] is not mod:  # each region module's notes once
                hit = region_notes[id(mod)] = (mod, module_notes(mod))
            lines = hit[1]
            if region.instances is not None and lines:
                notes.append(f"layer block {mod.name}, {len(region.instances)} instances, each:")
            notes += lines
        what = f"pass {label!r}" if n else label
        header = dump_header(what, timings[n]["ms"], body, notes)
        with open(os.path.join(directory, f"{n:02d}_{label}.ir"), "w") as f:
            f.write(header + text)
    with open(os.path.join(directory, "timings.json"), "w") as f:
        json.dump(timings, f, indent=1)
