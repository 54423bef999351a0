"""The compiled paged runner (einfuse/serve/paged.py): `einfuse.LLM` serving from einfuse's own prefill and
decode programs over a paged KV cache, against transformers' greedy `generate` token for token — five
families on the torch backend, under Triton's interpreter — plus staggered arrivals, preemption, replaced
weights, one compile per program over 200 steps, StreamingLLM eviction against eager attention with the
same visibility, CUDA-graph bucket bookkeeping with the CUDA calls replaced, and decode bytes per step."""
from __future__ import annotations

import contextlib

import pytest
import torch

import einfuse.api
from einfuse.models import tiny_decoder, tiny_gpt2
from einfuse.runtime import backends
from einfuse.runtime.graphs import GraphReplay
from einfuse.serve import DEAD, LLM, CacheConfig, CachePolicy, StepEntry
from einfuse.serve.paged import PagedRunner, bucket

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_einfuse_cache")

FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "mixtral"]  # mistral's window (6) is shorter than the sequences
_MODELS: dict = {}


def model_of(family: str):
    if family not in _MODELS:
        _MODELS[family] = tiny_gpt2(seed=0) if family == "gpt2" else tiny_decoder(family)
    return _MODELS[family]


def random_prompts(lengths, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


_REFERENCE: dict = {}


def hf_greedy(model, prompt, n):
    """transformers' greedy `generate` of one prompt alone: its new tokens."""
    key = (id(model), tuple(prompt), n)
    if key not in _REFERENCE:
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=0)
        _REFERENCE[key] = out[0, len(prompt):].tolist()
    return _REFERENCE[key]


def assert_greedy(model, prompt, got, n):
    """`got` is transformers' greedy continuation — or first differs at a near-tie: the reference's top-2
    logits there within 1e-4 (relative) and `got`'s token one of them (batching changes summation order)."""
    ref = hf_greedy(model, prompt, n)
    if got == ref:
        return
    i = next((k for k, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    assert i < min(len(got), len(ref)), f"lengths differ: {len(got)} tokens, transformers {len(ref)}"
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ref[:i]]), use_cache=False).logits[0, -1].double()
    top = logits.topk(2)
    gap = float((top.values[0] - top.values[1]) / top.values[0].abs().clamp_min(1e-12))
    assert gap < 1e-4 and got[i] in top.indices.tolist(), (
        f"token {i} differs ({got[i]} vs {ref[i]}) and is no near-tie: top-2 gap {gap:.2e}")


# ------------------------------------------------------------------------------------- against transformers

@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_torch_backend(family):
    model = model_of(family)
    prompts = random_prompts([1, 6, 13, 29])
    llm = LLM(model, backend="torch", max_batch_tokens=12, block_size=4)
    assert isinstance(llm.runner, PagedRunner)
    outs = llm.generate(prompts, max_new_tokens=64)
    for p, o in zip(prompts, outs):
        assert_greedy(model, p, o, 64)
    # the 29-token prompt was prefilled in chunks beside decodes; decodes were batched
    assert llm.runner.calls["prefill"] >= 5 and llm.runner.calls["decode"] >= 64
    assert llm.blocks.blocks_in_use == 0


@pytest.mark.parametrize("family", ["llama", pytest.param("mistral", marks=pytest.mark.slow),
                                    pytest.param("qwen2", marks=pytest.mark.slow),
                                    pytest.param("gpt2", marks=pytest.mark.slow),
                                    pytest.param("mixtral", marks=pytest.mark.slow)])
def test_greedy_matches_transformers_triton_interpreter(family):
    model = model_of(family)
    prompts = random_prompts([1, 6, 13, 29], seed=1)
    llm = LLM(model, backend="triton", max_batch_tokens=12, block_size=4)
    outs = llm.generate(prompts, max_new_tokens=16)
    for p, o in zip(prompts, outs):
        assert_greedy(model, p, o, 16)


def test_staggered_arrivals_and_preemption_each_as_alone():
    """8 requests arriving at steps 0..7 give what each gives alone; with too few blocks requests are
    preempted (recomputed from their first token) and still give the same tokens; all blocks come back."""
    model = model_of("llama")
    prompts = random_prompts([3, 9, 1, 17, 5, 12, 2, 8], seed=2)
    for num_blocks, preempts in ((None, False), (14, True)):
        llm = LLM(model, backend="torch", max_batch_tokens=16, block_size=4, num_blocks=num_blocks)
        ids, done = [], {}
        for step in range(400):
            if step < len(prompts):
                ids.append(llm.add_request(prompts[step], max_new_tokens=20))
            for out in llm.step():
                done[out.request_id] = out
            if len(done) == len(prompts):
                break
        for i, p in zip(ids, prompts):
            assert_greedy(model, p, done[i].token_ids, 20)
        assert (sum(o.preemptions for o in done.values()) > 0) == preempts
        assert llm.blocks.blocks_in_use == 0 and not llm.has_unfinished()


def test_one_compile_per_program_over_200_steps(monkeypatch):
    """Growing context, changing batch and table widths: nothing is captured, lowered or generated again
    after the runner is bound."""
    model = tiny_decoder("llama", seed=3)
    model.generation_config.eos_token_id = None  # 200 tokens, no stop
    llm = LLM(model, backend="torch", max_batch_tokens=16, block_size=4)
    compiles = []
    monkeypatch.setattr(einfuse.api.Driver, "build", lambda *a, **k: compiles.append("build"))
    monkeypatch.setattr(backends, "build", lambda *a, **k: compiles.append("backend"))
    prompts = random_prompts([5, 2], seed=3)
    outs = llm.generate(prompts, max_new_tokens=200)
    assert [len(o) for o in outs] == [200, 200] and compiles == []
    assert llm.runner.calls["decode"] >= 199
    assert_greedy(model, prompts[0], outs[0], 200)


def test_replaced_weights_are_read():
    """A second LLM of the same model reuses its programs (no capture) but reads the weights the model has
    now; a changed shape is a clear error."""
    model = tiny_decoder("llama", seed=4)
    prompt = random_prompts([7], seed=4)[0]
    first = LLM(model, backend="torch", block_size=4)
    assert first.generate(prompt, max_new_tokens=8) == hf_greedy(model, prompt, 8)
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    _REFERENCE.clear()
    second = LLM(model, backend="torch", block_size=4)
    assert second.runner.programs is first.runner.programs
    assert second.generate(prompt, max_new_tokens=8) == hf_greedy(model, prompt, 8)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(256, 32))
    with pytest.raises(RuntimeError, match="einfuse: lm_head.weight is now"):
        LLM(model, backend="torch", block_size=4)


def test_a_second_model_of_the_same_shape_starts_from_the_disk_cache():
    """Another model object of the same class, config and tensor shapes skips the capture (the programs come
    from the disk cache) and computes with its own weights and the capture's constants."""
    first, second = tiny_decoder("llama", seed=7), tiny_decoder("llama", seed=8)
    prompt = random_prompts([6], seed=7)[0]
    assert LLM(first, backend="torch", block_size=8).generate(prompt, max_new_tokens=8) == hf_greedy(first, prompt, 8)
    llm = LLM(second, backend="torch", block_size=8)
    assert llm.runner.programs.decode.timings[0]["pass"] == "serving cache hit"
    assert llm.generate(prompt, max_new_tokens=8) == hf_greedy(second, prompt, 8) != hf_greedy(first, prompt, 8)


# ----------------------------------------------------------------------------------- StreamingLLM eviction

class Recorder(PagedRunner):
    """The compiled runner, keeping every step's entries and the logits it returned."""

    def __init__(self, model, backend):
        super().__init__(model, backend)
        self.log = []

    def step(self, entries):
        out = super().step(entries)
        self.log.append((list(entries), out.clone()))
        return out


def test_streaming_llm_attends_to_sinks_and_window_only():
    """Under StreamingLLM a query attends to the live blocks of its table (sinks + window), never an
    evicted one: each sampled row equals eager PyTorch given, per query, exactly the positions its step's
    table kept (a 4-D attention mask) — and differs from full attention."""
    model = model_of("llama")
    prompt = random_prompts([10], seed=5)[0]
    runner = Recorder(model, "torch")
    llm = LLM(model, block_size=2, num_blocks=8, max_batch_tokens=4, runner=runner,
              cache_policy=CachePolicy(window=6, sink_tokens=2))
    tokens = prompt + llm.generate(prompt, max_new_tokens=24)
    n = len(tokens) - 1  # the last token is sampled, never processed
    visible = torch.zeros(n, n, dtype=torch.bool)
    sampled = []
    for entries, logits in runner.log:
        e, = entries
        table = list(e.block_table)
        for p in range(e.start, e.start + len(e.token_ids)):
            for k in range(p + 1):
                visible[p, k] = k // 2 < len(table) and table[k // 2] != DEAD
        if e.sample:
            sampled.append((e.start + len(e.token_ids) - 1, logits[0]))
    assert not visible[n - 1, 2:n - 8].any() and visible[n - 1, :2].all(), "sinks kept, the middle evicted"
    with torch.no_grad():
        want = model(torch.tensor([tokens[:n]]), attention_mask=visible[None, None], use_cache=False).logits[0]
        full = model(torch.tensor([tokens[:n]]), use_cache=False).logits[0]
    for p, row in sampled:
        assert torch.allclose(row, want[p], atol=2e-5, rtol=1e-4), p
    assert not torch.allclose(sampled[-1][1], full[sampled[-1][0]], atol=1e-3)


# --------------------------------------------------------------------------- CUDA graphs, bookkeeping on CPU

def test_decode_replays_one_graph_per_bucket_on_cpu():
    """cuda_graphs=True with the graph calls replaced: decode batches are padded to a bucket (3 -> 4) with
    rows that write and read nothing; one capture per (bucket, table width); tokens as transformers'."""
    model = model_of("llama")
    made = []

    class FakeGraph:  # replay() recomputes into the captured buffers, as a CUDA graph does
        def replay(self):
            made[-1][1].append(1)
            for k, v in made[-1][0].run(made[-1][0].static).items():
                if k in made[-1][0].static_out:
                    made[-1][0].static_out[k].copy_(v)

    @contextlib.contextmanager
    def capture(graph):
        yield

    def factory(run, stable, keep):
        replay = GraphReplay(run, stable, new_graph=FakeGraph, capture=capture, keep=keep)
        made.append((replay, []))
        return replay

    runner = PagedRunner(model, "torch", cuda_graphs=True, graph_factory=factory)
    llm = LLM(model, block_size=4, max_batch_tokens=32, runner=runner)
    prompts = random_prompts([4, 7, 2], seed=6)
    outs = llm.generate(prompts, max_new_tokens=12)
    for p, o in zip(prompts, outs):
        assert_greedy(model, p, o, 12)
    assert set(runner.graphs) == {(4, 2), (4, 4), (4, 8)}  # 3 decodes -> bucket 4; widest table 2..5 -> 2, 4, 8
    assert all(r.captures == 1 for r, _ in made) and len(made) == 3
    assert runner.calls["decode"] == 11 and sum(len(replays) for _, replays in made) == 11
    assert [bucket(n) for n in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, 32]


def test_padded_decode_rows_write_nothing():
    """A padded decode row (table all DEAD) leaves every cache block as it was and reads nothing."""
    model = model_of("llama")
    runner = PagedRunner(model, "torch")
    runner.bind(CacheConfig(num_blocks=4, block_size=4, max_batch_tokens=8, dtype=torch.float32))
    for t in runner.states.values():
        t.normal_()
    before = {k: t.clone() for k, t in runner.states.items()}
    v = runner.programs.decode
    inputs = {**v.bindings, **runner.states, "input_ids": torch.tensor([[5]]), "position_ids": torch.tensor([[3]]),
              "block_table": torch.full((1, 2), DEAD, dtype=torch.int32)}
    logits = v.run(inputs)[v.ir.outputs[0]]
    assert torch.isfinite(logits).all()
    assert all(torch.equal(before[k], t) for k, t in runner.states.items())


# ------------------------------------------------------------------------------------------ bytes per step

def test_decode_bytes_at_context_1024_batch_4():
    """One decode step of 4 sequences at context 1024, every kernel's loads and stores counted under
    Triton's interpreter: at most 1.1 x (weights + the live K/V read once + the logits) — keys and values
    are read once per KV head (query heads of one KV head share the program), the table once per tile."""
    model = model_of("llama")
    ctx, batch, bs = 1024, 4, 16
    runner = PagedRunner(model, "triton")
    runner.bind(CacheConfig(num_blocks=batch * ctx // bs, block_size=bs, max_batch_tokens=64, dtype=torch.float32))
    for t in runner.states.values():
        t.normal_()
    entries = [StepEntry(b, (5 + b,), ctx - 1, tuple(range(b * ctx // bs, (b + 1) * ctx // bs)))
               for b in range(batch)]
    run = runner.programs.decode.run
    run.measure, run.stats = True, {}
    try:
        logits = runner.step(entries)
    finally:
        run.measure = False
    moved = sum(s.bytes_loaded + s.bytes_stored for s in run.stats.values())
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv = batch * ctx * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert kv == runner.cache_bytes  # the whole cache is live here
    assert moved <= 1.1 * (weights + kv + logits.numel() * 4), moved / (weights + kv + logits.numel() * 4)
    assert moved >= kv  # every live key and value was read


def test_gpu_benchmark_script_says_it_needs_a_gpu():
    """benchmarks/gpu.py (the GPU run) parses its options and, without CUDA, exits 2 with a clear message."""
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the script would run")
    run = subprocess.run([sys.executable, "benchmarks/gpu.py", "--budget", "1"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and "needs a CUDA GPU" in run.stderr


@pytest.mark.slow
def test_smollm2_real_prompts_match_transformers():
    """The real model: 4 real prompts of different lengths (Persuasion) batched, 64 greedy tokens each,
    token-identical to transformers' `generate` of each alone (or first differing at a near-tie); and the
    CLI streams the first one."""
    import os
    import subprocess
    import sys

    from einfuse.hub import austen_prompts, smollm2

    model, tok = smollm2()
    prompts = austen_prompts(4)
    ids = [tok(p)["input_ids"] for p in prompts]
    assert len({len(i) for i in ids}) == 4
    llm = LLM(model, max_batch_tokens=64)
    outs = llm.generate(ids, max_new_tokens=64)
    for p, o in zip(ids, outs):
        assert_greedy(model, p, o, 64)
    run = subprocess.run([sys.executable, "-m", "einfuse.cli", "generate", "smollm2", "--prompt", prompts[0],
                          "--max-new-tokens", "12"], capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr
    assert run.stdout == tok.decode(hf_greedy(model, ids[0], 12), skip_special_tokens=True) + "\n"
    assert "tokens/s" in run.stderr


def test_prefills_of_similar_lengths_share_a_call():
    """A step's prompts go in as few padded prefill calls as pays: sorted by length, split where the padding
    saved outweighs a call's fixed cost (8 token rows) — Persuasion's 8 prompt lengths in 3 calls of 231 rows,
    not 1 call of 336 or 8 calls of 217 + 64."""
    runner = PagedRunner.__new__(PagedRunner)
    runner.call_tokens = 8
    lengths = [14, 32, 41, 11, 30, 42, 17, 30]
    entries = [StepEntry(i, tuple(range(n)), 0, (0,)) for i, n in enumerate(lengths)]
    calls = runner._prefill_batches(entries, list(range(len(entries))))
    assert sorted(i for c in calls for i in c) == list(range(len(entries)))
    assert [sorted(lengths[i] for i in c) for c in calls] == [[41, 42], [30, 30, 32], [11, 14, 17]]
    assert sum(max(lengths[i] for i in c) * len(c) for c in calls) == 231
    runner.call_tokens = 1000  # calls that cost more than any padding: one call
    assert len(runner._prefill_batches(entries, list(range(len(entries))))) == 1
