"""Which experts a step activates, and the expert-weight bytes that costs.

A mixture-of-experts layer loads, in one step, the weights of every expert that at least one of the step's
tokens routes to at that layer (the union over the step's tokens) — once, however many tokens share it. So the
expert bytes of a step are `sum over MoE layers of |experts activated there| x bytes of one expert`, and they
depend on which tokens pass through which layers in that step: that is what a scheduler changes.

`RouterTap` observes the routing of a transformers MoE model (Mixtral, Qwen2-MoE, OLMoE, PhiMoE: the
`...TopKRouter` modules return (logits, scores, top-k expert ids)) with forward hooks; `ExpertGeometry` says
how many experts each layer has and what one weighs; `expert_bytes` is the one place a step's expert bytes
are computed from its routing, through the MoE kernel kind's public cost model (kinds.moe.expert_bytes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertGeometry:
    """The MoE layers of a model: `layers` (model layer index -> number of experts there), `top_k`, and the
    bytes of one expert's weights at `bytes_per_param` (2: bf16, what the H100 model assumes)."""
    layers: dict
    top_k: int
    expert_params: int
    bytes_per_param: int = 2
    shared_params: int = 0  # an always-on shared expert per MoE layer (Qwen2-MoE, DeepSeek), with its gate

    @property
    def expert_bytes(self) -> int:
        return self.expert_params * self.bytes_per_param

    @property
    def total_bytes(self) -> int:
        """Every expert of every MoE layer once: what loading all of them costs."""
        return sum(self.layers.values()) * self.expert_bytes


def _experts_module(layer):
    """The experts container of a decoder layer's MoE block (None for a dense layer)."""
    mlp = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
    return getattr(mlp, "experts", None) if mlp is not None and _router(mlp) is not None else None


def _router(mlp):
    gate = getattr(mlp, "gate", None) or getattr(mlp, "router", None)
    return gate if gate is not None and type(gate).__name__.endswith("Router") else None


def decoder_layers(model) -> list:
    """The decoder layers of a transformers causal LM (`model.model.layers`)."""
    core = getattr(model, "model", None)
    layers = getattr(core, "layers", None)
    if layers is None:
        raise ValueError(f"einfuse: {type(model).__name__} has no `model.layers`; layer groups need a decoder "
                         f"whose blocks are a module list (Llama, Mistral, Mixtral, Qwen2(-MoE) style)")
    return list(layers)


def expert_geometry(model, bytes_per_param: int = 2) -> ExpertGeometry | None:
    """The model's MoE layers (None: a dense model, where expert bytes do not apply)."""
    layers, params, top_k, shared = {}, set(), set(), set()
    for i, layer in enumerate(decoder_layers(model)):
        experts = _experts_module(layer)
        if experts is None:
            continue
        n = getattr(experts, "num_experts", None) or len(list(experts.children()))
        layers[i] = n
        params.add(sum(p.numel() for p in experts.parameters()) // n)
        top_k.add(_router(layer.mlp).top_k)
        shared.add(sum(p.numel() for name in ("shared_expert", "shared_expert_gate", "shared_experts")
                       if getattr(layer.mlp, name, None) is not None
                       for p in getattr(layer.mlp, name).parameters()))
    if not layers:
        return None
    if len(params) > 1 or len(top_k) > 1 or len(shared) > 1:
        raise ValueError(f"einfuse: MoE layers of different expert sizes {sorted(params)}, top-k {sorted(top_k)} "
                         f"or shared experts {sorted(shared)}; expert bytes assume one expert shape")
    return ExpertGeometry(layers, top_k.pop(), params.pop(), bytes_per_param, shared.pop())


class RouterTap:
    """Records, per model layer, the set of experts the tokens that passed through it activated since the
    last `take()` (forward hooks on the routers; `close()` removes them)."""

    def __init__(self, model, per_token: bool = False):
        self.active: dict[int, set] = {}
        self.tokens: dict[int, int] = {}
        self.per_token = per_token  # also keep every call's [tokens, top_k] ids, in order (`routes`)
        self.routes: dict[int, list] = {}
        self._hooks = []
        for i, layer in enumerate(decoder_layers(model)):
            mlp = getattr(layer, "mlp", None)
            router = _router(mlp) if mlp is not None else None
            if router is not None:
                self._hooks.append(router.register_forward_hook(self._hook(i)))

    def _hook(self, layer: int):
        def hook(module, args, out):
            ids = out[-1] if isinstance(out, tuple) else torch.topk(out, module.top_k, dim=-1).indices
            self.active.setdefault(layer, set()).update(ids.reshape(-1).tolist())
            self.tokens[layer] = self.tokens.get(layer, 0) + ids.reshape(-1, ids.shape[-1]).shape[0]
            if self.per_token:
                self.routes.setdefault(layer, []).append(ids.reshape(-1, ids.shape[-1]).to(torch.int16))
        return hook

    def take(self) -> dict[int, frozenset]:
        """layer -> experts activated since the last take (layers no token passed are absent)."""
        out = {layer: frozenset(s) for layer, s in self.active.items()}
        self.active, self.tokens = {}, {}
        return out

    def take_routes(self) -> dict[int, torch.Tensor]:
        """layer -> [tokens, top_k] expert ids of every token routed since the last call, in order (per_token)."""
        out = {layer: torch.cat(chunks) for layer, chunks in self.routes.items()}
        self.routes = {}
        return out

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def expert_bytes(active: dict, geometry: ExpertGeometry) -> int:
    """Expert-weight bytes a step loads: each activated expert of each MoE layer once (`active`: layer -> the
    expert ids the step's tokens routed to there) — the MoE kernel kind's cost model (kinds.moe), per layer."""
    from ..kinds.moe import expert_bytes as layer_bytes

    return sum(layer_bytes(torch.tensor(sorted(experts), dtype=torch.long), geometry.layers[layer],
                           geometry.expert_bytes)
               for layer, experts in active.items() if layer in geometry.layers)
