"""Layered prefill against chunked prefill and whole prompts on a MoE model where expert weights dominate
(issue 11): a Mixtral-style model (hidden 512, 8 layers, 16 experts top-2 (--experts), expert FFN 1024, random
weights), 16 requests of a bursty trace (Gamma arrivals, Zipf lengths: prompts 512-4096, outputs 16-128 tokens).

    python benchmarks/bench_layered.py [--budget 256] [--groups 4] [--rate 200] [--experts 16] [--out DIR]

Route-only replay: the real model runs once per request (transformers generate, greedy, its KV cache) and
records every token and each token's top-2 experts per layer (routing.RouterTap); the engine then replays the
trace under each policy with a runner that reports, per step, the experts its tokens routed to in the layers
they passed and returns the recorded next token. So routing is the real model's; step times come from the
labelled H100 model (sim.StepCostModel), not from this CPU. The recording is cached (safetensors) under
~/.cache/einfuse/sim/. Writes the table (Markdown) to stdout and OUT/table.md, plots to OUT/*.png.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import torch

from einfuse.serve import sim

CONFIG = {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 8,
          "num_key_value_heads": 2, "num_local_experts": 16, "num_experts_per_tok": 2, "vocab_size": 1024,
          "max_position_embeddings": 8192}
TRACE = {"n": 16, "seed": 11, "rate": 200.0, "burstiness": 0.5, "prompt": (512, 4096), "output": (16, 128)}


def build_model():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(use_cache=True, **CONFIG)).eval()


def recording(model, trace, seed=0):
    key = hashlib.sha256(json.dumps([CONFIG, [(r.prompt_len, r.output_len) for r in trace], seed,
                                     torch.__version__]).encode()).hexdigest()[:16]  # arrivals do not matter
    path = os.path.join(os.path.expanduser("~/.cache/einfuse/sim"), f"routing-{key}.safetensors")
    if os.path.exists(path):
        return sim.load_recording(path), path
    from rich.progress import Progress

    with Progress() as bar:
        task = bar.add_task("recording the model's routing (generate per request)", total=len(trace))
        _, rec = sim.route_only_runner(model, trace, seed, progress=lambda i: bar.advance(task))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sim.save_recording(path, rec)
    return rec, path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--experts", type=int, default=CONFIG["num_local_experts"], help="experts per layer (top-2)")
    p.add_argument("--rate", type=float, default=TRACE["rate"], help="mean arrivals per second")
    p.add_argument("--out", default="bench_layered_out", help="docs/img/layered for the figures in the docs")
    ns = p.parse_args(argv)
    torch.set_num_threads(1)
    CONFIG["num_local_experts"] = ns.experts
    model = build_model()
    trace = sorted(sim.bursty_trace(**{**TRACE, "rate": ns.rate}), key=lambda r: r.arrival)
    start = time.perf_counter()
    rec, path = recording(model, trace)
    print(f"routing: {path} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    def factory():
        return sim.RoutedReplayRunner(rec, CONFIG["vocab_size"], CONFIG["num_hidden_layers"])
    results = [sim.replay(model, trace, policy, ns.groups, ns.budget, runner=factory) for policy in sim.POLICIES]
    outs = [[r.output for r in res.requests] for res in results]
    same = all(o == outs[0] for o in outs)
    text = sim.table(results)
    m = {r.policy: r.metrics() for r in results}
    saving = 1 - m["layered"]["expert_bytes_per_token"] / m["chunked"]["expert_bytes_per_token"]
    summary = (f"\nlayered vs chunked at budget {ns.budget}: expert bytes per generated token "
               f"{saving * 100:.1f}% fewer; TBT p99 {m['layered']['tbt_p99'] * 1e3:.3f} vs "
               f"{m['chunked']['tbt_p99'] * 1e3:.3f} ms; TTFT mean {m['layered']['ttft_mean'] * 1e3:.3f} vs "
               f"{m['chunked']['ttft_mean'] * 1e3:.3f} ms; outputs identical across policies: {same}\n"
               f"trace: {len(trace)} requests, prompts {min(r.prompt_len for r in trace)}-"
               f"{max(r.prompt_len for r in trace)} tokens, outputs {min(r.output_len for r in trace)}-"
               f"{max(r.output_len for r in trace)}, arrivals over {trace[-1].arrival:.3f} s")
    os.makedirs(ns.out, exist_ok=True)
    with open(os.path.join(ns.out, "table.md"), "w") as f:
        f.write(text + "\n" + summary + "\n")
    paths = sim.plots(results, ns.out, f"(hidden 512, {ns.experts} experts top-2, {ns.rate:g} req/s)")
    print(text + "\n" + summary)
    print("plots: " + ", ".join(paths))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
