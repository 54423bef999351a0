"""Sub-1-bit experts (QMoE) measured: perplexity, bits per parameter, decode-step bytes, greedy generation.

Run: `nice -n 10 python benchmarks/bench_compress.py [--skip-smollm2] [--gen-tokens 4] [--json out.json]`
(the trained MoE comes from benchmarks/train_moe.py's cache; it is trained first when absent).

1. The Austen MoE (train_moe.py; trained on Pride and Prejudice, Sense and Sensibility, Northanger Abbey):
   per-byte perplexity on Persuasion (held out; 64 x 256-byte segments) for fp32, ternary round-to-nearest
   and ternary GPTQ calibrated on Emma (32 x 256-byte segments), all experts of all layers compressed.
2. Bits per expert parameter of the GPTQ model and of SmolLM2-135M's MLP projections (gate, up, down of all
   30 layers, round-to-nearest ternary, treated as experts): total (codes + dictionary + offsets + scales +
   checksums), codes only, and the order-0 entropy of the symbol stream.
3. One decode step of an MoE layer of the compressed model under Triton's interpreter (traffic counter),
   batch 1 and 8: distinct bytes loaded vs compressed bytes of the activated experts + dictionary +
   activations, and vs those experts in bf16.
4. Greedy generation through the fused kernel (CompressedExperts installed in the transformers model —
   a torch-module wrapper; the MoE kernel kind of einfuse's compiler is not used) against the same
   weights dequantized (tokens must be identical).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import train_moe

import einfuse  # noqa: F401  (Triton's interpreter on CPU, before transformers imports triton)
from einfuse.compress.experts import compress_matrices, compress_moe, install, require_moe_layers

PROMPT = "It is a truth "


def calibration_batches(segments=32, batch=8):
    ids = train_moe.novel_ids(train_moe.TEXT_CALIBRATION)[: segments * train_moe.SEQ].view(-1, train_moe.SEQ)
    return list(ids.split(batch))


def bits_row(summary: dict) -> dict:
    return {"bits_per_param": round(summary["bits_per_param"], 4),
            "code_bits_per_param": round(summary["code_bits_per_param"], 4),
            "entropy_bits": round(summary["entropy_bits"], 4),
            "total_over_entropy": round(summary["bits_per_param"] / summary["entropy_bits"], 3),
            "codes_over_entropy": round(summary["code_bits_per_param"] / summary["entropy_bits"], 3),
            "zero_share": round(summary["probs"][0], 4), "codeword_bits": summary["bits"],
            "bytes": summary["bytes"], "params": summary["params"]}


def decode_step_traffic(model, compressed, batch: int) -> dict:
    """Bytes one decode step's experts of layer 0 load, under the interpreter's traffic counter."""
    from einfuse.runtime.traffic import Traffic, counting
    name, layer = require_moe_layers(model)[0]
    captured = {}

    def hook(mod, args):
        captured["x"], captured["idx"], captured["w"] = args[0][-batch:], args[1][-batch:], args[2][-batch:]
        raise StopIteration

    prompts = train_moe.novel_ids(train_moe.TEXT_EVALUATION)[: batch * 64].view(batch, 64)
    h = layer.register_forward_pre_hook(hook)
    try:
        with torch.inference_mode():
            model(prompts, use_cache=False)
    except StopIteration:
        pass
    finally:
        h.remove()
    # the last position of each sequence: the step's tokens
    x = captured["x"].view(batch, 64, -1)[:, -1] if captured["x"].shape[0] == batch * 64 else captured["x"]
    idx = captured["idx"].view(batch, 64, -1)[:, -1] if captured["idx"].shape[0] == batch * 64 else captured["idx"]
    w = captured["w"].view(batch, 64, -1)[:, -1] if captured["w"].shape[0] == batch * 64 else captured["w"]
    prefix = f"{name}." if name else ""
    gu, dn = compressed.tensors[prefix + "gate_up_proj"], compressed.tensors[prefix + "down_proj"]
    from einfuse.compress.experts import CompressedExperts
    mod = CompressedExperts(gu, dn, compressed.dictionary, layer.act_fn)
    t = Traffic()
    xs, seg, experts, order, token = mod.route(x, idx)
    # the step's second GEMM reads h, the SwiGLU of the first; allocate it up front so it is a known region
    reads = [gu.codes, gu.counts, gu.bases, gu.scales, dn.codes, dn.counts, dn.bases, dn.scales,
             *mod.dict_tensors[:3], xs, seg, experts]
    for r in reads:
        t.regions.append((r.data_ptr(), r.numel() * r.element_size(), r.element_size()))
    with torch.inference_mode(), counting(t):
        from einfuse.kinds.cdot import cdot
        gu_out = cdot(xs, gu, compressed.dictionary, seg, experts, dict_tensors=mod.dict_tensors)
        gate, up = gu_out.chunk(2, dim=-1)
        h = (mod.act_fn(gate) * up).contiguous()
        t.regions.append((h.data_ptr(), h.numel() * h.element_size(), h.element_size()))
        yd = cdot(h, dn, compressed.dictionary, seg, experts, dict_tensors=mod.dict_tensors)
    y = torch.zeros_like(x, dtype=torch.float32).index_add_(0, token, yd * w.reshape(-1)[order, None].float())
    active = experts.tolist()
    want = layer(x, idx, w)
    _, two_i, H = gu.shape
    inter = two_i // 2
    comp = sum(gu.expert_nbytes(e) + dn.expert_nbytes(e) for e in active)
    acts = batch * 2 * (H * 4 + inter * 4)  # tokens' inputs of gate_up and down (fp32), k=2 routes each
    dict_bytes = compressed.dictionary.nbytes
    bf16 = len(active) * 3 * H * inter * 2
    return {"batch": batch, "active_experts": len(active), "unique_bytes_loaded": t.unique_bytes,
            "bytes_loaded_with_rereads": t.bytes_loaded, "ideal_bytes": comp + dict_bytes + acts,
            "compressed_expert_bytes": comp, "dictionary_bytes": dict_bytes, "activation_bytes": acts,
            "ratio_to_ideal": round(t.unique_bytes / (comp + dict_bytes + acts), 3),
            "bf16_expert_bytes": bf16, "bf16_over_compressed": round(bf16 / comp, 2),
            "max_abs_err_vs_dequantized": float((y - want).abs().max())}


def greedy(model, prompt, tokens):
    """Greedy decoding with transformers' KV cache (one token per step after the prompt)."""
    with torch.inference_mode():
        out = model.generate(prompt[None], max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             pad_token_id=0)
    return out[0, prompt.numel():].tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--only-generation", action="store_true", help="just compress (GPTQ) and generate")
    ap.add_argument("--gen-tokens", type=int, default=4)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(2)
    out: dict = {"date": datetime.date.today().isoformat(), "command": "python benchmarks/bench_compress.py"}
    model, info = train_moe.load_trained()
    out["train"] = info
    evaluation = train_moe.novel_ids(train_moe.TEXT_EVALUATION)
    calib = calibration_batches()
    out["text"] = {"train": train_moe.TEXT_TRAIN, "calibration": train_moe.TEXT_CALIBRATION + " (32 x 256 bytes)",
                   "evaluation": train_moe.TEXT_EVALUATION + " (64 x 256 bytes)"}
    t0 = time.time()
    if not args.only_generation:
        out["ppl_fp32"] = train_moe.perplexity(model, evaluation)
        rtn_model = copy.deepcopy(model)
        rtn = compress_moe(rtn_model, None, method="rtn")
        out["ppl_rtn"] = train_moe.perplexity(rtn_model, evaluation)
        out["bits_moe_rtn"] = bits_row(rtn.summary())
    gptq_model = copy.deepcopy(model)
    t1 = time.time()
    gq = compress_moe(gptq_model, calib, method="gptq")
    out["gptq_seconds"] = round(time.time() - t1, 1)
    s = gq.summary()
    out["gptq_experts"] = {"few_tokens": s["few_tokens"], "no_tokens": s["no_tokens"]}
    out["bits_moe_gptq"] = bits_row(s)
    if not args.only_generation:
        out["ppl_gptq"] = train_moe.perplexity(gptq_model, evaluation)
        print(json.dumps({k: out[k] for k in ("ppl_fp32", "ppl_rtn", "ppl_gptq")}), flush=True)
        print("bits (gptq):", json.dumps(out["bits_moe_gptq"]), flush=True)
    if not args.skip_smollm2 and not args.only_generation:
        from einfuse.hub import smollm2
        sm, _ = smollm2()
        mlps = [layer.mlp for layer in sm.model.layers]
        weights = {p: torch.stack([getattr(m, p).weight.detach() for m in mlps]) for p in ("gate_proj", "up_proj", "down_proj")}
        sc = compress_matrices(weights)
        out["bits_smollm2_mlp_rtn"] = bits_row(sc.summary())
        print("bits (smollm2):", json.dumps(out["bits_smollm2_mlp_rtn"]), flush=True)
        del sm
    if not args.only_generation:
        out["decode_step"] = [decode_step_traffic(gptq_model, gq, b) for b in (1, 8)]
        print("decode:", json.dumps(out["decode_step"]), flush=True)
    if args.gen_tokens:
        prompt = train_moe.encode(PROMPT)
        dense_tokens = greedy(gptq_model, prompt, args.gen_tokens)
        fused_model = install(copy.deepcopy(gptq_model), gq)
        t2 = time.time()
        fused_tokens = greedy(fused_model, prompt, args.gen_tokens)
        out["generation"] = {"prompt": PROMPT, "tokens": args.gen_tokens,
                             "dequantized": bytes(dense_tokens).decode("ascii", "replace"),
                             "fused_kernel": bytes(fused_tokens).decode("ascii", "replace"),
                             "identical": dense_tokens == fused_tokens, "seconds": round(time.time() - t2, 1)}
        print("generation:", json.dumps(out["generation"]), flush=True)
    out["seconds"] = round(time.time() - t0, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
