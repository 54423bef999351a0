"""Each collective statement, run by the reference evaluator and by the torch backend (async + wait), against
the values computed by hand (and through the Triton backend's kernels, which run collectives
synchronously) from every rank's input (each rank makes all ranks' inputs from their seeds)."""
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend's kernels under the interpreter on CPU

import torch
import torch.distributed as dist

from einfuse.ir import parse
from einfuse.ir.evaluator import evaluate
from einfuse.runtime.torch_backend import torch_backend
from einfuse.runtime.triton_backend import triton_backend

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
ranks = list(range(world))
m = parse(f"""module colls
  in x: f32[4, 6]
  y[i, j]: f32[4, 6] = x[i, j] * 2
  s: f32[4, 6] = all_reduce(y, op="sum", ranks={ranks})
  mx: f32[4, 6] = all_reduce(y, op="max", ranks={ranks})
  g: f32[4, {6 * world}] = all_gather(y, dim=1, ranks={ranks})
  rs: f32[{4 // world}, 6] = reduce_scatter(y, op="sum", dim=0, ranks={ranks})
  a: f32[4, 6] = all_to_all(y, dim=0, ranks={ranks})
  out s, mx, g, rs, a
""")
xs = [torch.randn(4, 6, generator=torch.Generator().manual_seed(r)) for r in ranks]
ys = [x * 2 for x in xs]
want = {"s": sum(ys), "mx": torch.stack(ys).amax(0), "g": torch.cat(ys, 1),
        "rs": sum(ys).chunk(world, 0)[rank],
        "a": torch.cat([y.chunk(world, 0)[rank] for y in ys], 0)}
out = {}
for label, run in (("reference", lambda inp: evaluate(m, inp)), ("torch", torch_backend(m)),
                   ("triton", triton_backend(m))):
    got = run({"x": xs[rank]})
    out[label] = {k: float((got[k] - want[k]).abs().max()) for k in want}
print(json.dumps({"rank": rank, **out}), flush=True)
dist.destroy_process_group()
