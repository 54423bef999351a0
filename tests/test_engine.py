"""The serving engine (einfuse/serve): `LLM` with the eager reference runner (the compiled runner's own tests are
in test_paged.py) against transformers' `generate`
token for token (batched, chunked, staggered arrivals, preemption, sliding windows), sampling against
transformers' warpers, the scheduler and block manager on their own, bad input, and `einfuse generate`."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from einfuse.cli import main as cli_main
from einfuse.models import tiny_decoder, tiny_gpt2, tiny_llama
from einfuse.serve import (
    DEAD,
    LLM,
    BlockManager,
    CacheConfig,
    CachePolicy,
    ChunkedPrefill,
    EagerRunner,
    Request,
    SamplingParams,
    StepEntry,
    WholePrompt,
    kv_bytes_per_token,
)
from einfuse.serve.sampling import filter_logits, sample


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2(seed=0)


def random_prompts(lengths, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def EagerLLM(model, *args, **kwargs):  # noqa: N802 - LLM with the reference runner: these tests are the engine's
    return LLM(model, *args, backend="eager", **kwargs)


_REFERENCE = {}


def hf_greedy(model, prompt, n, eos=None):
    """transformers' greedy `generate` of one prompt alone: the new tokens (ending at its EOS, if it stops)."""
    key = (id(model), tuple(prompt), n, eos)
    if key not in _REFERENCE:
        kwargs = {} if eos is None else dict(eos_token_id=eos)
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, use_cache=False, pad_token_id=0, **kwargs)
        _REFERENCE[key] = out[0, len(prompt):].tolist()
    return _REFERENCE[key]


def run_all(llm):
    """Step a serving loop until nothing is left; every finished output, in order."""
    done = llm.step()
    while llm.has_unfinished():
        done += llm.step()
    return done


def byte_tokenizer():
    """A byte-level tokenizer over 256 ids (no merges): multi-byte characters span tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


# ------------------------------------------------------------------------------------- against transformers

@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("scheduler", ["chunked", "none"])
def test_greedy_batch_matches_transformers(family, scheduler, llama, gpt2):
    model = {"llama": llama, "gpt2": gpt2}[family]
    prompts = random_prompts([1, 6, 13, 29])
    llm = EagerLLM(model, max_batch_tokens=64 if scheduler == "none" else 12, block_size=4, scheduler=scheduler)
    outs = llm.generate(prompts, max_new_tokens=24)
    refs = [hf_greedy(model, p, 24) for p in prompts]
    assert outs == refs
    assert sum(len(r) == 24 for r in refs) >= 2  # mostly full-length, not cut short by an EOS
    assert max(s.tokens_prefilled + s.tokens_decoded for s in llm.stats) <= llm.scheduler.max_batch_tokens
    if scheduler == "chunked":  # the 29-token prompt was cut into chunks beside running decodes
        assert any(s.tokens_prefilled and s.tokens_decoded for s in llm.stats)
    assert llm.blocks.blocks_in_use == 0 and not llm.has_unfinished()


def test_eos_and_token_stop_sequences_as_transformers(llama):
    prompt = random_prompts([7], seed=3)[0]
    ref = hf_greedy(llama, prompt, 24)
    assert len(ref) == 24
    eos = next(t for i, t in enumerate(ref) if i >= 4 and t not in ref[:i])  # a token first seen mid-way
    before = llama.generation_config.eos_token_id
    llama.generation_config.eos_token_id = eos
    try:
        llm = EagerLLM(llama, block_size=4)
    finally:
        llama.generation_config.eos_token_id = before
    assert llm.generate(prompt, max_new_tokens=24) == hf_greedy(llama, prompt, 24, eos=eos)
    assert llm.generate(prompt, max_new_tokens=24, ignore_eos=True) == ref

    pair = tuple(ref[5:7])
    cut = next(i for i in range(len(ref)) if tuple(ref[i:i + 2]) == pair) + 2
    llm = EagerLLM(llama, block_size=4)
    i = llm.add_request(prompt, max_new_tokens=24, stop=[list(pair), [999]])
    (out,) = run_all(llm)
    assert out.request_id == i and out.token_ids == ref[:cut]
    assert (out.finish_reason, out.stop_reason) == ("stop", pair)


def test_sliding_window_frees_blocks_and_matches_transformers():
    """Mistral attends to its last 6 positions: blocks before the window go back to the free list, so a cache
    of 6 blocks of 2 runs 50-token sequences, with transformers' tokens."""
    model = tiny_decoder("mistral")
    assert CachePolicy.of_model(model.config) == CachePolicy(window=6)
    assert CachePolicy.of_model(tiny_decoder("gemma2").config) == CachePolicy()  # global layers need everything
    prompts = random_prompts([20, 9])
    llm = EagerLLM(model, block_size=2, num_blocks=6, max_batch_tokens=4)
    assert llm.generate(prompts, max_new_tokens=30) == [hf_greedy(model, p, 30) for p in prompts]
    assert max(s.blocks_in_use for s in llm.stats) <= 6 and llm.blocks.blocks_in_use == 0
    with pytest.raises(ValueError, match="cannot hold a window of 6"):
        EagerLLM(model, block_size=2, num_blocks=3)
    whole = EagerLLM(model, block_size=2, num_blocks=6, max_batch_tokens=32, scheduler="none")  # no chunks to evict
    with pytest.raises(ValueError, match="longest is 12, set by the KV cache: 6 blocks of 2"):
        whole.add_request(prompts[0])


class TableRecorder(EagerRunner):
    """The eager runner, keeping every step's entries and every release."""

    def __init__(self, model):
        super().__init__(model)
        self.entries, self.released = [], []

    def step(self, entries):
        self.entries.append(entries)
        return super().step(entries)

    def release(self, request_id, blocks):
        self.released.append((request_id, list(blocks)))
        super().release(request_id, blocks)


def test_streaming_llm_keeps_sinks_and_window(llama):
    """StreamingLLM (opt-in): 4 sink positions + the last 8; a 60-token sequence runs in 5 blocks of 4, its
    table keeps the sink block, marks evicted ones DEAD, and every freed block is reported to the runner."""
    runner = TableRecorder(llama)
    llm = EagerLLM(llama, block_size=4, num_blocks=5, max_batch_tokens=4, runner=runner,
              cache_policy=CachePolicy.streaming_llm(window=8, sink_tokens=4))
    out = llm.generate(random_prompts([30])[0], max_new_tokens=30, ignore_eos=True)
    assert len(out) == 30 and llm.max_model_len == 4096
    last = runner.entries[-1][0]
    assert last.start == 58 and len(last.block_table) == 15  # positions 0..58: 15 blocks' worth
    table = last.block_table
    assert table[0] != DEAD and table[1:12] == (DEAD,) * 11 and DEAD not in table[12:]
    for entries in runner.entries:  # each step can read its sinks and its window
        for e in entries:
            live = [p for p in range(e.start + len(e.token_ids)) if e.block_table[p // 4] != DEAD]
            assert set(range(4)) | set(range(max(0, e.start - 7), e.start)) <= set(live)
    evicted, (_, last_blocks) = runner.released[:-1], runner.released[-1]
    assert sum(len(b) for _, b in evicted) == 11 and len(last_blocks) == 4  # evictions, then the live blocks
    assert llm.blocks.blocks_in_use == 0 and runner.owners == {}


def test_staggered_arrivals_each_as_alone(llama):
    """Eight requests joining at steps 0..7 (continuous batching) each produce what transformers produces for
    it alone; afterwards every block is free and the runner holds none."""
    prompts = random_prompts([3, 17, 1, 30, 8, 12, 25, 5], seed=1)
    news = [16, 8, 20, 12, 16, 10, 14, 18]
    llm = EagerLLM(llama, max_batch_tokens=16, block_size=4)
    ids, done = {}, {}
    for step in range(200):
        if step < len(prompts):
            ids[llm.add_request(prompts[step], max_new_tokens=news[step])] = step
        for out in llm.step():
            done[ids[out.request_id]] = out.token_ids
        if len(done) == len(prompts):
            break
    assert done == {k: hf_greedy(llama, prompts[k], news[k]) for k in range(len(prompts))}
    assert max(s.running for s in llm.stats) >= 4  # they did overlap
    assert llm.blocks.blocks_in_use == 0 and llm.runner.owners == {}


@pytest.mark.parametrize("scheduler", ["chunked", "none"])
def test_preemption_when_blocks_run_out(scheduler, llama):
    """12 blocks of 4 tokens for 8 requests needing up to 9 blocks each: the newest are preempted (recomputed
    later) and every request still ends with transformers' tokens."""
    prompts = random_prompts([3, 17, 1, 20, 8, 12, 19, 5], seed=2)
    llm = EagerLLM(llama, max_batch_tokens=48, block_size=4, num_blocks=12, scheduler=scheduler)
    outs = llm.generate(prompts, max_new_tokens=16)
    assert outs == [hf_greedy(llama, p, 16) for p in prompts]
    assert sum(s.preempted for s in llm.stats) > 0
    assert max(s.blocks_in_use for s in llm.stats) <= 12
    assert llm.blocks.blocks_in_use == 0 and llm.runner.owners == {}


def test_strings_in_and_out_and_streamed_text(llama):
    tok = byte_tokenizer()
    text = "Emma Woodhouse, handsome, clever, and rich — été"
    llm = EagerLLM(llama, tok, block_size=4, max_batch_tokens=16)
    ref_ids = hf_greedy(llama, tok(text)["input_ids"], 20)
    ref = tok.decode(ref_ids)
    assert llm.generate(text, max_new_tokens=20) == ref
    assert llm.generate([text, "x"], max_new_tokens=20)[0] == ref
    pieces = [piece for rid, piece in llm.stream(text, max_new_tokens=20)]
    assert "".join(pieces) == ref and len(pieces) > 1 and all(pieces)
    # a string stop: the text ends before its first appearance (an ASCII character from the reference)
    stop = next(c for c in ref[3:] if c.isascii() and c.isprintable())
    assert llm.generate(text, max_new_tokens=20, stop=stop) == ref[:ref.index(stop)]
    assert "".join(p for _, p in llm.stream(text, max_new_tokens=20, stop=[stop, "\x00never"])) == ref[:ref.index(stop)]
    # token prompts stream token ids, and give token ids back, with or without a tokenizer
    assert [t for _, t in llm.stream(tok(text)["input_ids"], max_new_tokens=20)] == ref_ids


# ---------------------------------------------------------------------------------------------------- sampling

def test_sampling_filters_are_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 256, generator=torch.Generator().manual_seed(0)) * 3
    logits[0, :10] = 5.0  # ties at the k-th value
    for temperature, k, p in [(0.7, None, None), (1.0, 10, None), (1.3, None, 0.9), (0.8, 40, 0.5), (1.0, 5, 0.01)]:
        expect = TemperatureLogitsWarper(temperature)(None, logits)
        expect = TopKLogitsWarper(k)(None, expect) if k else expect
        expect = TopPLogitsWarper(p)(None, expect) if p else expect
        assert torch.equal(filter_logits(logits, temperature, k, p), expect)


def test_sampling_draws_from_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0])
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0)
    counts = torch.bincount(torch.tensor([sample(logits, params, g) for _ in range(4000)]), minlength=5)
    assert torch.allclose(counts / 4000, logits.softmax(0), atol=0.03) and counts[4] == 0
    top2 = SamplingParams(temperature=1.0, top_k=2)
    assert {sample(logits, top2, g) for _ in range(200)} == {0, 1}


def test_seeded_sampling_is_independent_of_the_batch(llama):
    prompts = random_prompts([5, 11, 2, 23], seed=4)
    params = dict(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95)
    llm = EagerLLM(llama, max_batch_tokens=12, block_size=4)
    alone = llm.generate(prompts[1], seed=7, **params)
    assert llm.generate(prompts, seed=[1, 7, 2, 3], **params)[1] == alone
    assert EagerLLM(llama, max_batch_tokens=64, num_blocks=9, block_size=4).generate(
        prompts[::-1], seed=[3, 2, 7, 1], **params)[2] == alone
    assert llm.generate(prompts[1], seed=8, **params) != alone
    # top_k=1 sampling is greedy: transformers' tokens
    assert llm.generate(prompts[0], temperature=1.0, top_k=1, max_new_tokens=16) == hf_greedy(llama, prompts[0], 16)


# --------------------------------------------------------------------------------------------------- bad input

def test_bad_input_is_a_clear_error(llama):
    llm = EagerLLM(llama, block_size=4, num_blocks=4)
    with pytest.raises(ValueError, match="einfuse: a prompt of 17 tokens can never run: the longest is 16"):
        llm.generate(random_prompts([17])[0])
    llm.generate(random_prompts([16])[0], max_new_tokens=4)  # exactly the cache: runs
    with pytest.raises(ValueError, match=r"einfuse: token ids \[-1, 256\] are outside .* \[0, 256\)"):
        llm.add_request([5, 256, -1])
    with pytest.raises(ValueError, match="einfuse: empty prompt"):
        llm.add_request([])
    with pytest.raises(ValueError, match="einfuse: empty prompt"):
        llm.generate([[4, 5], []])
    assert llm.generate([]) == [] and not llm.has_unfinished()  # an empty batch; the bad batch added nothing
    with pytest.raises(ValueError, match="einfuse: a string prompt needs a tokenizer"):
        llm.generate("hello")
    with pytest.raises(ValueError, match="string stop sequences need a tokenizer"):
        llm.generate([4, 5], stop="x")
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        llm.generate([4, 5], max_new_tokens=-1)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        llm.generate([4, 5], temperature=-1)
    with pytest.raises(ValueError, match="top_p must be in"):
        llm.generate([4, 5], top_p=0)
    with pytest.raises(ValueError, match="unknown scheduler 'fifo'"):
        EagerLLM(llama, scheduler="fifo")
    with pytest.raises(ValueError, match="longest is 8"):  # whole prompts: the step budget bounds a sequence
        EagerLLM(llama, scheduler="none", max_batch_tokens=8).add_request(list(range(3, 12)))

    # max_new_tokens=0: a documented no-op, finished at once with no tokens
    steps = len(llm.stats)
    assert llm.generate([[4, 5], [6]], max_new_tokens=0) == [[], []] and len(llm.stats) == steps
    i = llm.add_request([4, 5], max_new_tokens=0)
    (out,) = llm.step()
    assert (out.request_id, out.token_ids, out.finish_reason) == (i, [], "length")

    # abort: an unknown id is an error, a finished one a no-op
    with pytest.raises(KeyError, match="einfuse: no request 99"):
        llm.abort(99)
    assert llm.abort(i) is None


def test_abort_mid_stream_frees_blocks(llama):
    llm = EagerLLM(llama, max_batch_tokens=16, block_size=4)
    a, b = random_prompts([9, 14], seed=5)
    seen = {}
    for rid, token in llm.stream([a, b], max_new_tokens=24):
        seen.setdefault(rid, []).append(token)
        if len(seen[rid]) == 3 and rid == min(seen):
            held = llm.blocks.blocks_in_use
            out = llm.abort(rid)
            assert out.finish_reason == "abort" and out.token_ids == seen[rid]
            assert llm.blocks.blocks_in_use == held - (-(-(len(a) + 2) // 4))  # its 3 blocks are free
            assert llm.abort(rid) is None
    first, second = sorted(seen)
    assert len(seen[first]) == 3 and seen[second] == hf_greedy(llama, b, 24)
    assert llm.blocks.blocks_in_use == 0
    # leaving a stream early aborts what it started
    for _ in llm.stream([a, b], max_new_tokens=24):
        break
    assert not llm.has_unfinished() and llm.blocks.blocks_in_use == 0 and llm.runner.owners == {}


def test_kv_cache_size_from_the_config(llama, gpt2):
    """Bytes per token as transformers' own cache holds them; num_blocks=None fills `cache_bytes`."""
    for model in (llama, gpt2):
        cache = model(torch.tensor([[5, 6, 7]]), use_cache=True).past_key_values
        held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        assert kv_bytes_per_token(model.config, torch.float32) == held // 3
    assert EagerLLM(llama, block_size=16, cache_bytes=512 * 16 * 10).blocks.num_blocks == 10


def test_eager_runner_checks_the_protocol(llama):
    runner = EagerRunner(llama)
    runner.bind(CacheConfig(num_blocks=4, block_size=2, max_batch_tokens=8, dtype=torch.float32))
    logits = runner.step([StepEntry(0, (5, 6, 7), 0, (0, 1)), StepEntry(1, (8,), 0, (2,), sample=False)])
    assert torch.equal(logits[0], llama(input_ids=torch.tensor([[5, 6, 7]])).logits[0, -1])
    with pytest.raises(RuntimeError, match="sent tokens from position 4, but 3 came before"):
        runner.step([StepEntry(0, (9,), 4, (0, 1, 3))])
    with pytest.raises(RuntimeError, match="block 1 is in request 2's table but still belongs to request 0"):
        runner.step([StepEntry(2, (9,), 0, (1,))])
    with pytest.raises(RuntimeError, match="no live block"):
        runner.step([StepEntry(1, (9, 10), 1, (2,))])
    runner.release(0, [0, 1])
    runner.step([StepEntry(2, (9,), 0, (1,))])  # released: another request may take it


# ------------------------------------------------------------------------------------- block manager, scheduler

def test_block_manager_allocates_all_or_nothing_and_evicts():
    bm = BlockManager(num_blocks=5, block_size=4, sink_tokens=4)
    assert bm.allocate("a", 9) and bm.table("a") == [0, 1, 2] and bm.blocks_in_use == 3
    assert not bm.can_allocate("b", 9) and not bm.allocate("b", 9) and bm.table("b") == [] and bm.num_free == 2
    assert bm.allocate("a", 12) and bm.table("a") == [0, 1, 2]  # 12 tokens still fit in three blocks
    assert bm.evict_before("a", 11) == [1]  # block 0 holds the sinks, block 2 position 11
    assert bm.table("a") == [0, DEAD, 2] and bm.max_tokens("a") == 6 * 4
    assert bm.allocate("b", 8) and bm.table("b") == [3, 4]
    assert bm.allocate("a", 13) and bm.table("a") == [0, DEAD, 2, 1]  # oldest-freed block first
    assert sorted(bm.free("a")) == [0, 1, 2] and bm.free("a") == [] and bm.blocks_in_use == 2
    with pytest.raises(ValueError, match="at least one block"):
        BlockManager(0)


def requests(*shapes):
    """Requests (arrival = position) from (tokens, computed) pairs."""
    out = []
    for i, (n, computed) in enumerate(shapes):
        r = Request(i, i, list(range(3, 3 + n)))
        r.num_computed = computed
        out.append(r)
    return out


def admit(reqs, bm):
    for r in reqs:
        assert bm.allocate(r.id, r.num_computed)


def test_chunked_prefill_decodes_first_then_oldest_prefill_in_chunks():
    bm = BlockManager(64, 4)
    old_prefill, d1, d2, w_new, w_old = requests((40, 8), (5, 4), (7, 6), (10, 0), (30, 0))
    w_new.arrival, w_old.arrival = 9, 5  # waiting out of arrival order in the list
    admit([old_prefill, d1, d2], bm)
    plan = ChunkedPrefill(max_batch_tokens=12).schedule([old_prefill, d2, d1], [w_new, w_old], bm)
    assert [(r.id, n) for r, n in plan.chunks] == [(1, 1), (2, 1), (0, 10)]  # decodes never wait for prefills
    plan = ChunkedPrefill(max_batch_tokens=40).schedule([old_prefill, d2, d1], [w_new, w_old], bm)
    assert [(r.id, n) for r, n in plan.chunks] == [(1, 1), (2, 1), (0, 32), (4, 6)]  # then the oldest waiting
    assert plan.admitted == [w_old] and plan.num_tokens == 40
    assert bm.table(4) and not bm.table(3)


def test_whole_prompt_admits_only_whole_prompts():
    bm = BlockManager(64, 4)
    d, w_long, w_short = requests((5, 4), (20, 0), (6, 0))
    admit([d], bm)
    plan = WholePrompt(max_batch_tokens=16).schedule([d], [w_long, w_short], bm)
    assert [(r.id, n) for r, n in plan.chunks] == [(0, 1)]  # the oldest does not fit; nobody jumps it
    plan = WholePrompt(max_batch_tokens=32).schedule([d], [w_long, w_short], bm)
    assert [(r.id, n) for r, n in plan.chunks] == [(0, 1), (1, 20), (2, 6)]


def test_preemption_takes_the_newest():
    bm = BlockManager(6, 4)
    a, b, c = requests((9, 8), (9, 8), (9, 8))  # two full blocks each: the next token needs a third
    admit([a, b, c], bm)
    plan = ChunkedPrefill(max_batch_tokens=16).schedule([c, a, b], [], bm)
    assert plan.preempted == [c] and sorted(plan.freed[2]) == [4, 5]
    assert [(r.id, n) for r, n in plan.chunks] == [(0, 1), (1, 1)] and bm.table(2) == []
    # the request being scheduled, when it is the newest, preempts itself rather than an older one
    bm = BlockManager(5, 4)
    a, b = requests((9, 8), (9, 8))
    admit([a, b], bm)
    plan = ChunkedPrefill(max_batch_tokens=16).schedule([a, b], [], bm)
    assert plan.preempted == [b] and [(r.id, n) for r, n in plan.chunks] == [(0, 1)]


def test_scheduler_invariants_over_a_random_workload():
    """Random arrivals and lengths through the scheduler alone: every step within the budget, every running
    decode advanced unless preempted, preempted requests the newest, and all requests finish."""
    g = torch.Generator().manual_seed(0)
    for policy in (ChunkedPrefill(max_batch_tokens=16), WholePrompt(max_batch_tokens=32)):
        bm = BlockManager(14, 4)
        arrivals = {int(s): Request(k, k, [3] * int(n)) for k, (s, n) in
                    enumerate(zip(torch.randint(0, 40, (12,), generator=g).sort().values,
                                  torch.randint(1, 24, (12,), generator=g)))}
        goal = {r.id: len(r.tokens) + 6 for r in arrivals.values()}
        running, waiting, finished = [], [], 0
        for step in range(1000):
            if step in arrivals:
                waiting.append(arrivals[step])
            decodes = {r.id for r in running if r.remaining == 1}
            plan = policy.schedule(running, waiting, bm)
            assert plan.num_tokens <= policy.max_batch_tokens
            scheduled = {r.id for r, _ in plan.chunks}
            assert decodes <= scheduled | {r.id for r in plan.preempted}
            assert not (plan.preempted and plan.admitted)
            for victim in plan.preempted:
                assert all(r.arrival < victim.arrival for r, _ in plan.chunks if r in running)
                running.remove(victim)
                victim.num_computed = 0
                waiting.append(victim)
            for r in plan.admitted:
                waiting.remove(r)
                running.append(r)
            for r, n in plan.chunks:
                r.num_computed += n
                if r.remaining == 0:
                    r.tokens.append(3)
                    if len(r.tokens) == goal[r.id]:
                        running.remove(r)
                        bm.free(r.id)
                        finished += 1
            assert bm.blocks_in_use == sum(len(bm.table(r.id)) for r in running)
        assert finished == len(arrivals) and bm.blocks_in_use == 0


# ---------------------------------------------------------------------------------------------------------- CLI

def test_cli_generate_streams_a_saved_model(tmp_path, llama, capsys):
    tok = byte_tokenizer()
    llama.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
    run = subprocess.run([sys.executable, "-m", "einfuse.cli", "generate", str(tmp_path / "tiny"), "--prompt",
                          "It is a truth", "--max-new-tokens", "12", "--backend", "eager"], capture_output=True, env=env,
                         timeout=300)  # the compiled runner's CLI run: test_paged's SmolLM2 test (slow)
    stderr = run.stderr.decode()
    assert run.returncode == 0, stderr
    ref = hf_greedy(llama, tok("It is a truth")["input_ids"], 12)
    assert run.stdout.decode("utf-8") == tok.decode(ref) + "\n"  # bytes: random text may hold a \r
    assert f"einfuse: {len(ref)} tokens in" in stderr and "tokens/s" in stderr

    assert cli_main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "is not a transformers model folder, a .gguf file or 'smollm2'" in capsys.readouterr().err
