"""Repeated blocks of a captured graph: the layers of a model (`model.layers.0`, `model.layers.1`, ...).

torch.export records, for every node, the stack of modules it ran in. A *block* is a contiguous run of
nodes inside one element of a module list; two blocks with the same structure (the same ops on the
same shapes, reading outside values of the same shapes in the same places) compute the same function of
their outside values. einfuse lowers, optimizes and generates code for one of them and instantiates
the rest, so compile time grows with the distinct work in a model, not with its depth.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

_INDEXED = re.compile(r"^(.*?)(?:\.(\d+)|\[(\d+)\])$")  # `model.layers.3` (export), `...layers[3]` (dynamo)


def layer_of(node: fx.Node) -> tuple | None:
    """(module list path, index) of the outermost module-list element `node` ran in, or None."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for path, _ in stack.values():
        m = _INDEXED.match(str(path))
        if m:
            return m.group(1), int(m.group(2) or m.group(3))
    return None


@dataclass
class Block:
    """A contiguous run of nodes in one module-list element; `externals` are the values it reads from
    outside, in order of first use; blocks with equal `signature` compute the same function."""

    layer: tuple  # (module list path, index)
    nodes: list
    externals: list = field(default_factory=list)
    signature: tuple = ()


def _val_key(v):
    if isinstance(v, torch.Tensor):
        return ("t", tuple(str(s) for s in v.shape), str(v.dtype))
    if isinstance(v, (list, tuple)):
        return tuple(_val_key(x) for x in v)
    if isinstance(v, torch.SymInt):
        return ("s", str(v))
    return ("v", type(v).__name__, repr(v) if isinstance(v, (int, float, bool, str, type(None))) else "")


def _structure(block: Block) -> tuple:
    where = {n: i for i, n in enumerate(block.nodes)}
    ext: dict = {}

    def arg(a):
        if isinstance(a, fx.Node):
            if a in where:
                return ("l", where[a])
            if a not in ext:
                ext[a] = len(ext)
            return ("e", ext[a])
        if isinstance(a, (list, tuple)):
            return (type(a).__name__,) + tuple(arg(x) for x in a)
        if isinstance(a, dict):
            return ("d",) + tuple((k, arg(v)) for k, v in a.items())
        if isinstance(a, torch.SymInt):
            return ("s", str(a))
        return ("v", repr(a))

    nodes = tuple((str(n.target), arg(n.args), arg(n.kwargs), _val_key(n.meta.get("val"))) for n in block.nodes)
    block.externals = list(ext)
    return nodes + tuple(("ext", _val_key(e.meta.get("val"))) for e in block.externals)


def find_blocks(gm: fx.GraphModule) -> list[Block]:
    """The graph's layer blocks, in graph order (only call_function nodes belong to blocks)."""
    blocks: list[Block] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        layer = layer_of(node)
        if layer is None:
            continue
        if blocks and blocks[-1].layer == layer and blocks[-1].nodes[-1].next is node:
            blocks[-1].nodes.append(node)
        else:
            blocks.append(Block(layer, [node]))
    for b in blocks:
        b.signature = _structure(b)
    return blocks


def repeated(blocks: list[Block]) -> list[Block]:
    """The blocks whose structure occurs more than once (what instantiation saves work on)."""
    count: dict = {}
    for b in blocks:
        count[b.signature] = count.get(b.signature, 0) + 1
    return [b for b in blocks if count[b.signature] > 1]


# ---------------------------------------------------------------- instantiation during lowering

@dataclass
class Instance:
    """One block's statements in the lowered module and how they correspond to its template's:
    `names` maps every tensor the template's statements define or read to this block's tensor."""

    template: int  # index of the template (the first lowered block of this structure)
    layer: tuple
    statements: list  # this block's statement/opaque output names, in body order
    names: dict


@dataclass
class _Record:
    block: Block
    start: int  # body position of the block's first op
    inputs: int  # module inputs declared before it (a block that declares inputs is not a template)
    ext_values: list
    report: tuple
    origin: list = field(default_factory=list)  # per body op of the block: index of the node that emitted it
    end: int = -1
    values: dict = field(default_factory=dict)  # node index -> its value after lowering
    report_after: tuple = ()


def _report_state(report) -> tuple:
    return report.total, report.lowered, {k: tuple(v) for k, v in report.fallbacks.items()}


def _match(a, b, names: dict) -> bool:
    """Are two lowered values equal up to tensor names (extending `names`: a's tensor -> b's)?"""
    from .lower import Tmpl

    if isinstance(a, Tmpl) and isinstance(b, Tmpl):
        return a.shape == b.shape and a.dtype == b.dtype and _match_expr(a.expr, b.expr, names)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_match(x, y, names) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _match_expr(a, b, names: dict) -> bool:
    from ..ir.expr import Access, Call

    if type(a) is not type(b):
        return False
    if isinstance(a, Access):
        if names.setdefault(a.tensor, b.tensor) != b.tensor or len(a.indices) != len(b.indices):
            return False
        return all(_match_expr(x, y, names) if hasattr(x, "children") else x == y for x, y in zip(a.indices, b.indices))
    if isinstance(a, Call):
        return (a.op == b.op and a.attr == b.attr and len(a.args) == len(b.args)
                and all(_match_expr(x, y, names) for x, y in zip(a.args, b.args)))
    return a == b


def _renamed_value(v, names: dict):
    from ..ir.expr import rename_tensors
    from .lower import Tmpl

    if isinstance(v, Tmpl):
        return Tmpl(rename_tensors(v.expr, names), v.shape, v.dtype)
    if isinstance(v, list):
        return [_renamed_value(x, names) for x in v]
    return v


class Instantiator:
    """Used by the Lowerer: lowers the first block of each structure normally (recording what it emitted)
    and every later one by renaming the recorded statements — when the values it reads from outside
    match the first block's up to tensor names; otherwise that block is lowered normally too."""

    def __init__(self, gm: fx.GraphModule):
        blocks = repeated(find_blocks(gm))
        self.start = {b.nodes[0]: b for b in blocks}
        self.position = {n: i for b in blocks for i, n in enumerate(b.nodes)}
        self.templates: dict = {}  # signature -> _Record
        self.recording: _Record | None = None
        self.instances: list[Instance] = []
        self._ids: dict = {}  # signature -> template index

    def before(self, lw, node: fx.Node) -> bool:
        """Called before lowering `node`; True when its whole block was instantiated (skip its nodes)."""
        b = self.start.get(node)
        if b is None:
            return False
        rec = self.templates.get(b.signature)
        if rec is not None and self._instantiate(lw, rec, b):
            return True
        self.recording = _Record(b, len(lw.body), len(lw.inputs), [lw.values.get(e) for e in b.externals],
                                 _report_state(lw.report))
        return False

    def after(self, lw, node: fx.Node, position: int) -> None:
        """Called after lowering `node` (which emitted body[position:])."""
        rec = self.recording
        if rec is None:
            return
        rec.origin += [self.position[node]] * (len(lw.body) - position)
        if node is rec.block.nodes[-1]:
            self.recording = None
            rec.end = len(lw.body)
            rec.report_after = _report_state(lw.report)
            rec.values = {i: lw.values[n] for i, n in enumerate(rec.block.nodes) if n in lw.values}
            names = [o for op in lw.body[rec.start:rec.end] for o in op.outputs]
            if len(lw.inputs) == rec.inputs and rec.block.signature not in self.templates:
                self.templates[rec.block.signature] = rec
                self._ids[rec.block.signature] = len(self._ids)
            tid = self._ids.get(rec.block.signature)
            if tid is not None and self.templates[rec.block.signature] is rec:
                self.instances.append(Instance(tid, rec.block.layer, names, {n: n for n in names}))

    def _instantiate(self, lw, rec: _Record, b: Block) -> bool:
        names: dict = {}
        if not all(_match(t, lw.values.get(e), names) for t, e in zip(rec.ext_values, b.externals)):
            return False
        template_ops = lw.body[rec.start:rec.end]
        for op, origin in zip(template_ops, rec.origin):
            tn, bn = rec.block.nodes[origin].name, b.nodes[origin].name
            for o in op.outputs:
                names[o] = lw.fresh(bn + o[len(tn):] if o.startswith(tn) else f"{o}_{b.layer[1]}")
        new_ops = [op.renamed(names) for op in template_ops]
        for op in new_ops:
            lw.body.append(op)
            for o, t in (op.outputs_typed if hasattr(op, "outputs_typed") else [(op.name, op.type)]):
                lw.note_type(o, t)
        inside = set(b.nodes)
        for i, n in enumerate(b.nodes):  # only what nodes after the block read: its own nodes are skipped
            if i in rec.values and any(u not in inside for u in n.users):
                lw.values[n] = _renamed_value(rec.values[i], names)
        self._replay_report(lw, rec)
        outs = [o for op in new_ops for o in op.outputs]
        self.instances.append(Instance(self._ids[b.signature], b.layer, outs, names))
        return True

    @staticmethod
    def _replay_report(lw, rec: _Record) -> None:
        """What lowering the template reported (nodes lowered, fallbacks) counts again for this block."""
        before_total, before_lowered, before_fb = rec.report
        after_total, after_lowered, after_fb = rec.report_after
        lw.report.total += after_total - before_total
        lw.report.lowered += after_lowered - before_lowered
        for target, (count, why) in after_fb.items():
            extra = count - before_fb.get(target, (0, ""))[0]
            if extra:
                lw.report.fallbacks[target][0] += extra
                lw.report.fallbacks[target][1] = lw.report.fallbacks[target][1] or why
