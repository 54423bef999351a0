"""Serving under tensor parallelism: each rank runs einfuse.LLM over its share of the compiled prefill and
decode programs (KV cache split by heads); greedy tokens must equal transformers' generate."""
import json
import os
import sys

import torch

import einfuse
from einfuse.models import tiny_decoder
from einfuse.serve import PagedRunner

family = sys.argv[1] if len(sys.argv) > 1 else "llama"
world = int(os.environ["WORLD_SIZE"])
model = tiny_decoder(family)
prompts = [[int(x) for x in torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(n))] for n in (5, 11)]
runner = PagedRunner(model, "torch", dist=einfuse.Dist(tp=world))
llm = einfuse.LLM(model, runner=runner, block_size=4, max_batch_tokens=8)
got = llm.generate(prompts, max_new_tokens=6)
want = []
with torch.no_grad():
    for p in prompts:
        out = model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        want.append(out[0, len(p):].tolist())
states = {k: list(v.shape) for k, v in runner.states.items()}
print(json.dumps({"rank": int(os.environ["RANK"]), "family": family, "got": got, "want": want, "states": states,
                  "prefill_collectives": sum(type(op).__name__ == "Collective" for op in runner.programs.prefill.ir.body),
                  "decode_collectives": sum(type(op).__name__ == "Collective" for op in runner.programs.decode.ir.body)}),
      flush=True)
