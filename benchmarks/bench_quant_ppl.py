"""Quantization accuracy of SmolLM2-135M and MiniLM-L6, measured through einfuse's own passes and its torch
backend (the quantized programs, not fake-quant in torch).

SmolLM2: perplexity on *Persuasion* from "Chapter 1" (segments of 1024 tokens, each scored on its own),
calibration on *Emma* from "CHAPTER I" (pieces of 512 tokens); every Linear but the tied LM head; group 128
(the GGUF source is already on a 4-bit group-32 grid, so g128 is a real re-quantization). MiniLM-L6: mean
cosine of mean-pooled sentence embeddings against fp32 over real sentences (Persuasion's paragraphs).

    python benchmarks/bench_quant_ppl.py --segments 4 --json out.json            # the SmolLM2 table
    python benchmarks/bench_quant_ppl.py --minilm                                 # the MiniLM rows
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time

import torch

ROWS = ["fp32", "bf16", "w8a8-rtn", "w8a8", "w4a16-rtn", "w4a16", "w4a8-rtn", "w4a8", "kv4-rtn", "kv4-rot", "kv4",
        "w4a8kv4-rtn", "w4a8kv4"]


def texts():
    from einfuse.hub import austen

    pers = austen("persuasion")["persuasion"]
    emma = austen("emma")["emma"]
    return pers[pers.index("Chapter 1"):], emma[emma.index("CHAPTER I"):]


def perplexity(run, ids: torch.Tensor, segment: int, segments: int) -> tuple[float, torch.Tensor]:
    """exp(mean NLL) of `run` (ids [1, T] -> logits) over the first `segments` full segments, and the greedy
    (teacher-forced) predictions of the first segment."""
    nll, count, greedy = 0.0, 0, None
    for piece in ids.split(segment)[:segments]:
        logits = run(piece[None])[0, :-1].float()
        greedy = logits.argmax(-1) if greedy is None else greedy
        nll += torch.nn.functional.cross_entropy(logits, piece[1:], reduction="sum").item()
        count += len(piece) - 1
    return math.exp(nll / count), greedy


def smollm2_rows(rows, segments: int, calib_segments: int, group: int, log) -> list:
    import einfuse
    from einfuse.hub import smollm2
    from einfuse.quant import calibrate, load, save

    model, tok = smollm2()
    evaluation, calibration = texts()
    ids = torch.tensor(tok(evaluation, add_special_tokens=False, verbose=False)["input_ids"])
    example = ids[:1024][None]
    out = []
    fp32 = fp32_greedy = None
    for row in rows:
        t0 = time.perf_counter()
        if row in ("fp32", "bf16"):
            m = model if row == "fp32" else __import__("copy").deepcopy(model).to(torch.bfloat16)
            cm = einfuse.compile(m, (example,), {"use_cache": False}, backend="torch")
            calib = 0.0
            extra = {}
        else:
            q = calibrate(model, [calibration], row, tokenizer=tok, seq_len=512, segments=calib_segments,
                          group=group if "w4" in row else None, progress=sys.stderr.isatty())
            calib = q.report["seconds"]
            extra = {"weight_bytes": q.report.get("weight_bytes")}
            if row.startswith("w4a8kv4"):  # the checkpoint path: save, then load without calibration
                with tempfile.TemporaryDirectory() as d:
                    extra["checkpoint"] = save(q, d)
                    q = load(model, d)
            cm = q.compile((example,), {"use_cache": False}, backend="torch")
        t1 = time.perf_counter()
        ppl, greedy = perplexity(lambda x, run=cm: run(x, use_cache=False).logits, ids, 1024, segments)
        if row == "fp32":
            fp32, fp32_greedy = ppl, greedy
        elif fp32 is not None:
            extra["greedy_agreement_256"] = round((greedy[:256] == fp32_greedy[:256]).float().mean().item(), 4)
        rec = {"row": row, "ppl": round(ppl, 3), "delta": None if fp32 is None else round(100 * (ppl / fp32 - 1), 2),
               "calibrate_s": calib, "compile_s": round(t1 - t0 - calib, 1), "eval_s": round(time.perf_counter() - t1, 1),
               "fallback": cm.variant.fallback, **extra}
        log(rec)
        out.append(rec)
    return out


def minilm_rows(rows, sentences: int, group: int, log, calib_sentences: int = 256) -> list:
    import einfuse
    from einfuse.models import minilm
    from einfuse.quant import calibrate

    model, tok = minilm()
    evaluation, calibration = texts()
    paras = [" ".join(p.split()) for p in evaluation.split("\n\n") if len(p.split()) >= 8][:sentences]
    cal = [" ".join(p.split()) for p in calibration.split("\n\n") if len(p.split()) >= 8][:calib_sentences]
    batch = tok(paras, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    args = (batch["input_ids"], batch["attention_mask"])

    def embed(m):
        with torch.no_grad():
            h = m(*args).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        return (h * mask).sum(1) / mask.sum(1)

    ref = embed(model)
    out = []
    for row in rows:
        # an encoder calibrates on sentences as it reads them: one paragraph a piece, [CLS] ... [SEP], <= 64 tokens
        q = calibrate(model, cal, row, tokenizer=tok, seq_len=64, segments=len(cal),
                      group=group if "w4" in row else None, progress=sys.stderr.isatty())
        cm = einfuse.compile(q.model, args, prepare=q.passes(), backend="torch")
        got = embed(cm)
        cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
        rec = {"row": f"minilm {row}", "mean_cos": round(cos.mean().item(), 5), "min_cos": round(cos.min().item(), 5),
               "sentences": len(paras), "fallback": cm.variant.fallback}
        log(rec)
        out.append(rec)
    return out


def generate(checkpoint_scheme: str, calib_segments: int, log) -> None:
    """W4A8KV4 from a checkpoint on disk serving through einfuse.LLM (4-bit paged KV cache): text out."""
    from einfuse.hub import austen_prompts, smollm2
    from einfuse.quant import calibrate, load, save

    model, tok = smollm2()
    _, calibration = texts()
    q = calibrate(model, [calibration], checkpoint_scheme, tokenizer=tok, seq_len=512, segments=calib_segments,
                  progress=sys.stderr.isatty())
    with tempfile.TemporaryDirectory() as d:
        sizes = save(q, d)
        q = load(model, d)
    llm = q.llm(tok, backend="torch")
    prompts = austen_prompts(2)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, max_new_tokens=24)
    states = llm.runner.states
    per_token = sum(t[0, 0].numel() * t.element_size() for t in states.values())
    cfg = model.config
    fp16 = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    log({"generate": checkpoint_scheme, "prompts": prompts, "outputs": outs, "seconds": round(time.perf_counter() - t0, 1),
         "kv_bytes_per_token": per_token, "fp16_kv_bytes_per_token": fp16, "kv_ratio": round(per_token / fp16, 4),
         "checkpoint": sizes})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", default=None)
    ap.add_argument("--segments", type=int, default=16, help="1024-token evaluation segments (the issue: 16)")
    ap.add_argument("--calib-segments", type=int, default=64, help="512-token calibration pieces (the issue: 64)")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--minilm", action="store_true", help="the MiniLM-L6 cosine rows instead")
    ap.add_argument("--sentences", type=int, default=128)
    ap.add_argument("--calib-sentences", type=int, default=256, help="MiniLM: Emma paragraphs to calibrate on")
    ap.add_argument("--generate", default=None, help="serve this scheme from a checkpoint through einfuse.LLM")
    ap.add_argument("--json", default=None, help="append each row as a JSON line to this file")
    a = ap.parse_args()

    def log(rec):
        print(json.dumps(rec), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(rec) + "\n")

    if a.generate:
        generate(a.generate, a.calib_segments, log)
    elif a.minilm:
        minilm_rows(a.rows or ["w8a8-rtn", "w8a8", "w4a8-rtn", "w4a8", "w4a8-had"], a.sentences, a.group, log, a.calib_sentences)
    else:
        smollm2_rows(a.rows or ROWS, a.segments, a.calib_segments, a.group, log)


if __name__ == "__main__":
    main()
