"""Run under torchrun (or tests/test_dist.py's launcher): compile tiny decoders with einfuse.Dist(tp=world)
and compare each rank's logits with the single-process (eager) model; prints one JSON line per model."""
import json
import os
import sys
import time

import torch

import einfuse
from einfuse.ir.collective import Collective, module_wire_bytes
from einfuse.models import tiny_decoder, tiny_gpt2

families = sys.argv[1].split(",")
overlap = tuple(x for x in (sys.argv[2] if len(sys.argv) > 2 else "").split(",") if x)
world = int(os.environ["WORLD_SIZE"])
ep = os.environ.get("EP") == "1"  # expert parallelism instead of tensor parallelism
tp_ep = os.environ.get("TPEP")  # "2x2": tensor and expert parallelism together
for fam in families:
    kv = {"num_key_value_heads": 4} if world == 4 and fam in ("llama", "qwen2") else {}
    model = tiny_gpt2() if fam == "gpt2" else tiny_decoder(fam, **kv)
    tokens = 128 if "overlap_experts" in overlap else 8  # two chunks of the default 64 tokens
    ids = torch.randint(1, 256, (1, tokens), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
    dump = os.environ.get("DUMP_DIR")
    t0 = time.perf_counter()
    tp, ep_ranks = map(int, tp_ep.split("x")) if tp_ep else (1, world) if ep else (world, 1)
    cm = einfuse.compile(model, (ids,), backend="torch", dist=einfuse.Dist(tp=tp, ep=ep_ranks, overlap=overlap),
                         dump_dir=f"{dump}/{fam}" if dump else None)
    with torch.no_grad():
        got = cm(ids).logits
        ids2 = torch.randint(1, 256, (1, tokens), generator=torch.Generator().manual_seed(4))
        got2, want2 = cm(ids2).logits, model(ids2).logits
        # weights changed after the compile: a rank reads its slice of what the model holds now
        if fam == "gpt2":
            model.transformer.h[0].mlp.c_proj.weight.mul_(1.5)  # in place
        elif fam == "mixtral":
            model.model.layers[0].mlp.experts.down_proj.mul_(1.5)  # the stacked experts, split over ranks by EP
        else:
            model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
        got3, want3 = cm(ids).logits, model(ids).logits
        attn = model.transformer.h[0].attn.c_attn if fam == "gpt2" else model.model.layers[0].self_attn.q_proj
        attn.weight = torch.nn.Parameter(torch.randn_like(attn.weight) * attn.weight.std())  # replaced
        got4, want4 = cm(ids).logits, model(ids).logits
    v = cm._variants[0] if hasattr(cm, "_variants") else None
    colls = [op for op in v.ir.body if isinstance(op, Collective)]
    types = v.ir.types()
    wire = module_wire_bytes(v.ir)
    rel = float((got - want).abs().max() / want.abs().max())
    rel2 = float((got2 - want2).abs().max() / want2.abs().max())
    rel3 = float((got3 - want3).abs().max() / want3.abs().max())
    rel4 = float((got4 - want4).abs().max() / want4.abs().max())
    fused = sum(1 for op in v.ir.body if getattr(op, "target", "").endswith(":allreduce_residual_rmsnorm"))
    print(json.dumps({"family": fam, "rank": int(os.environ["RANK"]), "rel": rel, "rel2": rel2, "rel3": rel3, "rel4": rel4,
                      "variants": len(cm._variants), "fused": fused,
                      "collectives": [[c.kind, c.name, [str(d) for d in types[c.src].shape], list(c.ranks)] for c in colls],
                      "wire_bytes": wire, "s": round(time.perf_counter() - t0, 2)}), flush=True)
