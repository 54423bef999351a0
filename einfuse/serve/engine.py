"""`einfuse.LLM`: the serving engine — the loop that joins the pieces (vLLM's split):

    Scheduler (scheduler.py)   policy: which requests advance by how many tokens this step
    BlockManager (blocks.py)   memory: the KV cache's blocks and each request's block table
    ModelRunner (runner.py)    execution: one call per step, logits of each entry's last token
    sampling (sampling.py)     the next token of each request, and when it stops

    llm = einfuse.LLM(model, tokenizer)
    llm.generate(["The sea", "Once upon"], max_new_tokens=32)          # strings in, strings out
    for request_id, text in llm.stream("The sea", max_new_tokens=32): print(text, end="")
    i = llm.add_request([1, 2, 3], max_new_tokens=8); outputs = llm.step(); llm.abort(i)   # a serving loop

Continuous batching: requests join (`add_request`) and leave (finished, `abort`) between steps.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .blocks import BlockManager, CachePolicy
from .runner import CacheConfig, ModelRunner, StepEntry, make_runner
from .sampling import SamplingParams, make_generator, sample, stopped
from .scheduler import Request, make_scheduler

DEFAULT_CACHE_BYTES = 256 * 2**20  # the KV cache's size when num_blocks is not given


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take over all layers: 2 x layers x KV heads x head dim x element size
    (multi-query models have one KV head)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or (1 if getattr(config, "multi_query", False) else heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class RequestOutput:
    """A request's result so far. `finish_reason`: None (running), "stop" (an EOS token or a stop sequence:
    `stop_reason` says which), "length" (max_new_tokens, or the sequence reached `LLM.max_model_len`) or
    "abort". `text` is the decoded output (None without a tokenizer), cut before a string stop."""
    request_id: int
    prompt: str | list[int]
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str | None
    stop_reason: int | tuple | str | None = None
    preemptions: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StepStats:
    """What one step did. tokens_prefilled/decoded: tokens processed by prefill chunks / by decodes (one per
    running request with a token sampled last step); tokens_generated: new tokens sampled; running/waiting:
    requests after the step; preempted/admitted/finished: in this step; bytes_moved: from the runner
    (`runner.last_step_bytes`; None for the EagerRunner)."""
    step: int
    tokens_prefilled: int
    tokens_decoded: int
    tokens_generated: int
    running: int
    waiting: int
    preempted: int
    admitted: int
    finished: int
    blocks_in_use: int
    seconds: float
    bytes_moved: int | None = None


class _Sequence(Request):
    """A request as the engine keeps it: the scheduler's view plus sampling state and text."""

    def __init__(self, id, arrival, tokens, prompt, params, generator, wants_text):
        super().__init__(id, arrival, tokens)
        self.prompt = prompt
        self.params = params
        self.generator = generator
        self.wants_text = wants_text  # the prompt was a string: outputs are strings
        self.text = None
        self.finish_reason = None
        self.stop_reason = None

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    def result(self) -> RequestOutput:
        return RequestOutput(self.id, self.prompt, self.tokens[:self.prompt_len], self.output, self.text,
                             self.finish_reason, self.stop_reason, self.preemptions)


class LLM:
    """A serving engine over a transformers causal LM (see the module docstring).

    tokenizer: strings in and out, string stop sequences (token ids work without one).
    max_batch_tokens: the per-step token budget (prefill chunks + decodes).
    block_size, num_blocks: the paged KV cache; num_blocks=None sizes it to `cache_bytes` (default 256 MiB)
        from the model config's layers, KV heads and head dimension.
    dtype: the model's and the cache's dtype (None: the model's; another converts the model in place).
    backend, runner: the ModelRunner (runner.py); runner=None asks `make_runner`: backend "eager" is the
        reference runner (the transformers model, recomputed), any other the compiled PagedRunner (paged.py).
    scheduler: "chunked" (Sarathi-style chunked prefill), "none" (whole prompts), "layered" (layered prefill in
        4 layer groups, layered.py; its runner: LayerGroupRunner for backend "eager", else the compiled
        CompiledLayerGroupRunner) or a Scheduler instance.
    cache_policy: None (the model's own: its sliding window when every layer has one), "streaming"
        (StreamingLLM: 4 sink tokens + a recent window; positions outside it are evicted) or a CachePolicy.

    `max_model_len`: the longest prompt; a request stops ("length") when prompt + output reaches it. It is
    the smallest of the model's positions, the cache (unless a window lets "chunked" evict as it goes) and,
    for "none", the budget (a preempted request recomputes its whole sequence in one step).
    """

    def __init__(self, model, tokenizer=None, *, max_batch_tokens: int = 256, block_size: int = 16,
                 num_blocks: int | None = None, dtype: torch.dtype | None = None, backend: str | None = None,
                 scheduler="chunked", runner: ModelRunner | None = None, cache_policy=None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.model = model.eval()
        self.tokenizer = tokenizer
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.vocab_size = config.vocab_size
        dtype = dtype or next(model.parameters()).dtype
        if cache_policy is None:
            cache_policy = CachePolicy.of_model(config)
        elif cache_policy == "streaming":
            cache_policy = CachePolicy.streaming_llm()
        elif not isinstance(cache_policy, CachePolicy):
            raise ValueError(f"einfuse: cache_policy must be None, 'streaming' or a CachePolicy, got "
                             f"{cache_policy!r}")
        self.policy = cache_policy
        if num_blocks is None:
            num_blocks = max(1, cache_bytes // (kv_bytes_per_token(config, dtype) * block_size))
        self.blocks = BlockManager(num_blocks, block_size, cache_policy.sink_tokens)
        if scheduler == "layered":
            from .layered import LayeredPrefill

            scheduler = LayeredPrefill(config.num_hidden_layers, min(4, config.num_hidden_layers), max_batch_tokens)
        self.scheduler = make_scheduler(scheduler, max_batch_tokens)
        self.cache = CacheConfig(num_blocks, block_size, self.scheduler.max_batch_tokens, dtype, cache_policy)
        if runner is None and getattr(self.scheduler, "num_layers", None) is not None:
            from .layered import layered_runner

            runner = layered_runner(model, self.cache, len(self.scheduler.groups), backend)
        self.runner = runner if runner is not None else make_runner(model, self.cache, backend)
        layered = getattr(self.scheduler, "num_layers", None)  # a layered scheduler (layered.py)
        if layered is not None:
            if not getattr(self.runner, "runs_layer_groups", False):
                raise ValueError(f"einfuse: scheduler {self.scheduler.name!r} advances prefills one layer group "
                                 f"per step; {type(self.runner).__name__} runs whole models only — pass "
                                 f"runner=einfuse.serve.layered.LayerGroupRunner(model)")
            if layered != config.num_hidden_layers:
                raise ValueError(f"einfuse: scheduler {self.scheduler.name!r} was made for {layered} layers; the "
                                 f"model has {config.num_hidden_layers}")
        self.runner.bind(self.cache)

        limits = {"the model's positions": getattr(config, "max_position_embeddings", None),
                  f"scheduler {self.scheduler.name!r}, which runs a whole sequence in one step of at most "
                  f"max_batch_tokens (raise it, or use scheduler='chunked')": self.scheduler.max_sequence_tokens()}
        if cache_policy.window is None or self.scheduler.max_sequence_tokens() is not None:  # all cached at once
            limits[f"the KV cache: {num_blocks} blocks of {block_size} (give LLM more num_blocks or "
                   f"cache_bytes)"] = num_blocks * block_size
        if cache_policy.window is not None:  # a lone sequence advancing one token at a time holds sinks + window
            need = -(-cache_policy.sink_tokens // block_size) + -(-cache_policy.window // block_size) + 1
            if num_blocks < need:
                raise ValueError(f"einfuse: {num_blocks} blocks of {block_size} cannot hold a window of "
                                 f"{cache_policy.window} positions (+{cache_policy.sink_tokens} sink tokens); "
                                 f"give num_blocks >= {need}")
        self.max_model_len, self._length_bound = min((n, why) for why, n in limits.items() if n)

        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else getattr(config, "eos_token_id", None)
        eos = eos if eos is not None else getattr(tokenizer, "eos_token_id", None)
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else eos or [])

        self.stats: list[StepStats] = []
        self._waiting: list[_Sequence] = []
        self._running: list[_Sequence] = []
        self._next_id = 0
        self._backlog: list[_Sequence] = []  # finished outside `step` (max_new_tokens=0, generate, stream)

    # ---------------------------------------------------------------------------------------------- requests
    def add_request(self, prompt, params: SamplingParams | None = None, **sampling) -> int:
        """Queue a request; returns its id. `prompt`: a string (needs a tokenizer) or token ids. Sampling:
        a SamplingParams or its fields as keywords (max_new_tokens, temperature, top_k, top_p, seed, stop,
        ignore_eos)."""
        if params is not None and sampling:
            raise ValueError(f"einfuse: give sampling as params= or as keywords, not both ({sorted(sampling)})")
        params = params or SamplingParams(**{k: v for k, v in sampling.items() if v is not None})
        ids = self._encode(prompt)
        if any(isinstance(s, str) for s in params.stop) and self.tokenizer is None:
            raise ValueError("einfuse: string stop sequences need a tokenizer: LLM(model, tokenizer) — or give "
                             "stop sequences as token id lists")
        seq = _Sequence(self._next_id, self._next_id, ids, prompt if isinstance(prompt, str) else ids, params,
                        make_generator(params.seed), isinstance(prompt, str))
        self._next_id += 1
        if params.max_new_tokens == 0:  # nothing to compute: finished at once, reported by the next step
            seq.finish_reason, seq.text = "length", "" if self.tokenizer is not None else None
            self._backlog.append(seq)
        else:
            self._waiting.append(seq)
        return seq.id

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("einfuse: a string prompt needs a tokenizer: LLM(model, tokenizer) — or pass "
                                 "token ids")
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
            if any(not isinstance(t, int) or isinstance(t, bool) for t in ids):
                raise ValueError(f"einfuse: a prompt is a string or a list of token ids (ints), got {prompt!r:.80}")
        if not ids:
            raise ValueError("einfuse: empty prompt; give at least one token (a BOS token, if nothing else)")
        bad = sorted({t for t in ids if not 0 <= t < self.vocab_size})
        if bad:
            raise ValueError(f"einfuse: token ids {bad[:8]} are outside the model's vocabulary "
                             f"[0, {self.vocab_size}); check the tokenizer matches the model")
        if len(ids) > self.max_model_len:
            raise ValueError(f"einfuse: a prompt of {len(ids)} tokens can never run: the longest is "
                             f"{self.max_model_len}, set by {self._length_bound}; shorten the prompt")
        return ids

    def abort(self, request_id: int) -> RequestOutput | None:
        """Stop a request now and free its blocks; its output so far (finish_reason "abort"). A request that
        already finished: a no-op, None. An id this engine never issued: KeyError."""
        for queue in (self._running, self._waiting):
            for seq in queue:
                if seq.id == request_id:
                    queue.remove(seq)
                    self._release(seq)
                    seq.finish_reason = "abort"
                    return seq.result()
        if isinstance(request_id, int) and 0 <= request_id < self._next_id:
            return None
        raise KeyError(f"einfuse: no request {request_id!r}; ids come from LLM.add_request ({self._next_id} "
                       f"issued so far, from 0)")

    def has_unfinished(self) -> bool:
        return bool(self._running or self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def _release(self, seq: _Sequence) -> None:
        blocks = self.blocks.free(seq.id)
        if hasattr(self.runner, "release"):
            self.runner.release(seq.id, blocks)

    # -------------------------------------------------------------------------------------------------- steps
    def step(self) -> list[RequestOutput]:
        """Run one step: schedule, run the runner once, sample; the outputs of the requests that finished (also
        those that finished with max_new_tokens=0, or while `generate`/`stream` ran the steps)."""
        done = self._backlog + self._step()[0]
        self._backlog = []
        return [seq.result() for seq in done]

    def _step(self) -> tuple[list[_Sequence], list[tuple[_Sequence, int]]]:
        """One step: (the requests it finished, (request, new token) for every token sampled)."""
        start = time.perf_counter()
        plan = self.scheduler.schedule(self._running, self._waiting, self.blocks)
        for seq in plan.preempted:
            self._running.remove(seq)
            if hasattr(self.runner, "release"):
                self.runner.release(seq.id, plan.freed[seq.id])
            seq.num_computed = 0
            seq.preemptions += 1
            self._waiting.append(seq)
        for seq in plan.admitted:
            self._waiting.remove(seq)
            self._running.append(seq)
        if not plan.chunks:
            if self._running or self._waiting:
                raise RuntimeError(f"einfuse: the scheduler {type(self.scheduler).__name__} scheduled nothing "
                                   f"with {len(self._running)} running and {len(self._waiting)} waiting requests")
            return [], []

        entries = [StepEntry(seq.id, tuple(seq.tokens[seq.num_computed:seq.num_computed + n]), seq.num_computed,
                             tuple(self.blocks.table(seq.id)),
                             seq.num_computed + n == len(seq.tokens) and seq.id not in plan.partial,
                             plan.layers.get(seq.id))
                   for seq, n in plan.chunks]
        logits = self.runner.step(entries)
        greedy = [i for i, (seq, _) in enumerate(plan.chunks) if entries[i].sample and seq.params.greedy]
        argmax = dict(zip(greedy, logits[greedy].argmax(dim=-1).tolist())) if greedy else {}

        prefilled = decoded = 0
        new_tokens, finished = [], []
        for i, ((seq, n), entry) in enumerate(zip(plan.chunks, entries)):
            if seq.id in plan.partial:
                continue  # a layered prefill part-way through the layers: computed when its last group runs
            if n == 1 and entry.sample and len(seq.tokens) > seq.prompt_len:
                decoded += 1  # the token sampled last step
            else:
                prefilled += n
            seq.num_computed += n
            if not entry.sample:
                continue
            token = argmax[i] if i in argmax else sample(logits[i], seq.params, seq.generator)
            seq.tokens.append(token)
            new_tokens.append((seq, token))
            self._check_stop(seq)
            if seq.finish_reason is not None:
                self._running.remove(seq)
                self._release(seq)
                finished.append(seq)
        if self.policy.window is not None:
            for seq in self._running:
                evicted = self.blocks.evict_before(seq.id, self.policy.first_live(seq.num_computed))
                if evicted and hasattr(self.runner, "release"):
                    self.runner.release(seq.id, evicted)
        self.stats.append(StepStats(
            len(self.stats), prefilled, decoded, len(new_tokens), len(self._running), len(self._waiting),
            len(plan.preempted), len(plan.admitted), len(finished), self.blocks.blocks_in_use,
            time.perf_counter() - start, getattr(self.runner, "last_step_bytes", None)))
        return finished, new_tokens

    def _check_stop(self, seq: _Sequence) -> None:
        """Set seq.finish_reason/stop_reason if its last token ends it; keep seq.text current."""
        why = stopped(seq.output, seq.params, self.eos_token_ids)
        if self.tokenizer is not None:
            seq.text = self.tokenizer.decode(seq.output, skip_special_tokens=True)
            cuts = [(seq.text.find(s), s) for s in seq.params.stop if isinstance(s, str) and s in seq.text]
            if cuts:
                at, s = min(cuts)
                seq.text = seq.text[:at]
                why = ("stop", s)
        if why is None and len(seq.tokens) >= self.max_model_len:
            why = ("length", None)
        if why is not None:
            seq.finish_reason, seq.stop_reason = why

    # ------------------------------------------------------------------------------------------- front ends
    def _add_batch(self, prompts, sampling: dict) -> tuple[bool, list[_Sequence]]:
        """Add every prompt (a single prompt or a batch): (was it a single prompt, the requests). A bad prompt
        adds none."""
        single = isinstance(prompts, str) or (isinstance(prompts, torch.Tensor) and prompts.dim() == 1) or (
            isinstance(prompts, (list, tuple)) and len(prompts) > 0 and all(isinstance(t, int) for t in prompts))
        batch = [prompts] if single else list(prompts)
        seeds = sampling.pop("seed", None)
        seeds = list(seeds) if isinstance(seeds, (list, tuple)) else [seeds] * len(batch)
        if len(seeds) != len(batch):
            raise ValueError(f"einfuse: {len(seeds)} seeds for {len(batch)} prompts; give one seed or one each")
        params = [SamplingParams(seed=seed, **{k: v for k, v in sampling.items() if v is not None})
                  for seed in seeds]
        ids = []
        try:
            for prompt, p in zip(batch, params):
                ids.append(self.add_request(prompt, p))
        except Exception:
            for i in ids:
                self.abort(i)
            self._backlog = [seq for seq in self._backlog if seq.id not in ids]
            raise
        mine = {seq.id: seq for seq in self._waiting + self._backlog if seq.id in ids}
        return single, [mine[i] for i in ids]

    def _drive(self, seqs: list[_Sequence]):
        """Step until `seqs` finish, yielding (request, new token) as tokens come and (request, None) when one
        finishes; other requests' finished outputs wait in the backlog for `step`. Closing the generator early
        aborts the unfinished `seqs`."""
        pending = {seq.id: seq for seq in seqs}
        for seq in [s for s in self._backlog if s.id in pending]:  # finished at once (max_new_tokens=0)
            self._backlog.remove(seq)
            del pending[seq.id]
            yield seq, None
        try:
            while pending:
                for i in [i for i, seq in pending.items() if seq.finish_reason == "abort"]:
                    del pending[i]  # aborted from outside, between our steps
                if not pending:
                    return
                finished, new_tokens = self._step()
                for seq, token in new_tokens:
                    if seq.id in pending:
                        yield seq, token
                for seq in finished:
                    if pending.pop(seq.id, None) is not None:
                        yield seq, None
                    else:
                        self._backlog.append(seq)
        finally:
            for i, seq in pending.items():
                if seq.finish_reason is None:
                    self.abort(i)

    def generate(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed=None, stop=None, ignore_eos: bool = False):
        """Complete a prompt or a batch of prompts (of any lengths). A string prompt (needs a tokenizer) gives
        a string (the generated text), token ids give the generated token ids; a batch gives a list. `seed`:
        one for every request (each draws from its own generator) or a list, one per prompt."""
        single, seqs = self._add_batch(prompts, dict(max_new_tokens=max_new_tokens, temperature=temperature,
                                                     top_k=top_k, top_p=top_p, seed=seed, stop=stop,
                                                     ignore_eos=ignore_eos))
        for _ in self._drive(seqs):
            pass
        outs = [seq.text if seq.wants_text else seq.output for seq in seqs]
        return outs[0] if single else outs

    def stream(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed=None, stop=None, ignore_eos: bool = False):
        """Like `generate`, yielding (request id, new piece) as tokens come: the new text for string prompts
        (held back while it could still begin a string stop sequence or end in an unfinished character), the
        new token id otherwise. `abort(id)` stops one request; leaving the loop early aborts the rest."""
        _, seqs = self._add_batch(prompts, dict(max_new_tokens=max_new_tokens, temperature=temperature,
                                                top_k=top_k, top_p=top_p, seed=seed, stop=stop,
                                                ignore_eos=ignore_eos))
        shown = {seq.id: 0 for seq in seqs}  # characters of each request's text yielded so far
        for seq, token in self._drive(seqs):
            if not seq.wants_text:
                if token is not None:
                    yield seq.id, token
                continue
            text, end = seq.text or "", len(seq.text or "")
            if token is not None:
                if seq.finish_reason is not None:
                    continue  # its final text comes with the finish
                end -= max((len(s) - 1 for s in seq.params.stop if isinstance(s, str)), default=0)
                while end > shown[seq.id] and text[end - 1] == "\ufffd":
                    end -= 1
            if end > shown[seq.id]:
                yield seq.id, text[shown[seq.id]:end]
                shown[seq.id] = end
