"""The one GPU run (one H100/H200, at most 8 minutes): SmolLM2-135M-Instruct generate throughput at batch
1, 16 and 64 — einfuse.LLM (Triton kernels, paged KV cache, decode as CUDA graphs) beside transformers
eager `generate` and transformers with `torch.compile` (static cache, reduce-overhead) — and a greedy
correctness check against transformers on the first prompt.

    python benchmarks/gpu.py [--out gpu_results.json] [--new-tokens 64] [--budget 420]

Prints a Markdown table for docs/PERFORMANCE.md and writes every number to --out. Work that would pass
--budget seconds is skipped and said so (torch.compile goes last: its compile alone can take minutes).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_results.json")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--budget", type=float, default=420.0, help="seconds; later items are skipped past it")
    p.add_argument("--batches", default="1,16,64")
    ns = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("einfuse: benchmarks/gpu.py needs a CUDA GPU (none found)", file=sys.stderr)
        return 2
    import einfuse
    from einfuse.hub import austen_prompts, smollm2

    began = time.perf_counter()
    left = lambda: ns.budget - (time.perf_counter() - began)  # noqa: E731
    model, tok = smollm2(dtype=torch.bfloat16)
    model = model.cuda().eval()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batches = [int(b) for b in ns.batches.split(",")]
    pool = austen_prompts(max(batches))
    results = {"device": torch.cuda.get_device_name(), "new_tokens": ns.new_tokens, "dtype": "bf16", "rows": []}
    n = ns.new_tokens

    t = time.perf_counter()
    llm = einfuse.LLM(model, tok, backend="triton", max_batch_tokens=4096)
    results["einfuse_ready_s"] = round(time.perf_counter() - t, 1)

    def hf(prompts, **kw):
        batch = tok(prompts, return_tensors="pt", padding=True).to("cuda")
        with torch.no_grad():
            return model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=tok.pad_token_id, **kw)

    first = pool[0]
    ours = llm.generate(first, max_new_tokens=n)
    ref = tok.decode(hf([first])[0, -n:], skip_special_tokens=True)
    results["greedy_matches_transformers"] = ours == ref or ref.startswith(ours)

    for b in batches:
        prompts = pool[:b]
        row = {"batch": b}
        if left() > 0:
            llm.generate(prompts, max_new_tokens=4, ignore_eos=True)  # warm: graphs for this bucket
            s = timed(lambda: llm.generate(prompts, max_new_tokens=n, ignore_eos=True))
            row["einfuse_tok_s"] = round(b * n / s, 1)
        if left() > 0:
            hf(prompts[:1])
            s = timed(lambda: hf(prompts))
            row["transformers_eager_tok_s"] = round(b * n / s, 1)
        results["rows"].append(row)
        print(row, flush=True)

    if left() > 60:  # torch.compile last: its first call compiles for a while
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        for row in results["rows"]:
            if left() <= 0:
                row["transformers_compile_tok_s"] = "skipped (budget)"
                continue
            prompts = pool[:row["batch"]]
            hf(prompts)  # compile for this shape
            s = timed(lambda: hf(prompts))
            row["transformers_compile_tok_s"] = round(row["batch"] * n / s, 1)
            print(row, flush=True)
    results["seconds"] = round(time.perf_counter() - began, 1)
    with open(ns.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{results['device']}, SmolLM2-135M bf16, {n} new tokens, greedy; tokens/s "
          f"(einfuse ready in {results['einfuse_ready_s']} s; greedy matches transformers: "
          f"{results['greedy_matches_transformers']})\n")
    print("| batch | einfuse | transformers eager | transformers + torch.compile |")
    print("|---:|---:|---:|---:|")
    for r in results["rows"]:
        print(f"| {r['batch']} | {r.get('einfuse_tok_s', '-')} | {r.get('transformers_eager_tok_s', '-')} | "
              f"{r.get('transformers_compile_tok_s', '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
