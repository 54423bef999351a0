"""Mixture-of-experts layers in a captured graph: transformers' experts modules, lowered as Einsums.

transformers (>= 5) runs a model's experts through `use_experts_implementation`: one module holds every
expert's weights stacked (`gate_up_proj[E, 2I, H]`, `down_proj[E, H, I]`) and its forward takes the
tokens' states and their top-k routing (`hidden_states[T, H]`, `top_k_index[T, K]`,
`top_k_weights[T, K]`). Under torch.export that forward is sort, histc, cumsum, two grouped matmuls
(`transformers.grouped_mm_fallback`) and an inverse permutation by `index_put` — calls einfuse cannot
lower, and a form no pass can read the expert-weight traffic from. The function the module computes is
fixed by its class, though, so the lowering recognizes the module (by the module stack torch.export
records per node) and emits what it computes instead, in the form the MoE kernel kind runs
(see einfuse.kinds.moe):

    gw[t, e]      = sum[k] where(ids[t, k] == e, w[t, k], 0)
    up[t, e, n]   = sum[h] where(gw[t, e] != 0, x[t, h] * gate_up[e, n, h], 0)
    act[t, e, i]  = silu(up[t, e, i]) * up[t, e, i + I]
    down[t, e, h] = sum[i] act[t, e, i] * down_proj[e, h, i]
    out[t, h]     = sum[e] gw[t, e] * down[t, e, h]

A module is recognized only when its class is decorated by `use_experts_implementation` with the plain
layout (a gate, concatenated gate/up halves, not transposed, no bias, no post-expert norm), applies the
default gate (`act_fn(gate) * up`) with a SiLU activation, and reads exactly the states, the routing
and the two weights. Any other experts module lowers op by op, and `explain()` says why.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..ir import dtypes as dt
from ..ir.expr import Call, Const, IndexValue

SILU_MODULES = {"transformers.activations.SiLUActivation", "torch.nn.modules.activation.SiLU"}
_PLAIN_LAYOUT = dict(has_gate=True, has_bias=False, has_post_expert_norm=False, is_concatenated=True,
                     is_transposed=False)


@dataclass
class ExpertsCall:
    """One experts module's nodes in the graph and the values it reads."""

    path: str  # the module's path (`model.layers.0.mlp.experts`)
    cls: str  # its class, fully qualified
    nodes: list = field(default_factory=list)
    output: fx.Node | None = None
    x: fx.Node | None = None  # [T, H] token states
    ids: fx.Node | None = None  # [T, K] expert ids
    w: fx.Node | None = None  # [T, K] routing weights
    gate_up: fx.Node | None = None  # [E, 2I, H]
    down: fx.Node | None = None  # [E, H, I]


def _experts_class(qualname: str):
    """The class named `qualname` when it is a transformers experts module (None otherwise)."""
    if "Experts" not in qualname.rsplit(".", 1)[-1] or "." not in qualname:
        return None
    mod, _, name = qualname.rpartition(".")
    try:
        cls = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError):
        return None
    return cls if hasattr(cls, "_apply_gate") else None


def _layout_problem(cls) -> str | None:
    """Why the class's experts are not the plain SwiGLU layout the MoE kind runs (None if they are)."""
    try:
        from transformers.integrations import moe as tf_moe
    except ImportError:
        return "transformers' experts integration is not importable"
    if cls._apply_gate is not getattr(tf_moe, "_default_apply_gate", None):
        return f"{cls.__name__} applies its own gate ({cls._apply_gate.__qualname__})"
    try:
        layout = inspect.getclosurevars(cls.__init__).nonlocals
    except (TypeError, ValueError):
        return f"{cls.__name__}'s experts layout cannot be read"
    for key, want in _PLAIN_LAYOUT.items():
        if layout.get(key, want) != want:
            return f"{cls.__name__} has {key}={layout.get(key)} (the MoE kind runs {key}={want})"
    return None


def _stack(node: fx.Node) -> list:
    return list((node.meta.get("nn_module_stack") or {}).values())


def _is_size(node: fx.Node) -> bool:
    """A node computing a (symbolic) size, not a tensor: torch.export with dynamic shapes computes one
    once and every layer reads it."""
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def find_experts(gm: fx.GraphModule) -> tuple[dict, list]:
    """({node: its ExpertsCall} for every recognized experts module, [note per module not recognized])."""
    calls: dict = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or _is_size(node):
            continue  # a size computation (dynamic shapes) is shared by every layer: it stays in the graph
        for path, qual in _stack(node):
            qual = qual if isinstance(qual, str) else f"{qual.__module__}.{qual.__qualname__}"
            if path in calls or _experts_class(qual) is not None:
                calls.setdefault(path, ExpertsCall(str(path), qual)).nodes.append(node)
                break
    found, notes = {}, []
    for call in calls.values():
        why = _check(gm, call)
        if why:
            notes.append(f"MoE experts {call.path} ({call.cls.rsplit('.', 1)[-1]}) lowered op by op: {why}")
            continue
        for n in call.nodes:
            found[n] = call
    return found, notes


def _check(gm: fx.GraphModule, call: ExpertsCall) -> str | None:
    """Fill `call`'s values; the reason it is not the experts function the MoE kind runs, or None."""
    why = _layout_problem(_experts_class(call.cls))
    if why:
        return why
    inside = set(call.nodes)
    acts = {qual if isinstance(qual, str) else f"{qual.__module__}.{qual.__qualname__}"
            for n in call.nodes for path, qual in _stack(n) if str(path).startswith(call.path + ".")}
    if acts - SILU_MODULES or not acts:
        return f"activation {sorted(acts) or 'none'} (the MoE kind runs SiLU)"
    outs = [n for n in call.nodes if any(u not in inside for u in n.users)]
    if len(outs) != 1:
        return f"{len(outs)} values leave the module (one expected)"
    call.output = outs[0]
    ext = list(dict.fromkeys(a for n in call.nodes for a in n.all_input_nodes if a not in inside and not _is_size(a)))
    vals = {a: a.meta.get("val") for a in ext}
    if not all(isinstance(v, torch.Tensor) for v in vals.values()) or len(ext) != 5:
        return f"reads {len(ext)} values ({', '.join(a.name for a in ext)}); states, ids, weights and two weights expected"
    three = [a for a in ext if vals[a].dim() == 3]
    two = [a for a in ext if vals[a].dim() == 2]
    if len(three) != 2 or len(two) != 3:
        return "reads values of unexpected ranks"
    gu = next((a for a in three if a.name.endswith("gate_up_proj")), None)
    dn = next((a for a in three if a.name.endswith("down_proj")), None)
    if gu is None or dn is None:
        return "its weights are not gate_up_proj and down_proj"
    E, I2, H = vals[gu].shape
    if vals[dn].shape != (E, H, I2 // 2) or I2 % 2:
        return f"weight shapes {tuple(vals[gu].shape)} and {tuple(vals[dn].shape)} do not pair up"
    ints = [a for a in two if not vals[a].is_floating_point()]
    floats = [a for a in two if vals[a].is_floating_point()]
    if len(ints) != 1 or len(floats) != 2:
        return "routing ids/weights not found among its inputs"
    ids = ints[0]
    T, K = vals[ids].shape
    xs = [a for a in floats if vals[a].shape == (T, H)]
    ws = [a for a in floats if vals[a].shape == (T, K) and a not in xs[:1]]
    if len(xs) != 1 or len(ws) != 1 or xs[0] is ws[0]:
        return "cannot tell the token states from the routing weights by their shapes"
    out = call.output.meta.get("val")
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (T, H):
        return "its output is not [tokens, hidden]"
    call.x, call.ids, call.w, call.gate_up, call.down = xs[0], ids, ws[0], gu, dn
    return None


def lower_experts(lw, call: ExpertsCall):
    """Emit the experts' Einsums into the Lowerer `lw`; returns the output's template."""
    x, ids, w, gu, dn = (lw.tmpl(n) for n in (call.x, call.ids, call.w, call.gate_up, call.down))
    E, I2, H = gu.shape
    I = I2 // 2
    T, K = ids.shape
    f32, out_dt = dt.f32, lw.dtype(call.output)
    at, cast = lw.at, lw.cast

    def mul(a, b):
        return Call("mul", (a, b))

    gw_dt = w.dtype
    gw = lw.statement("moe_gw", (T, E), gw_dt, lambda o, r: Call("where", (
        Call("eq", (at(ids, [o[0], r[0]]), IndexValue(o[1]))), at(w, [o[0], r[0]]), Const(0.0))), (K,), lazy=False)
    up = lw.statement("moe_up", (T, E, I2), out_dt, lambda o, r: Call("where", (
        Call("ne", (at(gw, [o[0], o[1]]), Const(0.0))),
        mul(cast(at(x, [o[0], r[0]]), f32), cast(at(gu, [o[1], o[2], r[0]]), f32)), Const(0.0))), (H,), lazy=False)
    act = lw.statement("moe_act", (T, E, I), out_dt, lambda o, r: mul(
        Call("silu", (at(up, [o[0], o[1], o[2]]),)), at(up, [o[0], o[1], o[2] + I])), lazy=False)
    down = lw.statement("moe_down", (T, E, H), out_dt, lambda o, r: mul(
        cast(at(act, [o[0], o[1], r[0]]), f32), cast(at(dn, [o[1], o[2], r[0]]), f32)), (I,), lazy=False)
    return lw.statement("moe_out", (T, H), out_dt, lambda o, r: mul(
        cast(at(gw, [o[0], r[0]]), f32), cast(at(down, [o[0], r[0], o[1]]), f32)), (E,), lazy=False)
