"""Tensor parallelism and overlap: measured on gloo (CPU) and modelled on 8xH100.

    python benchmarks/bench_dist.py measure [--nproc 2] [--runs 7]
        starts the ranks itself (as torchrun would: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), compiles a
        Llama (hidden 512, 4 layers, 128 tokens) with Dist(tp=N) with and without split_tokens, and reports
        per call the median wall time and the median time rank 0 spent blocked waiting for collectives.
    python benchmarks/bench_dist.py model [--tp 8] [--tokens 2048]
        lowers a Llama-3-8B-shaped model (2 of its layers), shards it for rank 0 of `tp`, and models the
        schedule on 8xH100 (einfuse.dist.cluster): kernels' roofline times, collectives over NVLink, the
        exposed communication with and without split_tokens. A model, not a timing.
    python benchmarks/bench_dist.py measure --ep [--nproc 2] [--runs 7]
        the same measurement for expert parallelism: a Mixtral (hidden 512, 8 experts, top-2, 4 layers, 128
        tokens) with Dist(ep=N), with and without overlap_experts (Comet-style token chunks).
    python benchmarks/bench_dist.py model --ep [--tp 8] [--tokens 2048]
        a Mixtral-8x7B-shaped model (2 of its layers) with its 8 experts over 8 ranks, with and without
        overlap_experts; expert kernels' FLOPs counted for the routed (token, expert) pairs only.

Results go to stdout as JSON (and --out FILE)."""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

MEASURE = {"num_hidden_layers": 4, "hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 8,
           "intermediate_size": 1024}
MODEL = {"num_hidden_layers": 2, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
         "intermediate_size": 14336}
MOE = {"num_local_experts": 8, "num_experts_per_tok": 2}  # Mixtral's routing, for the EP figures
OVERLAP = {False: ("tp", "split_tokens", "llama"), True: ("ep", "overlap_experts", "mixtral")}


def launch(nproc: int, argv: list) -> list:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    procs = []
    for r in range(nproc):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONPATH=ROOT)
        procs.append(subprocess.Popen([sys.executable, __file__, *argv], env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a rank failed: {[p.returncode for p in procs]}")
    return [json.loads(line) for out in outs for line in out.splitlines() if line.startswith("{")]


def rank_main(runs: int, tokens: int, ep: bool) -> None:
    import einfuse
    from einfuse.ir import collective as coll
    from einfuse.models import tiny_decoder

    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    axis, overlap, family = OVERLAP[ep]
    model = tiny_decoder(family, vocab=2048, **MEASURE, **(MOE if ep else {}))
    ids = torch.randint(1, 2048, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    out = {"rank": int(os.environ["RANK"]), "world": world, "tokens": tokens, "family": family}
    compiled = {}
    for label, passes in (("baseline", ()), (overlap, (overlap,))):
        compiled[label] = cm = einfuse.compile(model, (ids,), backend="torch",
                                               dist=einfuse.Dist(**{axis: world}, overlap=passes))
        with torch.no_grad():
            got = cm(ids).logits
            cm(ids)
        out[label] = {"rel_err": float((got - want).abs().max() / want.abs().max()), "walls": [], "blocked": []}
    with torch.no_grad():  # alternate the two programs, so both see the same load on this shared machine
        for _ in range(runs):
            for label, cm in compiled.items():
                coll.ENV.blocked_s = 0.0
                t0 = time.perf_counter()
                cm(ids)
                out[label]["walls"].append(time.perf_counter() - t0)
                out[label]["blocked"].append(coll.ENV.blocked_s)
    for label in compiled:
        r = out[label]
        walls, blocked = r.pop("walls"), r.pop("blocked")
        r.update(wall_ms=round(statistics.median(walls) * 1e3, 3), blocked_ms=round(statistics.median(blocked) * 1e3, 3),
                 blocked_runs_ms=[round(b * 1e3, 3) for b in blocked])
    print(json.dumps(out), flush=True)


def model_main(tp: int, tokens: int, ep: bool, chunks: int = 4) -> dict:
    from einfuse.dist.cluster import H100x8, simulate
    from einfuse.frontend.capture import export
    from einfuse.frontend.lower import lower_graph
    from einfuse.models import tiny_decoder
    from einfuse.passes import run_pipeline
    from einfuse.passes.expert_overlap import OverlapExperts
    from einfuse.passes.overlap import SplitTokens, overlap_pipeline
    from einfuse.passes.sharding import Shard

    axis, overlap, family = OVERLAP[ep]
    with torch.device("meta"):
        model = tiny_decoder(family, vocab=32768, **MODEL, **(MOE if ep else {}))
    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    cap = export(model, (ids,), {})
    lowered = lower_graph(cap.gm, cap.kinds, f"{family}_8b")
    shard = Shard(tuple(range(tp)), 0, "experts" if ep else None, vocab_parallel=not ep)
    sharded = run_pipeline(lowered.module, [shard], [])
    routed = MOE["num_experts_per_tok"] / MOE["num_local_experts"] if ep else 1.0
    out = {"cluster": H100x8.name, axis: tp, "tokens": tokens, "layers": MODEL["num_hidden_layers"], "family": family,
           **({"chunks": chunks} if ep else {})}
    for label, passes in (("baseline", []), (overlap, [OverlapExperts(chunks, min_tokens=1) if ep else SplitTokens()])):
        m = run_pipeline(sharded, passes + overlap_pipeline([p.name for p in passes]), [])
        sim = simulate(m, routed_share=routed)
        by = sim.pop("exposed_by")
        out[label] = {k: round(v * 1e6, 1) for k, v in sim.items()}
        # the layers' collectives, apart from the embedding's all-reduce at the start and the logits'
        # all-gather at the end, which nothing overlaps
        edges = {"embedding", "(end)"} | set(lowered.module.outputs)
        layer = [k for k in by if k.split("__")[0] not in edges]
        out[label]["layers_exposed_s"] = round(sum(by[k] for k in layer) * 1e6, 1)
        out[label]["unit"] = "us"
    for key in ("exposed_s", "layers_exposed_s", "makespan_s"):
        base, split = out["baseline"][key], out[overlap][key]
        out[f"drop_{key}"] = round(1 - split / base, 3) if base else 0.0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["measure", "model", "_rank"])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--ep", action="store_true", help="expert parallelism (Mixtral, overlap_experts)")
    ap.add_argument("--chunks", type=int, default=4, help="overlap_experts' token chunks (model --ep)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.what == "_rank":
        rank_main(a.runs, a.tokens or 128, a.ep)
        return
    if a.what == "measure":
        rows = launch(a.nproc, ["_rank", "--runs", str(a.runs), "--tokens", str(a.tokens or 128)] + (["--ep"] if a.ep else []))
        result = {"measured": "gloo on this CPU (loopback), 1 thread per rank", "ranks": rows}
    else:
        result = model_main(a.tp, a.tokens or 2048, a.ep, a.chunks)
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
