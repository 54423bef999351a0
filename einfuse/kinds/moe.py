"""The MoE kind: a mixture-of-experts layer's expert GEMMs as kernels that load each *activated* expert's
weights once per step and skip the others.

The IR of an experts call (what `einfuse.frontend.moe` emits for transformers' experts modules, and what a
model written in the dense "every expert on every token" form lowers to; `einfuse.passes.moe` finds it)::

    gw[t, e]      = sum[k] where(ids[t, k] == e, w[t, k], 0)                         # routing weight, 0 off the top-k
    up[t, e, n]   = sum[h] where(gw[t, e] != 0, x[t, h] * w_gate_up[e, n, h], 0)     # role gate_up
    act[t, e, i]  = silu(up[t, e, i]) * up[t, e, i + I]                              # role act (SwiGLU)
    down[t, e, h] = sum[i] act[t, e, i] * w_down[e, h, i]                            # role down
    out[t, h]     = sum[e] gw[t, e] * down[t, e, h]                                  # role combine

Two kernels of this kind run it. `gate_up + act`: one program per (expert, tile of the intermediate),
looping over token blocks and skipping those no token of which routes to the expert; the expert's
weight tile is loaded once per token block that has one (once per step in decode) and an inactive
expert loads nothing; SwiGLU is the epilogue. `down + combine`: one program per (token block, tile of the
hidden size), looping over the experts its tokens route to, weighting each expert's output as it
accumulates (the combine needs no scatter and no atomics).

Cost model (public, used by schedulers and reports): `expert_bytes(expert_ids, num_experts,
bytes_per_expert)` is the expert-weight bytes one MoE layer loads in a step whose routing is
`expert_ids` (the top-k expert ids of the step's tokens, any shape): every expert at least one token
routes to is loaded once, the others not at all. `expert_bytes_from_counts(counts, bytes_per_expert)`
takes tokens per expert instead; `expert_param_bytes(hidden, intermediate, dtype)` is one gated expert's
weight bytes (gate, up and down projections). Under Triton's interpreter the traffic counter measures
what the kernels load; that equals this model when a step's tokens fit one token block (decode), and
on a GPU the re-reads of a weight tile by later token blocks of a long prompt come from L2.
"""
from __future__ import annotations

import torch


def expert_param_bytes(hidden: int, intermediate: int, dtype: torch.dtype = torch.float32, gated: bool = True) -> int:
    """Weight bytes of one expert: gate and up projections (hidden -> intermediate each; one without a
    gate) and the down projection (intermediate -> hidden)."""
    size = torch.empty((), dtype=dtype).element_size()
    return (3 if gated else 2) * hidden * intermediate * size


def activated_experts(expert_ids: torch.Tensor, num_experts: int) -> int:
    """How many distinct experts the step's routing activates (ids outside [0, num_experts) are ignored:
    expert-parallel sentinels, padding)."""
    ids = torch.as_tensor(expert_ids).reshape(-1).long()
    ids = ids[(ids >= 0) & (ids < num_experts)]
    return int(torch.unique(ids).numel())


def expert_bytes(expert_ids: torch.Tensor, num_experts: int, bytes_per_expert: int) -> int:
    """Expert-weight bytes one MoE layer loads in a step with this routing: each activated expert once."""
    return activated_experts(expert_ids, num_experts) * int(bytes_per_expert)


def expert_bytes_from_counts(counts, bytes_per_expert: int) -> int:
    """The same from tokens routed to each expert (a sequence or tensor of length num_experts)."""
    return int((torch.as_tensor(counts) > 0).sum()) * int(bytes_per_expert)
