"""Train a small Mixtral-style MoE on Jane Austen (byte-level), the real MoE that the QMoE work measures on.

No trained mixture-of-experts ships in any registry reachable here (../shared/DATA.md), so einfuse trains one:
transformers' `MixtralConfig`, 8 experts, top-2, 4 layers, hidden 256, expert intermediate 512, 4 heads (2 KV
heads), byte-level vocabulary (256 symbols: the embedding stays small, so the experts are most of the
parameters), router load-balancing loss 0.02, AdamW 2e-3 (cosine), batch 16 x 256 bytes. Seeded; a wall-clock budget (`--minutes`, default 18) stops it.

Text (einfuse.hub.austen(), never mixed):
  train        Pride and Prejudice, Sense and Sensibility, Northanger Abbey
  calibration  Emma             (TEXT_CALIBRATION; what the compression pass routes through the experts)
  evaluation   Persuasion       (TEXT_EVALUATION; held out from both)

Run: `nice -n 10 python benchmarks/train_moe.py [--minutes 18] [--threads 2]`. The weights go to
`<einfuse cache>/moe/austen-mixtral-s<seed>/` (config.json + model.safetensors), never into the repository;
`load_trained()` reloads them (or trains first when absent).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's einfuse

TEXT_TRAIN = ("prideprejudice", "sensesensibility", "northangerabbey")
TEXT_CALIBRATION = "emma"
TEXT_EVALUATION = "persuasion"
SEQ = 256


def config():
    from transformers import MixtralConfig
    return MixtralConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=8,
                         num_experts_per_tok=2, max_position_embeddings=1024, router_aux_loss_coef=0.02,
                         output_router_logits=False, tie_word_embeddings=False, rms_norm_eps=1e-5,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)


def weights_dir(seed: int = 0) -> str:
    from einfuse.codegen.cache import cache_root
    return os.path.join(cache_root(), "moe", f"austen-mixtral-s{seed}")


def encode(text: str) -> torch.Tensor:
    """Bytes of the text (ASCII after replacing anything else with '?'), as token ids 0..255."""
    return torch.frombuffer(bytearray(text.encode("ascii", "replace")), dtype=torch.uint8).long()


def novel_ids(name: str) -> torch.Tensor:
    from einfuse.hub import austen
    return encode(austen(name)[name])


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, segment: int = SEQ, max_segments: int = 64) -> float:
    """Per-byte perplexity over the first `max_segments` non-overlapping `segment`-byte pieces of `ids`."""
    pieces = ids[: segment * max_segments].view(-1, segment)
    nll, count = 0.0, 0
    for chunk in pieces.split(16):
        logits = model(chunk, use_cache=False).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, 256), chunk[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        count += chunk[:, 1:].numel()
    return math.exp(nll / count)


def train(minutes: float, seed: int = 0, batch: int = 16, lr: float = 2e-3, log=print):
    from transformers import MixtralForCausalLM
    torch.manual_seed(seed)
    model = MixtralForCausalLM._from_config(config(), attn_implementation="sdpa",
                                            experts_implementation="grouped_mm").float()
    data = torch.cat([novel_ids(n) for n in TEXT_TRAIN])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    budget = minutes * 60
    start = time.time()
    step, warm = 0, 30
    model.train()
    while True:
        elapsed = time.time() - start
        if elapsed > budget:
            break
        frac = elapsed / budget
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        starts = torch.randint(0, len(data) - SEQ - 1, (batch,), generator=gen)
        x = torch.stack([data[s:s + SEQ] for s in starts])
        out = model(x, labels=x, output_router_logits=True, use_cache=False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 20 == 0:
            log(f"step {step:5d}  {elapsed / 60:5.1f} min  loss {out.loss.item():.3f}  aux {out.aux_loss.item():.3f}")
    model.eval()
    return model, {"steps": step, "tokens": step * batch * SEQ, "minutes": (time.time() - start) / 60,
                   "seed": seed, "batch": batch, "seq": SEQ, "lr": lr}


def save(model, info: dict, seed: int = 0) -> str:
    from safetensors.torch import save_model
    final = weights_dir(seed)
    tmp = final + f".tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    model.config.save_pretrained(tmp)
    save_model(model, os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(tmp, "train.json"), "w") as f:
        json.dump(info, f, indent=1)
    if os.path.isdir(final):
        import shutil
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_trained(seed: int = 0, minutes: float = 18.0):
    """The trained MoE (eval mode, fp32) and its training record; trains and caches it when absent."""
    from safetensors.torch import load_model
    from transformers import MixtralConfig, MixtralForCausalLM
    path = weights_dir(seed)
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        model, info = train(minutes, seed)
        save(model, info, seed)
    model = MixtralForCausalLM(MixtralConfig.from_pretrained(path)).float().eval()
    load_model(model, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "train.json")) as f:
        info = json.load(f)
    return model, info


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=18.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="sequences of 256 bytes per step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, info = train(args.minutes, args.seed, batch=args.batch)
    info["ppl_eval"] = perplexity(model, novel_ids(TEXT_EVALUATION))
    path = save(model, info, args.seed)
    print(json.dumps(info), "->", path)


if __name__ == "__main__":
    main()
