"""Layered prefill (issue 11): layer groups, the layered scheduler beside chunked and whole-prompt scheduling,
the layer-group runner, the workload trace, the replay and its H100 step model, the CLI.

The models are transformers' own with random weights (einfuse.models.tiny_decoder); token identity is checked
in float64 (the experts' eager loop: grouped_mm has no f64) so that the different chunkings of the same
arithmetic cannot flip a greedy choice, and against transformers' recomputed forward (EagerRunner).
"""
from __future__ import annotations

import dataclasses
import itertools
import os

import pytest
import torch

from einfuse.models import tiny_decoder
from einfuse.serve import LLM, EagerRunner, SamplingParams, sim
from einfuse.serve.layered import LayeredPrefill, LayerGroupRunner, layer_groups
from einfuse.serve.routing import expert_bytes, expert_geometry

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def moe():
    """A tiny Mixtral: 8 layers, 8 experts top-2, hidden 32, float64."""
    m = tiny_decoder("mixtral", num_hidden_layers=8, num_local_experts=8, num_experts_per_tok=2, hidden_size=32,
                     intermediate_size=64, num_attention_heads=4, num_key_value_heads=2).double()
    m.config._experts_implementation = "eager"
    return m


@pytest.fixture(scope="module")
def mixed_trace():
    return sim.bursty_trace(16, seed=3, rate=400.0, prompt=(4, 80), output=(3, 10))


def test_layer_groups():
    assert layer_groups(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert layer_groups(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert layer_groups(5, 5) == [(i, i + 1) for i in range(5)]
    assert layer_groups(3, 1) == [(0, 3)]
    with pytest.raises(ValueError, match="9 layer groups for a model of 8 layers"):
        layer_groups(8, 9)
    with pytest.raises(ValueError, match="positive integer"):
        layer_groups(8, 0)


def test_policies_token_identical(moe, mixed_trace):
    """none / chunked / layered (G=4 and G=8) on a mixed trace of 16 requests: the same tokens, which are
    transformers' own (EagerRunner recomputes every sequence from its tokens)."""
    results = {p: sim.replay(moe, mixed_trace, p, groups=4, max_batch_tokens=24) for p in sim.POLICIES}
    outs = {k: [r.output for r in res.requests] for k, res in results.items()}
    assert all(len(o) == r.output_len for o, r in zip(outs["none"], results["none"].requests))
    for k, out in outs.items():
        assert out == outs["none"], k
    # the layered runs did advance prefills group by group, interleaved with decodes
    lay = results["layered"].steps
    assert sum(s.group_passes for s in lay) >= 12
    assert any(s.group_passes and s.decode_tokens for s in lay)
    # and the tokens are transformers': a few requests through the recomputing reference runner
    prompts = sim.prompt_ids(sorted(mixed_trace, key=lambda r: r.arrival), moe.config.vocab_size)[:3]
    lens = [r.output_len for r in results["none"].requests[:3]]
    ref = LLM(moe, runner=EagerRunner(moe), scheduler="none", max_batch_tokens=128, num_blocks=64)
    ids = [ref.add_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p, n in zip(prompts, lens)]
    done = {}
    while ref.has_unfinished():
        done.update({o.request_id: o.token_ids for o in ref.step()})
    assert [done[i] for i in ids] == outs["none"][:3]


def test_layered_saves_expert_loads_and_time(moe):
    """One long prompt beside running decodes: chunked sends every chunk through every layer (all experts of
    every layer, every step); layered loads a layer's experts for the prompt once. Expert bytes per generated
    token fall, the modelled TTFT falls, and no step is longer than chunked's longest."""
    trace = [sim.TraceRequest(0.0, 6, 30), sim.TraceRequest(0.0, 5, 30), sim.TraceRequest(1e-5, 160, 4)]
    c = sim.replay(moe, trace, "chunked", max_batch_tokens=20)
    lay = sim.replay(moe, trace, "layered", groups=4, max_batch_tokens=20)
    assert [r.output for r in c.requests] == [r.output for r in lay.requests]
    mc, ml = c.metrics(), lay.metrics()
    assert ml["expert_bytes_per_token"] < 0.88 * mc["expert_bytes_per_token"]
    assert ml["ttft_mean"] < mc["ttft_mean"]
    assert ml["tbt_p99"] <= mc["tbt_p99"]
    assert max(s.model_s for s in lay.steps) <= max(s.model_s for s in c.steps)


def test_one_group_is_chunked_prefill(moe, mixed_trace):
    """G=1: a segment passes the whole model in one step, as a chunk does — the same steps and expert bytes.
    G=8 (one layer per group, as many groups as layers): the same tokens."""
    a = sim.replay(moe, mixed_trace[:6], "chunked", max_batch_tokens=16)
    b = sim.replay(moe, mixed_trace[:6], "layered", groups=1, max_batch_tokens=16)
    assert [(s.prefill_tokens, s.decode_tokens, s.expert_bytes) for s in a.steps] == \
           [(s.prefill_tokens, s.decode_tokens, s.expert_bytes) for s in b.steps]
    c = sim.replay(moe, mixed_trace[:6], "layered", groups=8, max_batch_tokens=16)
    assert [r.output for r in c.requests] == [r.output for r in a.requests]
    assert any(s.group_passes for s in c.steps)


def test_step_model_counts_activated_experts(moe):
    """The H100 step model: expert bytes are (activated experts) x (one expert's bf16 bytes); a step whose
    tokens activate fewer experts is cheaper; the model time is at least each kernel's launch."""
    geo = expert_geometry(moe)
    assert geo.layers == {i: 8 for i in range(8)} and geo.top_k == 2
    one = 3 * 32 * 64  # gate, up, down of one expert
    assert geo.expert_bytes == 2 * one
    assert expert_bytes({0: {1, 2}, 3: {0, 1, 2, 3, 4}}, geo) == 7 * 2 * one
    model = sim.StepCostModel(moe.config, geo)
    entry = sim.StepEntry(0, (5,), 10, (0,), True)
    few = model.step([entry], {i: {0, 1} for i in range(8)})
    many = model.step([entry], {i: set(range(8)) for i in range(8)})
    assert few.expert_bytes == 16 * 2 * one and many.expert_bytes == 64 * 2 * one
    assert few.seconds < many.seconds
    assert few.seconds >= few.kernels * sim.LAUNCH_S


class _ScriptedRunner:
    """Runs nothing: every sampled row prefers token 7; checks the layer ranges arrive in order per request."""
    runs_layer_groups = True

    def __init__(self, layers):
        self.layers, self.next = layers, {}

    def bind(self, cache):
        self.cache = cache

    def release(self, request_id, blocks):
        self.next.pop(request_id, None)

    def step(self, entries):
        for e in entries:
            lo, hi = e.layers or (0, self.layers)
            assert lo == self.next.get(e.request_id, 0), (e, self.next)
            self.next[e.request_id] = hi % self.layers
        rows = torch.zeros(len(entries), 16)
        rows[:, 7] = 1
        return rows


@pytest.mark.parametrize("policy", ["chunked", "layered"])
def test_no_starvation(policy):
    """A long prompt arrives behind 40 short requests, and short requests keep arriving every step: the long
    one still finishes (first come, first served), and so does everything else."""
    model = tiny_decoder("llama", vocab=16, num_hidden_layers=4)
    sched = sim.make_policy(policy, 4, 2, max_batch_tokens=12, max_running=6)
    llm = LLM(model, scheduler=sched, runner=_ScriptedRunner(4), num_blocks=64, block_size=4)
    for _ in range(40):
        llm.add_request([1, 2, 3], max_new_tokens=3, ignore_eos=True)
    long_id = llm.add_request(list(range(1, 16)) * 8, max_new_tokens=2, ignore_eos=True)
    finished, steps = {}, 0
    while llm.has_unfinished():
        if steps < 300:
            llm.add_request([4, 5], max_new_tokens=2, ignore_eos=True)
        finished.update({o.request_id: o for o in llm.step()})
        steps += 1
        assert steps < 2000
    assert long_id in finished and len(finished[long_id].token_ids) == 2
    assert len(finished) == 41 + 300


def test_bad_input(moe, tmp_path):
    with pytest.raises(ValueError, match="9 layer groups for a model of 8 layers"):
        sim.replay(moe, [sim.TraceRequest(0.0, 4, 2)], "layered", groups=9)
    with pytest.raises(ValueError, match="token budget of 4 is smaller than one decode batch of 8"):
        sim.make_policy("chunked", 8, 4, max_batch_tokens=4, max_running=8)
    with pytest.raises(ValueError, match="token budget of 4 is smaller than one decode batch"):
        LayeredPrefill(8, 4, max_batch_tokens=4, max_running=5)
    with pytest.raises(ValueError, match="unknown policy 'sarathi'"):
        sim.make_policy("sarathi", 8, 4, 64)
    with pytest.raises(ValueError, match="runs whole models only.*LayerGroupRunner"):
        LLM(moe, runner=EagerRunner(moe), scheduler=LayeredPrefill(8, 4, 64))
    with pytest.raises(ValueError, match="made for 4 layers; the model has 8"):
        LLM(moe, runner=LayerGroupRunner(moe), scheduler=LayeredPrefill(4, 2, 64))
    good = '{"arrival": 0.5, "prompt_len": 8, "output_len": 4}'
    cases = {
        "not JSON": "{arrival: 1}",
        "a JSON object is expected": "[1, 2]",
        "missing 'output_len'": '{"arrival": 0, "prompt_len": 3}',
        "'prompt_len' must be a number": '{"arrival": 0, "prompt_len": "3", "output_len": 2}',
        "'arrival' = -1 is out of range": '{"arrival": -1, "prompt_len": 3, "output_len": 2}',
        "'output_len' = 0 is out of range": '{"arrival": 0, "prompt_len": 3, "output_len": 0}',
        "unknown field": '{"arrival": 0, "prompt_len": 3, "output_len": 2, "prio": 1}',
        "'prompt' has 2 tokens but prompt_len is 3": '{"arrival": 0, "prompt_len": 3, "output_len": 2, "prompt": [1, 2]}',
    }
    for why, line in cases.items():
        path = tmp_path / "t.jsonl"
        path.write_text(good + "\n\n" + line + "\n")
        with pytest.raises(ValueError, match=f"line 3: .*{why}" if why != "not JSON" else "line 3: not JSON"):
            sim.read_trace(str(path))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="has no requests"):
        sim.read_trace(str(tmp_path / "empty.jsonl"))


def test_trace_roundtrip_and_shape(tmp_path):
    """Bursty: Gamma gaps with shape 0.5 have a coefficient of variation near sqrt(2) (Poisson: 1); lengths stay
    in range with a long tail (the median well below the mean of the range); JSONL round-trips."""
    tr = sim.bursty_trace(400, seed=1, rate=10.0, prompt=(512, 4096), output=(16, 128))
    gaps = [b.arrival - a.arrival for a, b in itertools.pairwise(tr)]
    mean = sum(gaps) / len(gaps)
    cv = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean
    assert 1.15 < cv < 1.8 and 0.07 < mean < 0.14
    lens = sorted(r.prompt_len for r in tr)
    assert lens[0] >= 512 and lens[-1] <= 4096 and lens[len(lens) // 2] < 1600 and lens[-1] > 3000
    tr[0] = sim.TraceRequest(0.0, 3, 2, (5, 6, 7))
    sim.write_trace(str(tmp_path / "t.jsonl"), tr[:20])
    assert sim.read_trace(str(tmp_path / "t.jsonl")) == sorted(tr[:20], key=lambda r: r.arrival)


def test_dense_model_every_policy():
    """A dense model runs under every policy, token-identical; the report says expert bytes do not apply."""
    model = tiny_decoder("llama", num_hidden_layers=4, hidden_size=32, intermediate_size=64).double()
    trace = sim.bursty_trace(6, seed=2, rate=300.0, prompt=(4, 40), output=(2, 6))
    results = [sim.replay(model, trace, p, groups=2, max_batch_tokens=16) for p in sim.POLICIES]
    assert all([r.output for r in res.requests] == [r.output for r in results[0].requests] for res in results)
    assert all(r.metrics()["expert_bytes"] is None for r in results)
    text = sim.table(results)
    assert "expert bytes: not applicable" in text and "n/a (dense)" in text


def test_shared_expert_model():
    """Qwen2-MoE (routed experts + a sigmoid-gated shared expert): token-identical across policies; expert bytes
    count the routed experts, and the step model also loads the shared expert every step."""
    model = tiny_decoder("qwen2_moe", num_hidden_layers=4).double()
    model.config._experts_implementation = "eager"
    geo = expert_geometry(model)
    assert geo.layers == {i: 4 for i in range(4)} and geo.expert_params == 3 * 64 * 32
    assert geo.shared_params == 3 * 64 * 64 + 64  # its SwiGLU (intermediate 64) and its gate
    trace = sim.bursty_trace(5, seed=2, rate=300.0, prompt=(4, 40), output=(2, 6))
    results = [sim.replay(model, trace, p, groups=2, max_batch_tokens=16) for p in sim.POLICIES]
    assert all([r.output for r in res.requests] == [r.output for r in results[0].requests] for res in results)
    entry = sim.StepEntry(0, (5,), 10, (0,), True)
    with_shared = sim.StepCostModel(model.config, geo).step([entry], {})
    without = sim.StepCostModel(model.config, dataclasses.replace(geo, shared_params=0)).step([entry], {})
    assert with_shared.bytes - without.bytes == 4 * (geo.shared_params * 2 + 3 * 64 * 2)


def test_cli_serve_sim(tmp_path, capsys):
    from einfuse.cli import main

    trace = tmp_path / "t.jsonl"
    sim.write_trace(str(trace), sim.bursty_trace(4, seed=5, rate=500.0, prompt=(4, 30), output=(2, 5)))
    rc = main(["serve-sim", "--policy", "chunked", "--policy", "layered", "--groups", "4", "--trace", str(trace),
               "--layers", "4", "--budget", "16", "--out", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "| layered (G=4) |" in out and "| chunked |" in out and "modelled H100" in out
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "expert_bytes_per_step.png", "tbt_over_time.png", "ttft_cdf.png"]
    (tmp_path / "bad.jsonl").write_text('{"arrival": 0}\n')
    assert main(["serve-sim", "--trace", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "p2")]) == 2
    assert "line 1: missing 'prompt_len'" in capsys.readouterr().err
    assert main(["serve-sim", "--trace", str(trace), "--budget", "4", "--max-running", "8", "--layers", "2"]) == 2
    assert "token budget of 4 is smaller than one decode batch of 8" in capsys.readouterr().err


def test_stages_partition_the_ir(tmp_path):
    """passes.stages: a captured 4-layer Llama cut into 1, 2 and 4 layer-group stages; run in order (each fed
    what earlier stages passed on) they compute exactly what the whole module computes (reference evaluator,
    random inputs); stage g > 0 starts from the hidden state and the per-call values stage 0 made; dumps name
    each stage's layers."""
    from einfuse.frontend.capture import export
    from einfuse.frontend.lower import lower_graph
    from einfuse.ir.evaluator import evaluate, random_inputs
    from einfuse.ir.parser import parse
    from einfuse.passes import PassError
    from einfuse.passes.stages import partition_stages, run_stages

    model = tiny_decoder("llama", num_hidden_layers=4, hidden_size=32, intermediate_size=64)
    cap = export(model, (), {"input_ids": torch.randint(1, 256, (1, 6))})
    low = lower_graph(cap.gm, cap.kinds, "llama")
    inputs = random_inputs(low.module, like=cap.bindings, seed=1)
    want = evaluate(low.module, inputs)
    for groups in (1, 2, 4):
        st = partition_stages(low.module, low.instances, groups)
        assert [s.layers for s in st.stages] == [(g * 4 // groups, (g + 1) * 4 // groups) for g in range(groups)]
        got = run_stages(st, inputs, evaluate)
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert sum(len(s.module.body) for s in st.stages) == len(low.module.body)
        for s in st.stages[1:]:
            hidden = [c for c in s.carried if tuple(s.module.types()[c].shape) == (1, 6, 32)]
            assert len(hidden) == 1  # one hidden state; the rest are positions, rotary tables, the mask
            assert "input_ids" not in {i.name for i in s.module.inputs}
            assert all("layers_0_" not in i.name for i in s.module.inputs if i.kind == "param")
    st = partition_stages(low.module, low.instances, 2)
    text = st.text()
    assert "# stage 0 of 2: layers 0..1 (model.layers.0 .. model.layers.1)" in text
    assert "# stage 1 of 2: layers 2..3" in text
    names = sorted(os.path.basename(p) for p in st.dump(str(tmp_path)))
    assert names == ["stage_0.ir", "stage_1.ir", "stages.ir"]
    for g, s in enumerate(st.stages):  # a dumped stage is IR text that parses back to the same module
        assert parse((tmp_path / f"stage_{g}.ir").read_text()) == s.module
    with pytest.raises(ValueError, match="5 layer groups for a model of 4 layers"):
        partition_stages(low.module, low.instances, 5)
    with pytest.raises(PassError, match="no layers"):
        partition_stages(low.module, [], 2)


def test_step_model_flops_match_the_ir():
    """The H100 step model's FLOPs for a dense prefill step (64 tokens through a 2-layer Llama, hidden 512, LM
    head on the last token) are the IR's own count (`ir.cost.statement_flops` over the lowered forward) to
    within what the model leaves out (norms, rotary, softmax and other elementwise work: a few percent)."""
    from einfuse.frontend.capture import export
    from einfuse.frontend.lower import lower_graph
    from einfuse.ir.cost import statement_flops

    model = tiny_decoder("llama", vocab=512, num_hidden_layers=2, hidden_size=512, intermediate_size=1024,
                         num_attention_heads=8, num_key_value_heads=2)
    cap = export(model, (), {"input_ids": torch.randint(1, 512, (1, 64)), "logits_to_keep": 1})
    ir = sum(statement_flops(s) for s in lower_graph(cap.gm, cap.kinds, "llama").module.statements)
    step = sim.StepCostModel(model.config, None).step([sim.StepEntry(0, tuple(range(1, 65)), 0, (0,), True)], {})
    assert 0.93 * ir < step.flops <= ir


def test_route_only_replay_matches_real_compute(moe, mixed_trace):
    """The route-only replay (benchmarks/bench_layered.py: the model's tokens and routing recorded once with
    transformers' generate, then replayed) gives the same outputs and the same expert bytes in every step as
    running the model layer group by layer group under the same policy."""
    trace = mixed_trace[:8]
    factory, recorded = sim.route_only_runner(moe, trace)
    for policy in ("chunked", "layered"):
        real = sim.replay(moe, trace, policy, groups=4, max_batch_tokens=24)
        routed = sim.replay(moe, trace, policy, groups=4, max_batch_tokens=24, runner=factory)
        assert [r.output for r in routed.requests] == [r.output for r in real.requests]
        assert [s.expert_bytes for s in routed.steps] == [s.expert_bytes for s in real.steps]
        assert [s.model_s for s in routed.steps] == [s.model_s for s in real.steps]
    assert all(len(tokens) == r.prompt_len + r.output_len for (tokens, _), r in
               zip(recorded, sorted(trace, key=lambda r: r.arrival)))


def test_stages_of_the_serving_prefill_program():
    """The serving prefill program (dynamic batch/tokens specialized to one sequence, keys and values in paged
    cache states written by Update ops: passes.serving.CacheKV) cut into 2 stages: each stage reads and writes
    the cache states of its own layers only, and run in order the stages give the whole program's logits and
    cache contents exactly. (With dynamic sizes lowering does not record layer 0, which declares inputs; it
    falls in with the prologue, in stage 0.)"""
    from einfuse.frontend.capture import export
    from einfuse.frontend.lower import lower_graph
    from einfuse.ir.evaluator import evaluate, random_inputs
    from einfuse.passes import Verify, cleanup_passes, run_pipeline
    from einfuse.passes.serving import CacheKV, Specialize
    from einfuse.passes.stages import partition_stages, run_stages

    model = tiny_decoder("llama", num_hidden_layers=4, hidden_size=32, intermediate_size=64)
    kwargs = {"input_ids": torch.randint(1, 256, (2, 8)), "position_ids": torch.arange(8).expand(2, 8).contiguous(),
              "use_cache": False, "logits_to_keep": 1}
    dim = {0: torch.export.Dim("batch", min=1), 1: torch.export.Dim("tokens", min=1)}
    cap = export(model, (), kwargs, dynamic_shapes={k: dim if k in ("input_ids", "position_ids") else None
                                                     for k in kwargs})
    low = lower_graph(cap.gm, cap.kinds, "llama")
    m = run_pipeline(low.module, [Specialize({"input_ids": {0: 1}}), *cleanup_passes(), CacheKV(4),
                                  *cleanup_passes()], [Verify()])
    st = partition_stages(m, low.instances, 2)
    assert [s.layers for s in st.stages] == [(0, 2), (2, 4)]
    states = [{i.name for i in s.module.inputs if i.kind == "state"} for s in st.stages]
    assert len(states[0]) == len(states[1]) == 4 and not states[0] & states[1]  # K and V of two layers each
    inputs = random_inputs(m, like=cap.bindings, seed=0)
    inputs["block_table"] = torch.arange(inputs["block_table"].numel(), dtype=inputs["block_table"].dtype)[None]
    want = evaluate(m, {k: v.clone() for k, v in inputs.items()})
    got = run_stages(st, {k: v.clone() for k, v in inputs.items()}, evaluate)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_compiled_stage_runner(family):
    """Layered prefill on einfuse's compiled programs: group passes run the serving prefill program's stages
    (passes.stages, torch backend) over the PagedRunner's cache states, everything else its prefill/decode
    programs — the same tokens as compiled chunked prefill and as the eager layer-group runner."""
    from einfuse.serve import PagedRunner
    from einfuse.serve.layered import CompiledLayerGroupRunner

    extra = {"num_local_experts": 8} if family == "mixtral" else {}
    model = tiny_decoder(family, num_hidden_layers=4, hidden_size=32, intermediate_size=64, **extra)
    trace = sim.bursty_trace(8, seed=3, rate=400.0, prompt=(4, 80), output=(3, 10))
    runners = []

    def compiled():
        runners.append(CompiledLayerGroupRunner(model, 2))
        return runners[-1]

    lay = sim.replay(model, trace, "layered", groups=2, max_batch_tokens=24, runner=compiled)
    chunked = sim.replay(model, trace, "chunked", max_batch_tokens=24, runner=lambda: PagedRunner(model))
    eager = sim.replay(model, trace, "layered", groups=2, max_batch_tokens=24)
    assert runners[0].stage_calls >= 4 and sum(s.group_passes for s in lay.steps) >= 2
    assert [r.output for r in lay.requests] == [r.output for r in chunked.requests] == \
           [r.output for r in eager.requests]


def test_layered_preemption(moe):
    """Too few blocks for every prompt at once: layered prefill preempts the newest request when an older one's
    next segment needs blocks, and recomputes it later; every request finishes with the tokens chunked prefill
    (which preempts too) gives."""
    prompts = [[(7 * i + j) % 250 + 1 for j in range(n)] for i, n in enumerate((26, 30, 22, 28))]
    outs = {}
    for name in ("chunked", "layered"):
        sched = sim.make_policy(name, 8, 4, max_batch_tokens=16)
        llm = LLM(moe, scheduler=sched, runner=LayerGroupRunner(moe), block_size=4, num_blocks=16)
        ids = [llm.add_request(p, max_new_tokens=8, ignore_eos=True) for p in prompts]
        done = {}
        while llm.has_unfinished():
            done.update({o.request_id: o for o in llm.step()})
        outs[name] = [done[i].token_ids for i in ids]
        assert sum(done[i].preemptions for i in ids) > 0, name
    assert outs["layered"] == outs["chunked"]


def test_llm_scheduler_by_name(moe):
    """LLM(model, scheduler="layered", backend="eager"): 4 layer groups over the eager layer-group runner, the
    same tokens as chunked prefill over the reference runner."""
    prompts = [[(5 * i + j) % 250 + 1 for j in range(n)] for i, n in enumerate((40, 9, 33))]
    llm = LLM(moe, scheduler="layered", backend="eager", max_batch_tokens=16, num_blocks=64)
    assert isinstance(llm.scheduler, LayeredPrefill) and len(llm.scheduler.groups) == 4
    assert isinstance(llm.runner, LayerGroupRunner)
    ref = LLM(moe, scheduler="chunked", backend="eager", max_batch_tokens=16, num_blocks=64)
    assert llm.generate(prompts, max_new_tokens=4, ignore_eos=True) == \
           ref.generate(prompts, max_new_tokens=4, ignore_eos=True)
