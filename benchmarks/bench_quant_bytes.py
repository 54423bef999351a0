"""Bytes of one SmolLM2-135M decode step (batch 8, context 1024), bf16 against W4A8KV4, every kernel's
loads and stores counted under Triton's interpreter (einfuse.runtime.traffic).

A whole 30-layer step is slow to interpret on CPU, so the step is measured on the real model truncated to
1 and to 2 decoder layers (real weights, the full vocabulary and LM head): a layer's bytes are the
difference, everything outside the layers (embedding gather, final norm, LM head, logits) the rest, and
the 30-layer step is `outside + 30 x layer` — every figure a measurement, only the sum is arithmetic.
Two counts per kernel: bytes accessed (every load and store, masked-off lanes excluded) and distinct
bytes (each element a kernel touches once: what DRAM sees when a kernel's re-reads hit the cache).

    python benchmarks/bench_quant_bytes.py [--layers 1 2] [--batch 8] [--context 1024] [--group 128]

Baselines: the bf16 step as einfuse compiles it today (its decode attention is not fused in bf16: the
scores go through memory, so it moves far more than it must), the f32 step (fused attention; halved it
estimates a fused bf16 step), and the bf16 minimum (weights, the live KV cache and the logits, each once).
The W4A8KV4 programs come from einfuse.quant (schemes w4a8kv4-rtn and w4a8kv4-head-rtn with the recipe's key
groups of 32: calibration does not change bytes) over the f32 model: the quantization passes do not yet rewrite a bf16 capture's Linears,
so its activations are f32 — more bytes than a bf16-activation W4A8KV4 step. `w4a8kv4` leaves the LM head
in float (it is tied to the embedding): its outside-the-layers bytes are the bf16 step's, so that an f32 LM
head (113 MB) does not stand in for a bf16 one. `w4a8kv4-head` quantizes the LM head like the layers (W4
g128, untied from the embedding): everything it moves is measured.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import einfuse  # noqa: F401  (Triton's interpreter on a CPU machine)


def truncated(dtype, layers: int):
    from einfuse.hub import smollm2

    model, _ = smollm2(dtype)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    return model


def step_bytes(model, scheme: str | None, batch: int, ctx: int, group: int) -> dict:
    """One decode step of `batch` sequences at context `ctx` (every cached block live): bytes per kernel kind."""
    from einfuse.serve import CacheConfig, StepEntry
    from einfuse.serve.paged import PagedRunner

    bs = 16
    if scheme:
        from einfuse.quant import get_scheme
        from einfuse.quant.calibrate import QuantPagedRunner, calibrate

        # round to nearest (calibration does not change bytes), keys in the recipe's groups (that does)
        q = calibrate(model, scheme=get_scheme(scheme).with_(key_group=get_scheme("w4a8kv4").key_group),
                      group=group, progress=False)
        runner = QuantPagedRunner(q, "triton")
    else:
        runner = PagedRunner(model, "triton")
    dtype = next(model.parameters()).dtype
    runner.bind(CacheConfig(num_blocks=batch * ctx // bs, block_size=bs, max_batch_tokens=64, dtype=dtype))
    g = torch.Generator().manual_seed(0)
    for t in runner.states.values():  # a live cache: random codes and values
        if t.dtype == torch.uint8:
            t.copy_(torch.randint(0, 256, t.shape, generator=g, dtype=torch.uint8))
        else:
            t.copy_(torch.randn(t.shape, generator=g).to(t.dtype) * (0.1 if t.dtype == torch.float16 else 1))
    entries = [StepEntry(b, (5 + b,), ctx - 1, tuple(range(b * ctx // bs, (b + 1) * ctx // bs))) for b in range(batch)]
    run = runner.programs.decode.run
    run.measure, run.stats = True, {}
    t0 = time.perf_counter()
    try:
        runner.step(entries)
    finally:
        run.measure = False
    kind_of = {s.name: s.kind for s in run.specs}
    by_kind: dict = {}
    for st in run.stats.values():
        k = kind_of.get(st.name, "?")
        by_kind[k] = by_kind.get(k, 0) + st.bytes_loaded + st.bytes_stored
    cache = sum(t.numel() * t.element_size() for t in runner.states.values())
    return {"total": sum(by_kind.values()), "distinct": sum(st.unique_bytes for st in run.stats.values()),
            "by_kind": by_kind, "cache_bytes": cache, "seconds": round(time.perf_counter() - t0, 1)}


def bf16_minimum(model, batch: int, ctx: int) -> dict:
    """Bytes a bf16 decode step cannot avoid: each weight, each live cached key and value, the f32 logits once."""
    cfg = model.config
    layer = sum(p.numel() for p in model.model.layers[0].parameters()) * 2
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = batch * ctx * 2 * cfg.num_key_value_heads * head_dim * 2
    outside = (model.lm_head.weight.numel() + cfg.hidden_size) * 2 + batch * cfg.vocab_size * 4
    return {"layer": layer + kv, "layer_weights": layer, "layer_kv": kv, "outside": outside}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs=2, default=(1, 2))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--full-layers", type=int, default=30)
    ap.add_argument("--configs", nargs="+", default=["bf16", "f32", "w4a8kv4", "w4a8kv4-head"])
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    out: dict = {}
    configs = (("bf16", torch.bfloat16, None), ("f32", torch.float32, None), ("w4a8kv4", torch.float32, "w4a8kv4-rtn"),
               ("w4a8kv4-head", torch.float32, "w4a8kv4-head-rtn"))
    for label, dtype, quantized in configs:
        if label not in args.configs:
            continue
        per = {}
        for n in args.layers:
            per[n] = step_bytes(truncated(dtype, n), quantized, args.batch, args.context, args.group)
            print(f"{label}: {n} layer(s): {per[n]['total']:,} bytes, {per[n]['distinct']:,} distinct "
                  f"({per[n]['seconds']} s) {per[n]['by_kind']}", file=sys.stderr)
        a, b = args.layers
        entry = {"measured": {n: {k: v for k, v in per[n].items()} for n in per}}
        for metric in ("total", "distinct"):
            layer = (per[b][metric] - per[a][metric]) // (b - a)
            entry[metric] = {"layer": layer, "outside": per[a][metric] - a * layer}
        out[label] = entry
    L = args.full_layers
    minimum = bf16_minimum(truncated(torch.bfloat16, 1), args.batch, args.context)
    res = {"date": time.strftime("%Y-%m-%d"), "batch": args.batch, "context": args.context, "group": args.group,
           "layers": L, "bf16_minimum": minimum, "configs": out}
    print(f"SmolLM2-135M decode step, batch {args.batch}, context {args.context}, {L} layers; bytes measured "
          "under Triton's interpreter (1- and 2-layer truncations; layer = difference)")
    print(f"{'':34}{'per layer':>14}{'outside layers':>16}{'30-layer step':>16}")
    rows = {}
    for label in out:
        for metric in ("total", "distinct"):
            e = out[label][metric]
            outside = out["bf16"][metric]["outside"] if label == "w4a8kv4" and "bf16" in out else e["outside"]
            step = outside + L * e["layer"]
            rows[(label, metric)] = step
            print(f"{label + ' ' + ('accessed' if metric == 'total' else 'distinct'):34}{e['layer']:>14,}{outside:>16,}{step:>16,}")
    min_step = minimum["outside"] + L * minimum["layer"]
    print(f"{'bf16 minimum':34}{minimum['layer']:>14,}{minimum['outside']:>16,}{min_step:>16,}")
    res["ratios"] = {}
    for label in ("w4a8kv4", "w4a8kv4-head"):
        if (label, "total") not in rows:
            continue
        q, qd = rows[(label, "total")], rows[(label, "distinct")]
        ratios = {"vs bf16 minimum (accessed)": q / min_step, "vs bf16 minimum (distinct)": qd / min_step}
        if ("bf16", "total") in rows:
            ratios["vs bf16 as compiled (accessed)"] = q / rows[("bf16", "total")]
        if ("f32", "total") in rows:
            ratios["vs f32 step / 2 (accessed)"] = q / (rows[("f32", "total")] / 2)
        for k, v in ratios.items():
            print(f"{label} step {k}: {v:.3f}")
        res["ratios"][label] = ratios
    res["steps"] = {f"{a} {b}": v for (a, b), v in rows.items()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
