"""Tensor parallelism on every rank of a torchrun job:

    einfuse run-dist --nproc 2 examples/tensor_parallel.py          # or: torchrun --nproc-per-node 2 ...

Each rank compiles its share of a tiny Llama (Megatron's plan, inferred), runs it with gloo (CPU) or NCCL,
and rank 0 compares the logits with the single-process model. The dumps (IR after every pass, with the
all_reduce/all_gather statements, and timeline_rank<r>.json, a Chrome trace for Perfetto) go to
einfuse_dump/tp/."""
import os

import torch

import einfuse
from einfuse.models import tiny_decoder

world = int(os.environ.get("WORLD_SIZE", "1"))
model = tiny_decoder("llama")
ids = torch.randint(1, 256, (1, 16), generator=torch.Generator().manual_seed(0))
cm = einfuse.compile(model, (ids,), backend="torch", dump_dir="einfuse_dump/tp",
                     dist=einfuse.Dist(tp=world, overlap=("split_tokens",)))
with torch.no_grad():
    got, want = cm(ids).logits, model(ids).logits
if int(os.environ.get("RANK", "0")) == 0:
    print(f"tp={world}: max |einfuse - eager| / max |eager| = {float((got - want).abs().max() / want.abs().max()):.2e}")
