"""Layer groups in the IR: a module cut into contiguous *stages* by the model's layer structure.

torch.export records, for every node, the module path it ran in (`nn_module_stack`: `model.layers.3`);
lowering keeps that as its repeated-block instances (frontend.blocks.Instance: the layer and the statements
it produced). `partition_stages(module, instances, groups)` splits the layers into `groups` contiguous groups
(`layer_groups`: sizes differing by at most one) and the body into one module per group:

* stage 0 also holds what runs before the first layer (the embedding, positions, rotary tables, masks);
  the last stage also holds what runs after the last (final norm, LM head);
* a statement outside every layer between two layers goes with the stage of the next layer statement;
* each stage's inputs are the module inputs it reads (weights, the cache states of its layers) and the
  tensors earlier stages computed that it reads — the hidden state, plus the per-call values stage 0 made
  once (positions, rotary tables, mask); its outputs are what later stages or the module's outputs read.

So stage g is a module from hidden state (+ cache) to hidden state, and running the stages in order, each fed
the outputs of those before, computes the module (`run_stages` with the reference evaluator; the tests check
it against the whole module). `Stages.text()` prints every stage with a header naming its layers, inputs
crossing the boundary and outputs; `Stages.dump(dir)` writes it as `stages.ir` and one `stage_<g>.ir` per
stage. This is what a layered prefill (serve.layered) runs one step at a time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..ir.module import Input, Module
from ..ir.verify import verify
from .base import PassError


def layer_groups(num_layers: int, groups: int) -> list[tuple[int, int]]:
    """`groups` contiguous ranges [lo, hi) covering range(num_layers), sizes differing by at most one (the
    larger ones first)."""
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"einfuse: layer groups must be a positive integer, got {groups!r}")
    if groups > num_layers:
        raise ValueError(f"einfuse: {groups} layer groups for a model of {num_layers} layers; a group holds at "
                         f"least one layer — use at most {num_layers} groups")
    base, extra = divmod(num_layers, groups)
    out, lo = [], 0
    for g in range(groups):
        hi = lo + base + (g < extra)
        out.append((lo, hi))
        lo = hi
    return out


@dataclass
class Stage:
    """One layer group's module; `layers` [lo, hi) index the model's layer list (`path`); `carried`: inputs
    computed by earlier stages (the hidden state and per-call values), `passed`: outputs later stages read."""
    module: Module
    layers: tuple
    path: str
    carried: tuple
    passed: tuple


@dataclass
class Stages:
    stages: list
    source: Module

    def __len__(self) -> int:
        return len(self.stages)

    def text(self) -> str:
        parts = []
        for g, s in enumerate(self.stages):
            lo, hi = s.layers
            parts.append(f"# stage {g} of {len(self.stages)}: layers {lo}..{hi - 1} ({s.path}.{lo} .. "
                         f"{s.path}.{hi - 1}); {len(s.module.body)} ops\n"
                         f"#   from earlier stages: {', '.join(s.carried) or '-'}\n"
                         f"#   to later stages / outputs: {', '.join(s.passed) or '-'}\n{s.module}")
        return "\n".join(parts)

    def dump(self, directory: str) -> list[str]:
        os.makedirs(directory, exist_ok=True)
        paths = [os.path.join(directory, "stages.ir")]
        with open(paths[0], "w") as f:
            f.write(self.text())
        for g, s in enumerate(self.stages):
            paths.append(os.path.join(directory, f"stage_{g}.ir"))
            with open(paths[-1], "w") as f:
                f.write(str(s.module))
        return paths


def partition_stages(m: Module, instances: list, groups: int) -> Stages:
    """Cut `m` into `groups` stages by its layers (see the module docstring). `instances`: lowering's
    repeated-block instances (`Lowered.instances`), which say which statements each layer produced. Run it
    on the module before fusion (kernel groups are not carried into the stages)."""
    layer_of: dict[str, int] = {}
    paths = set()
    for inst in instances:
        path, index = inst.layer
        paths.add(path)
        for name in inst.statements:
            layer_of[name] = index
    if not layer_of:
        raise PassError("stages", f"{m.name} has no layers (no module-list blocks were recorded by torch.export); "
                                  f"nothing to cut into stages")
    if len(paths) > 1:
        raise PassError("stages", f"{m.name} has layers in several module lists {sorted(paths)}; stages cut one")
    path = next(iter(paths))
    indices = sorted(set(layer_of.values()))
    if indices != list(range(indices[0], indices[-1] + 1)):
        raise PassError("stages", f"{m.name}'s layers {indices} are not contiguous")
    # A layer list starts at 0. Lowering records a layer only once it is a template or an instance of one: a
    # first layer that declared module inputs (dynamic sizes) is lowered plainly and not recorded. Such layers
    # run before every recorded one, so they fall in with the prologue — right as long as they are in group 0.
    bounds = layer_groups(indices[-1] + 1, groups)
    first = 0
    if indices[0] > bounds[0][1]:
        raise PassError("stages", f"{m.name}: layers 0..{indices[0] - 1} were not recorded by lowering and "
                                  f"span more than the first of {groups} groups; use fewer groups")
    group_of_layer = {i: g for g, (lo, hi) in enumerate(bounds) for i in range(lo, hi)}

    # each op's stage: its layer's group; an op outside the layers joins the next layer op's stage
    stage = [None] * len(m.body)
    nxt = len(bounds) - 1
    for n in range(len(m.body) - 1, -1, -1):
        layers = {layer_of[o] for o in m.body[n].outputs if o in layer_of}
        if layers:
            nxt = group_of_layer[min(layers)]
        stage[n] = nxt
    for n in range(1, len(stage)):  # contiguous: a later op never belongs to an earlier stage
        if stage[n] < stage[n - 1]:
            raise PassError("stages", f"{m.name}: op {n} ({', '.join(m.body[n].outputs)}) of stage {stage[n]} "
                                      f"comes after stage {stage[n - 1]}'s ops; the layers are interleaved")

    types = m.types()
    made_in = {o: stage[n] for n, op in enumerate(m.body) for o in op.outputs}
    read_in: dict[str, set] = {}
    for n, op in enumerate(m.body):
        for r in op.reads():
            read_in.setdefault(r, set()).add(stage[n])
    out = []
    for g, (lo, hi) in enumerate(bounds):
        body = [op for n, op in enumerate(m.body) if stage[n] == g]
        reads = set().union(*(op.reads() for op in body)) if body else set()
        own = {o for op in body for o in op.outputs}
        carried = tuple(sorted(r for r in reads if r in made_in and made_in[r] < g))
        ins = [i for i in m.inputs if i.name in reads] + [Input(r, types[r], "in") for r in carried]
        passed = tuple(o for op in body for o in op.outputs
                       if any(s > g for s in read_in.get(o, ())) or o in m.outputs)
        if not own:
            raise PassError("stages", f"{m.name}: stage {g} (layers {first + lo}..{first + hi - 1}) is empty")
        sm = Module(f"{m.name}_stage{g}", tuple(ins), tuple(body), passed, m.sizes, m.size_hints)
        verify(sm)
        out.append(Stage(sm, (first + lo, first + hi), path, carried, passed))
    return Stages(out, m)


def run_stages(stages: Stages, inputs: dict, evaluate) -> dict:
    """Run the stages in order with `evaluate(module, inputs) -> outputs` (e.g. ir.evaluator.evaluate), each
    fed the module inputs and what earlier stages passed on; the source module's outputs."""
    env = dict(inputs)
    for s in stages.stages:
        env.update(evaluate(s.module, {i.name: env[i.name] for i in s.module.inputs}))
    return {o: env[o] for o in stages.source.outputs}
