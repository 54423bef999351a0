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
   activations, and vs those experts in bf16 — for the hand-written module (`decode_step`) and for the
   COMPILED program (`compiled_decode_step`: einfuse.compile with compress_experts, the MoE chain routed
   through the fused cdot kernel; bytes per access and distinct). `--compiled-traffic-untrained` measures
   only the latter, on an untrained model of the same shape (no training).
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


def stored(ct) -> list:
    """The arrays of a compressed tensor a kernel reads (all but the checksums)."""
    return [t for k, t in ct.arrays().items() if k != "checksums"]


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
    reads = [*stored(gu), *stored(dn), mod.dict_table, xs, seg, experts]
    for r in reads:
        t.regions.append((r.data_ptr(), r.numel() * r.element_size(), r.element_size()))
    with torch.inference_mode(), counting(t):
        from einfuse.kinds.cdot import cdot
        gu_out = cdot(xs, gu, compressed.dictionary, seg, experts, dict_table=mod.dict_table)
        gate, up = gu_out.chunk(2, dim=-1)
        h = (mod.act_fn(gate) * up).contiguous()
        t.regions.append((h.data_ptr(), h.numel() * h.element_size(), h.element_size()))
        yd = cdot(h, dn, compressed.dictionary, seg, experts, dict_table=mod.dict_table)
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


def compiled_decode_step_traffic(model, compressed, batch: int, ids: torch.Tensor | None = None) -> dict:
    """One decode step of the COMPILED program (einfuse.compile, torch backend, prepare=[compress_experts]):
    `batch` sequences, one new token each, every MoE layer routed on the stored codes through the fused cdot
    kernel (EINFUSE_COMPRESSED_EXPERTS=kernel; Triton's interpreter on CPU). The traffic counter sees each
    layer's two cdot launches (gate/up, down): bytes loaded counted per access (a dictionary entry or an
    activation read twice counts twice) and distinct bytes, against the ideal of the layer — the compressed
    bytes of its activated experts + the dictionary + the activations of its routed rows (gate/up input and
    down input, f32) — and against the same experts in bf16. Logits are checked against the dequantized model."""
    import einfuse.kinds.cdot as cdot_mod
    from einfuse.passes.compress import compress_experts
    from einfuse.runtime.traffic import Traffic, counting
    model = copy.deepcopy(model)
    p = compress_experts(compressed=compressed, model=model)
    if ids is None:
        ids = train_moe.novel_ids(train_moe.TEXT_EVALUATION)[1000:1000 + batch].view(batch, 1)
    fn = einfuse.compile(model, (ids,), kwargs={"use_cache": False}, prepare=[p], backend="torch")
    layers = []  # per layer: Traffic and the (ct, experts, x) of its launches
    real = cdot_mod.cdot

    def counted(x, ct, d, seg, experts, out=None, dict_table=None):
        if not layers or len(layers[-1]["calls"]) == 2:
            layers.append({"traffic": Traffic(), "calls": []})
        layer = layers[-1]
        t = layer["traffic"]
        for r in (x, *stored(ct), dict_table, seg, experts):
            t.regions.append((r.data_ptr(), r.numel() * r.element_size(), r.element_size()))
        layer["calls"].append((ct, experts.clone(), x.shape))
        with counting(t):
            return real(x, ct, d, seg, experts, out=out, dict_table=dict_table)

    os.environ["EINFUSE_COMPRESSED_EXPERTS"] = "kernel"
    cdot_mod.cdot = counted
    try:
        with torch.inference_mode():
            got = fn(ids, use_cache=False).logits
    finally:
        cdot_mod.cdot = real
        del os.environ["EINFUSE_COMPRESSED_EXPERTS"]
        with torch.inference_mode():
            want = model(ids, use_cache=False).logits
    assert "decode_experts" not in fn.variant.run.source, "the compiled program still decodes the experts densely"
    (_, layer0), *_ = require_moe_layers(model)
    E, two_i, H = layer0.gate_up_proj.shape
    dict_bytes = compressed.dictionary.nbytes
    rows = []
    for layer in layers:
        (gu, experts, xs_shape), (dn, _, hs_shape) = layer["calls"]
        active = experts.tolist()
        comp = sum(gu.expert_nbytes(e) + dn.expert_nbytes(e) for e in active)
        acts = xs_shape[0] * xs_shape[1] * 4 + hs_shape[0] * hs_shape[1] * 4
        ideal = comp + dict_bytes + acts
        t = layer["traffic"]
        rows.append({"active_experts": len(active), "bytes_loaded_per_access": t.bytes_loaded,
                     "unique_bytes_loaded": t.unique_bytes, "ideal_bytes": ideal, "compressed_expert_bytes": comp,
                     "bf16_expert_bytes": len(active) * 3 * H * (two_i // 2) * 2})
    total = {k: sum(r[k] for r in rows) for k in rows[0]}
    return {"batch": batch, "program": "compiled (einfuse.compile, torch backend, fused cdot kernel)",
            "layers": len(rows), "per_layer": rows,
            "ratio_per_access_to_ideal": round(total["bytes_loaded_per_access"] / total["ideal_bytes"], 3),
            "ratio_distinct_to_ideal": round(total["unique_bytes_loaded"] / total["ideal_bytes"], 3),
            "bf16_over_compressed_experts": round(total["bf16_expert_bytes"] / total["compressed_expert_bytes"], 2),
            "rows_per_program": cdot_mod.ROWS_PER_PROGRAM or "auto (kinds.cdot.rows_per_program)",
            "max_abs_err_vs_dequantized": float((got - want).abs().max())}


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
    ap.add_argument("--skip-decode-steps", action="store_true", help="no decode-step traffic (perplexity and bits only)")
    ap.add_argument("--json", default="")
    ap.add_argument("--compiled-traffic-untrained", action="store_true",
                    help="only the compiled decode-step traffic, on an untrained model of train_moe's shape "
                         "(round-to-nearest ternary experts): no training, minutes")
    ap.add_argument("--rows-per-program", type=int, default=0,
                    help="force the cdot kernel's rows per program (a multiple of 16; default: its heuristic)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.rows_per_program:
        import einfuse.kinds.cdot
        einfuse.kinds.cdot.ROWS_PER_PROGRAM = args.rows_per_program
    if args.compiled_traffic_untrained:
        from transformers import MixtralForCausalLM
        torch.manual_seed(0)
        model = MixtralForCausalLM(train_moe.config()).float().eval()
        rtn = compress_moe(model, None, method="rtn", progress=False)
        g = torch.Generator().manual_seed(0)
        rows = [compiled_decode_step_traffic(model, rtn, b, torch.randint(0, 256, (b, 1), generator=g)) for b in (1, 8)]
        print(json.dumps({"bits_per_param": round(rtn.summary()["bits_per_param"], 4), "compiled_decode_step": rows}))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
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
    if not args.only_generation and not args.skip_decode_steps:
        out["decode_step"] = [decode_step_traffic(gptq_model, gq, b) for b in (1, 8)]
        print("decode:", json.dumps(out["decode_step"]), flush=True)
        out["compiled_decode_step"] = [compiled_decode_step_traffic(gptq_model, gq, b) for b in (1, 8)]
        print("compiled decode:", json.dumps(out["compiled_decode_step"]), flush=True)
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
