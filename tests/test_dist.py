"""Tensor parallelism on gloo: ranks are processes started like torchrun starts them (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), each compiling with einfuse.Dist; their logits must equal the single-process
model's (f32, 1e-5 relative), the IR must hold exactly the collectives Megatron's plan needs, and the bytes
on the wire must equal the analytic figure. Failures: a rank that dies, ranks with different models, a
world that does not divide the heads."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from einfuse.dist import DistError, check_divides
from einfuse.ir import Collective, Statement, parse
from einfuse.ir.collective import module_wire_bytes
from einfuse.ir.verify import VerifyError, verify
from einfuse.models import tiny_decoder
from einfuse.passes import Verify

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)


def launch(nproc: int, script: str, *args, timeout: float = 240, extra_env: dict | None = None) -> tuple:
    """Run `script` as `nproc` ranks on loopback; returns (return codes, stdout lines, seconds)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    procs = []
    t0 = time.perf_counter()
    for r in range(nproc):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra_env or {}))
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "dist_scripts", script), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        outs.append(out)
    return [p.returncode for p in procs], outs, time.perf_counter() - t0


def results(outs: list) -> list:
    return [json.loads(line) for out in outs for line in out.splitlines() if line.startswith("{")]


def analytic_wire_bytes(layers: int, tokens: int, hidden: int, vocab: int, n: int) -> int:
    """Megatron TP forward: an all-reduce of the hidden state after each row-parallel projection (2 per
    layer) and after the vocabulary-parallel embedding, an all-gather of the logits: ring algorithms."""
    ar = 2 * (n - 1) * tokens * hidden * 4 // n
    return (2 * layers + 1) * ar + (n - 1) * tokens * (vocab // n) * 4


def check_tp(rows: list, n: int, families: list, halves: int = 1) -> None:
    """Logits equal the single-process model's (also after a weight is written in place and one replaced);
    per half of the tokens (split_tokens makes 2), one all-reduce per row-parallel projection and the
    embedding, one all-gather of the logits; the analytic wire bytes."""
    assert sorted({r["family"] for r in rows}) == sorted(families) and len(rows) == n * len(families), rows
    for row in rows:
        assert row["rel"] < 1e-5 and row["rel2"] < 1e-5, row
        # after a weight written in place and one replaced: each rank's slices follow the model
        assert row["rel3"] < 1e-5 and row["rel4"] < 1e-5 and row["variants"] == 1, row
        kinds = [c[0] for c in row["collectives"]]
        assert kinds.count("all_reduce") == halves * (2 * 2 + 1), row["collectives"]
        assert kinds.count("all_gather") == halves and len(kinds) == halves * 6, row["collectives"]
        assert row["wire_bytes"] == analytic_wire_bytes(2, 8, 64, 256, n), row


def test_collectives_run_on_the_group():
    rcs, outs, _ = launch(2, "coll_ops.py")
    assert rcs == [0, 0], outs
    rows = results(outs)
    assert len(rows) == 2
    for row in rows:
        for backend in ("reference", "torch", "triton"):
            assert all(err < 1e-6 for err in row[backend].values()), row


def test_collective_statements_print_parse_verify_and_cost():
    text = """module m
  in x: f32[8, 64]
  y[i, j]: f32[8, 64] = x[i, j] * 2
  z: f32[8, 64] = all_reduce(y, op="sum", ranks=[0, 1])  # here.py:1
  w: f32[8, 128] = all_gather(z, dim=1, ranks=[0, 1])
  out w
"""
    m = parse(text)
    assert isinstance(m.body[1], Collective) and (m.body[1].kind, m.body[1].ranks) == ("all_reduce", (0, 1))
    assert parse(str(m)) == m and str(parse(str(m))) == str(m)
    verify(m)
    assert module_wire_bytes(m) == 2 * 1 * 8 * 64 * 4 // 2 + 1 * 8 * 64 * 4
    with pytest.raises(VerifyError, match="all_gather of f32\\[8, 64\\] over 2 ranks is f32\\[8, 128\\]"):
        verify(parse(text.replace("w: f32[8, 128]", "w: f32[8, 64]")))
    with pytest.raises(VerifyError, match="distinct ranks"):
        verify(parse(text.replace("ranks=[0, 1])  #", "ranks=[1, 1])  #")))


def test_shard_pass_slices_and_split_tokens_interleave():
    """In one process: each rank's module (Megatron plan) has exactly the plan's collectives and its slices
    put back together are the weights; split_tokens keeps one half computing while the other's all-reduce
    is in flight."""
    from einfuse.frontend.capture import export
    from einfuse.frontend.lower import lower_graph
    from einfuse.models import tiny_gpt2
    from einfuse.passes import run_pipeline
    from einfuse.passes.overlap import SplitTokens
    from einfuse.passes.sharding import Shard, slice_tensor

    model = tiny_gpt2()
    cap = export(model, (torch.randint(0, 256, (1, 8)),), {})
    module = lower_graph(cap.gm, cap.kinds, "gpt2").module
    shards = [Shard((0, 1), b) for b in (0, 1)]
    mods = [run_pipeline(module, [sh], [Verify()]) for sh in shards]
    for sh, mod in zip(shards, mods):
        assert sh.gathers == []
        kinds = [op.kind for op in mod.body if isinstance(op, Collective)]
        assert kinds.count("all_reduce") == 5 and kinds.count("all_gather") == 1
    slices = shards[0].slices
    c_attn = next(n for n in slices if n.endswith("c_attn_weight"))
    assert (slices[c_attn].dim, slices[c_attn].outer, slices[c_attn].inner) == (1, 3, 32)  # q, k, v each split
    for name, lay in slices.items():
        full = cap.bindings[name]
        parts = [slice_tensor(full, lay, b) for b in (0, 1)]
        back = torch.stack([p.unflatten(lay.dim, (lay.outer, lay.inner)) for p in parts], lay.dim + 1)
        assert torch.equal(back.flatten(lay.dim, lay.dim + 2), full), name
    split = run_pipeline(mods[0], [SplitTokens()], [Verify()])
    body = split.body
    pos = {op.outputs[0]: n for n, op in enumerate(body)}
    ar0 = next(op for op in body if isinstance(op, Collective) and op.name.endswith("__t0") and "addmm" in op.name)
    first_read = min(n for n, op in enumerate(body) if ar0.name in op.reads())
    between = [op for op in body[pos[ar0.name] + 1:first_read] if isinstance(op, Statement)]
    assert any(op.name.endswith("__t1") for op in between), [op.outputs[0] for op in body[pos[ar0.name]:first_read]]


def test_tp2_llama_equal_single_process(tmp_path):
    rcs, outs, _ = launch(2, "tp_models.py", "llama", extra_env={"DUMP_DIR": str(tmp_path)})
    assert rcs == [0, 0], outs
    check_tp(results(outs), 2, ["llama"])
    # the dumps show the collectives; each rank wrote a Chrome trace with steps, collectives and waits
    first = (tmp_path / "llama" / "00_lower.ir").read_text()
    assert first.count("= all_reduce(") == 5 and first.count("= all_gather(") == 1, first
    for r in (0, 1):
        trace = json.loads((tmp_path / "llama" / f"timeline_rank{r}.json").read_text())["traceEvents"]
        cats = {e.get("cat") for e in trace}
        assert {"statement", "all_reduce", "all_gather", "wait"} <= cats, cats
        assert all(e["dur"] >= 0 for e in trace if e.get("ph") == "X")


@pytest.mark.slow
def test_tp2_serving_prefill_and_decode_match_transformers():
    """einfuse.LLM over each rank's share of the prefill and decode programs (KV cache split by heads):
    greedy tokens equal transformers' generate on every rank."""
    rcs, outs, _ = launch(2, "tp_serve.py", "llama")
    assert rcs == [0, 0], outs
    rows = results(outs)
    assert len(rows) == 2
    for row in rows:
        assert row["got"] == row["want"], row
        # 2 KV heads of 16: one per rank; values [.., 32] -> 16 per rank
        assert all(shape[2] == (1 if len(shape) == 4 else 16) for shape in row["states"].values()), row["states"]
        assert row["prefill_collectives"] == row["decode_collectives"] == 6, row


@pytest.mark.slow
def test_tp2_gpt2_qwen2_equal_single_process():
    rcs, outs, _ = launch(2, "tp_models.py", "gpt2,qwen2")
    assert rcs == [0, 0], outs
    check_tp(results(outs), 2, ["gpt2", "qwen2"])


@pytest.mark.slow
def test_tp2_split_tokens_equal_single_process():
    rcs, outs, _ = launch(2, "tp_models.py", "llama,gpt2,qwen2", "split_tokens")
    assert rcs == [0, 0], outs
    check_tp(results(outs), 2, ["llama", "gpt2", "qwen2"], halves=2)


@pytest.mark.slow
def test_tp2_every_overlap_pass_equal_single_process():
    """split_tokens and the all-reduce + residual + RMSNorm call together: the same logits; every all-reduce
    that feeds an RMSNorm (2 per layer, per half) became the fused call (GPT-2's LayerNorm is left alone)."""
    rcs, outs, _ = launch(2, "tp_models.py", "llama,gpt2,qwen2", "split_tokens,allreduce_rmsnorm")
    assert rcs == [0, 0], outs
    rows = results(outs)
    assert len(rows) == 6
    for row in rows:
        assert row["rel"] < 1e-5 and row["rel2"] < 1e-5, row
        assert row["fused"] == (0 if row["family"] == "gpt2" else 2 * 2 * 2), row


def test_fused_allreduce_rmsnorm_kernel_compiles_for_sm80_sm90():
    from einfuse.dist.fused import aot_check

    for r in aot_check(archs=(80, 90), world=8, hidden=4096):
        assert r.ok and r.spills == 0, r


def _collectives_as_copies(m):
    """`m` with every collective a plain copy of its source (one rank's arithmetic, no process group)."""
    from einfuse.ir import index as ix
    from einfuse.ir.expr import Access

    body = []
    for op in m.body:
        if isinstance(op, Collective):
            rs = tuple(ix.rank(f"d{d}") for d in range(op.type.rank))
            op = Statement(op.name, op.type, rs, Access(op.src, rs))
        body.append(op)
    return m.replace(body=tuple(body))


def test_overlap_experts_chunks_the_combine_and_keeps_the_numbers():
    """Comet-style: with experts split over 2 ranks, each layer's experts chain and its all-reduce become 4
    chunks of 2 tokens; chunk c's all-reduce is issued before chunk c+1's expert GEMMs and only the join
    waits for it. Each chunk is still one MoE kernel pair, and the result equals the unchunked module
    (evaluator, and the Triton kernels under the interpreter)."""
    from einfuse.frontend.capture import export
    from einfuse.frontend.lower import lower_graph
    from einfuse.ir.evaluator import evaluate, random_inputs
    from einfuse.passes import default_pipeline, run_pipeline
    from einfuse.passes.expert_overlap import OverlapExperts
    from einfuse.passes.sharding import Shard
    from einfuse.runtime import backends

    model = tiny_decoder("mixtral", num_hidden_layers=2)
    cap = export(model, (torch.randint(1, 256, (1, 8)),), {})
    sharded = run_pipeline(lower_graph(cap.gm, cap.kinds, "mixtral").module,
                           [Shard((0, 1), 0, "experts", vocab_parallel=False)], [Verify()])
    assert [op.kind for op in sharded.body if isinstance(op, Collective)] == ["all_reduce"] * 2
    chunked = run_pipeline(sharded, [OverlapExperts(chunks=4, min_tokens=2)], [Verify()])
    body, pos = chunked.body, {op.outputs[0]: n for n, op in enumerate(chunked.body)}
    reduces = [op for op in body if isinstance(op, Collective)]
    assert len(reduces) == 8 and all(op.type.shape[0] == 2 for op in reduces)
    for ar in reduces:
        readers = [op for op in body if ar.name in op.reads()]
        assert len(readers) == 1 and readers[0].name in ("moe_out", "moe_out_1"), ar.name  # only the join waits
        c = int(ar.name[-1])
        if c < 3:  # the next chunk's expert GEMMs are issued while this all-reduce is in flight
            nxt = ar.name[:-1] + str(c + 1)
            assert pos[ar.name] < pos[nxt.replace("moe_out", "moe_up")] < pos[nxt] < pos[readers[0].name]
    inputs = random_inputs(sharded, seed=3)
    want = evaluate(_collectives_as_copies(sharded), inputs)
    got = evaluate(_collectives_as_copies(chunked), inputs)
    assert want.keys() == got.keys()
    for k in want:
        assert float((got[k] - want[k]).abs().max() / want[k].abs().max()) < 1e-5, k
    final = run_pipeline(_collectives_as_copies(chunked), default_pipeline(), [Verify()])
    assert sum(1 for k in final.kernels if k.kind == "moe") == 2 * 2 * 4  # two kernels per chunk and layer
    triton = backends.build("triton", final)(inputs)
    for k in want:
        assert float((triton[k] - want[k]).abs().max() / want[k].abs().max()) < 1e-5, k
    other = run_pipeline(lower_graph(cap.gm, cap.kinds, "mixtral").module,  # experts 2 and 3: gw[t, e + 2]
                         [Shard((0, 1), 1, "experts", vocab_parallel=False), OverlapExperts(chunks=4, min_tokens=2)],
                         [Verify()])
    assert sum(isinstance(op, Collective) for op in other.body) == 8  # the ranks' collectives must match
    other = run_pipeline(_collectives_as_copies(other), default_pipeline(), [Verify()])
    assert sum(1 for k in other.kernels if k.kind == "moe") == 2 * 2 * 4
    three = run_pipeline(sharded, [OverlapExperts(chunks=3, min_tokens=2)], [Verify()])  # 8 tokens: 2 chunks of 4
    assert sum(isinstance(op, Collective) for op in three.body) == 4
    small = run_pipeline(sharded, [OverlapExperts(chunks=4, min_tokens=3)], [Verify()])  # 4 tokens each at most
    assert sum(isinstance(op, Collective) for op in small.body) == 4
    assert run_pipeline(sharded, [OverlapExperts()], [Verify()]) is sharded  # 8 tokens: below the default chunk

@pytest.mark.slow
def test_ep2_mixtral_equal_single_process():
    """Experts split over 2 ranks (2 of 4 each): one all-reduce per layer sums the experts' weighted outputs."""
    rcs, outs, _ = launch(2, "tp_models.py", "mixtral", extra_env={"EP": "1"})
    assert rcs == [0, 0], outs
    rows = results(outs)
    assert len(rows) == 2
    for row in rows:
        assert row["rel"] < 1e-5 and row["rel2"] < 1e-5, row
        assert row["rel3"] < 1e-5 and row["rel4"] < 1e-5 and row["variants"] == 1, row  # weights changed after
        assert [c[0] for c in row["collectives"]] == ["all_reduce"] * 2, row
        assert row["wire_bytes"] == 2 * (2 * 1 * 8 * 64 * 4 // 2), row


def test_ep2_mixtral_overlap_experts_equal_single_process():
    """Experts over 2 ranks with overlap_experts: each layer's combine is 2 all-reduces of 64 tokens, issued
    while the other chunk computes; logits equal the single process (prefill of 128 tokens), and after the
    weights change."""
    rcs, outs, _ = launch(2, "tp_models.py", "mixtral", "overlap_experts", extra_env={"EP": "1"})
    assert rcs == [0, 0], outs
    rows = results(outs)
    assert len(rows) == 2
    for row in rows:
        assert max(row["rel"], row["rel2"], row["rel3"], row["rel4"]) < 1e-5, row
        assert [(c[0], c[2]) for c in row["collectives"]] == [("all_reduce", ["64", "64"])] * 4, row
        assert row["wire_bytes"] == 2 * (2 * 128 * 64 * 4 // 2), row  # the same bytes as one all-reduce per layer

def test_tp2_ep2_mixtral_on_four_ranks_equal_single_process():
    """Tensor and expert parallelism in one job (4 ranks): attention and the embedding split over ranks
    {0, 1} and {2, 3}, the experts over {0, 2} and {1, 3}; each layer all-reduces the attention output in
    its tp group and the experts' combine in its ep group. Logits equal the single process."""
    rcs, outs, _ = launch(4, "tp_models.py", "mixtral", extra_env={"TPEP": "2x2"}, timeout=600)
    assert rcs == [0] * 4, outs
    rows = results(outs)
    assert len(rows) == 4
    for row in rows:
        assert max(row["rel"], row["rel2"], row["rel3"], row["rel4"]) < 1e-5, row
        tp = [0, 1] if row["rank"] < 2 else [2, 3]
        ep = [row["rank"] % 2, row["rank"] % 2 + 2]
        by_group = [(c[0], c[3]) for c in row["collectives"]]
        assert by_group.count(("all_reduce", ep)) == 2, by_group  # one combine per MoE layer
        assert by_group.count(("all_reduce", tp)) == 2 + 1 and by_group.count(("all_gather", tp)) == 1, by_group

@pytest.mark.slow
def test_tp4_equal_single_process():
    rcs, outs, _ = launch(4, "tp_models.py", "llama,gpt2,qwen2", timeout=900)
    assert rcs == [0] * 4, outs
    check_tp(results(outs), 4, ["llama", "gpt2", "qwen2"])


@pytest.mark.slow
def test_dead_rank_named_within_60s():
    rcs, outs, _ = launch(2, "fail_cases.py", "kill", timeout=180)
    assert rcs[1] != 0 and rcs[0] == 3, outs
    err = next(line for line in outs[0].splitlines() if line.startswith("ERROR rank 0"))
    assert "rank 1 stopped responding" in err and "einfuse" in err, err
    killed = float(next(line for line in outs[1].splitlines() if line.startswith("KILLED")).split()[1])
    assert float(err.split()[4].rstrip(":")) - killed < 60, (err, killed)


@pytest.mark.slow
def test_hung_rank_named_after_the_timeout():
    """Rank 1 stops issuing collectives but stays alive: rank 0's collective times out (Dist(timeout_s=15))
    and the error names rank 1 as behind (its heartbeat publishes how many collectives it issued)."""
    rcs, outs, _ = launch(2, "fail_cases.py", "hang", timeout=240)
    assert rcs[0] == 3, outs
    err = next(line for line in outs[0].splitlines() if line.startswith("ERROR rank 0"))
    assert "rank 1 (" in err and "is alive but behind" in err, err
    hung = float(next(line for line in outs[1].splitlines() if line.startswith("HANGS")).split()[1])
    assert float(err.split()[4].rstrip(":")) - hung < 60, (err, hung)


def test_mismatched_models_fail_at_start():
    rcs, outs, _ = launch(2, "fail_cases.py", "mismatch", timeout=180)
    assert rcs == [3, 3], outs
    for out in outs:
        assert "rank(s) 1 differ from rank 0 in their model" in out, out


@pytest.mark.slow
def test_mismatched_weights_fail_at_start():
    rcs, outs, _ = launch(2, "fail_cases.py", "weights", timeout=180)
    assert rcs == [3, 3], outs
    for out in outs:
        assert "rank(s) 1 differ from rank 0 in their weights" in out, out


def test_world_that_does_not_divide_heads_is_a_compile_time_error():
    cfg = tiny_decoder("llama").config
    with pytest.raises(DistError, match="cannot split 4 attention heads"):
        check_divides(cfg, 3)
    from einfuse.frontend.capture import export
    from einfuse.frontend.lower import lower_graph
    from einfuse.passes.sharding import Shard, ShardingError

    model = tiny_decoder("llama")
    cap = export(model, (torch.randint(0, 256, (1, 8)),), {})
    lowered = lower_graph(cap.gm, cap.kinds, "llama")
    with pytest.raises(ShardingError, match="q_proj.*over 3 ranks"):
        Shard((0, 1, 2), 0).run(lowered.module)
