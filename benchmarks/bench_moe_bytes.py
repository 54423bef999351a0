"""Bytes a decode step of one MoE layer moves: the MoE kind's kernels, measured under Triton's interpreter,
against the bytes of the experts the step's routing activates plus the activations.

    python benchmarks/bench_moe_bytes.py            # Mixtral-style layer: hidden 512, intermediate 1024, top-2 of 8

The layer is transformers' MixtralSparseMoeBlock (random weights, f32) compiled by einfuse with the Triton
backend; a decode step is one token per sequence. Measured: the bytes every kernel of the MoE kind loads
and stores (masked-off lanes excluded; `CompiledModule.report`). Bound: `expert_bytes` of the step's
routing (each activated expert's gate/up and down weights once) plus every other tensor those kernels
read or write, once each (token states, routing weights, SwiGLU activations, output).
"""
from __future__ import annotations

import argparse
import datetime

import torch


def moe_layer(hidden: int, intermediate: int, experts: int, top_k: int, seed: int = 0):
    from einfuse.models import tiny_decoder

    model = tiny_decoder("mixtral", seed=seed, hidden_size=hidden, intermediate_size=intermediate,
                         num_local_experts=experts, num_experts_per_tok=top_k, num_hidden_layers=1)
    layer = model.model.layers[0].mlp  # MixtralSparseMoeBlock, experts run as transformers exports them
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, hidden ** -0.5)
    return layer


def measure(tokens: int = 1, hidden: int = 512, intermediate: int = 1024, experts: int = 8, top_k: int = 2,
            seed: int = 0) -> dict:
    """One decode step (`tokens` sequences, one token each) through the compiled layer: measured bytes of
    the MoE kernels, the bound, and the routing."""
    import einfuse
    from einfuse.kinds.moe import activated_experts, expert_bytes, expert_param_bytes

    layer = moe_layer(hidden, intermediate, experts, top_k, seed)
    x = torch.randn(tokens, 1, hidden, generator=torch.Generator().manual_seed(seed + 1))
    cm = einfuse.compile(layer, (x,), backend="triton")
    with torch.no_grad():
        err = ((cm(x) - layer(x)).abs().max() / layer(x).abs().max()).item()
        rep = cm.report(x, eager=False)
        _, _, ids = layer.gate(x.reshape(-1, hidden))
    moe = [k for k in rep.kernels if any(s.startswith("moe_up") or s.startswith("moe_down") for s in k.statements)]
    measured = sum(k.total_bytes for k in moe)
    weights = expert_bytes(ids, experts, expert_param_bytes(hidden, intermediate))
    f = 4
    activations = f * (tokens * hidden  # token states, read by gate/up
                       + 2 * tokens * experts  # routing weights, read by both kernels
                       + 2 * tokens * experts * intermediate  # SwiGLU activations, written and read
                       + tokens * hidden)  # the output
    return dict(tokens=tokens, hidden=hidden, intermediate=intermediate, experts=experts, top_k=top_k,
                active=activated_experts(ids, experts), measured=measured, expert_weights=weights,
                activations=activations, ratio=measured / (weights + activations), layer_bytes=rep.total_bytes,
                all_experts=experts * expert_param_bytes(hidden, intermediate), max_rel_error=err,
                kernels={k.name: k.total_bytes for k in moe})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4])
    a = ap.parse_args()
    print(f"{datetime.date.today()}  MoE layer hidden {a.hidden}, intermediate {a.intermediate}, top-{a.top_k} of "
          f"{a.experts}, f32, Triton interpreter")
    print("| tokens | experts active | measured MoE-kernel bytes | activated experts' bytes | activations | "
          "measured / (experts + activations) | every expert's bytes | whole layer measured | max rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t in a.tokens:
        r = measure(t, a.hidden, a.intermediate, a.experts, a.top_k)
        print(f"| {t} | {r['active']} of {a.experts} | {r['measured']:,} | {r['expert_weights']:,} | {r['activations']:,} | "
              f"{r['ratio']:.3f} | {r['all_experts']:,} | {r['layer_bytes']:,} | {r['max_rel_error']:.1e} |")


if __name__ == "__main__":
    main()
