"""Layered prefill ("From Tokens to Layers: Redefining Stall-Free Scheduling", 2025): the model is split
*vertically* into G contiguous layer groups, and a prefilling request advances through one group per step
with its whole prompt, while the running decodes pass through every layer in every step. Chunked prefill
(scheduler.ChunkedPrefill) instead cuts the prompt along tokens and sends every chunk through every layer,
so a mixture-of-experts layer loads the experts a prompt routes to once per chunk; here it loads them once per
prompt (per segment, below), and the prefill work added to one step stays bounded by the same token budget.

The budget is counted in *token-layers*: a token through the whole model costs 1, a token through a group of
`k` of the model's `L` layers costs k/L (rounded up over the chunk). So at the same `max_batch_tokens` a
layered step does at most the work of a chunked step, and a prompt of up to `budget x L / k` tokens goes
through a group in one step. A longer prompt is cut into such *segments*, each walking the groups in turn
(one segment of a request in flight at a time; the next attends to the cached keys of the ones before).

    sched = LayeredPrefill(num_layers=8, groups=4, max_batch_tokens=256)
    llm = LLM(model, scheduler=sched, runner=LayerGroupRunner(model))

`LayerGroupRunner` is the ModelRunner that can stop a prefill after any layer: the transformers model's own
modules run one decoder layer at a time (embedding before the first group, norm and LM head after the last),
each request's keys/values in a transformers DynamicCache, the hidden state of a prefill between groups
held until its next group runs. It is an eager runner (like runner.EagerRunner, it ignores the paged blocks).
`CompiledLayerGroupRunner` runs the same on einfuse's compiled programs: the serving prefill program cut into
layer-group stages by passes.stages (`stage_programs`), each stage built by the backend and writing the paged
cache states PagedRunner's prefill/decode programs read.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ..passes.stages import layer_groups
from .blocks import DEAD, BlockManager
from .paged import bucket
from .routing import RouterTap, decoder_layers
from .runner import CacheConfig, StepEntry
from .scheduler import Plan, Request, Scheduler


def check_budget(max_batch_tokens: int, max_running: int | None) -> None:
    """A step must fit one token of every running decode: refuse a budget smaller than the decode batch."""
    if max_running is not None and max_running > max_batch_tokens:
        raise ValueError(f"einfuse: a token budget of {max_batch_tokens} is smaller than one decode batch of "
                         f"{max_running} requests (each running decode takes one token every step); raise "
                         f"max_batch_tokens to at least {max_running} or lower max_running")


@dataclass
class _InFlight:
    group: int  # the next group this segment passes through
    tokens: int  # the segment's length


class LayeredPrefill(Scheduler):
    """Layered prefill (see the module docstring): running decodes first (one token through every layer,
    oldest first), then the segments in flight advance one layer group each (oldest first, as the budget
    allows; one that does not fit waits, its hidden state held), then new segments start at group 0 — running
    requests with prompt left, then waiting ones first come, first served. A segment takes further groups in
    the same step while the budget has room (so a prompt that fits the budget whole runs in one step, as
    under chunked prefill); a long prompt's segments fill the budget with one group. `groups` = 1 is chunked
    prefill."""
    name = "layered"

    def __init__(self, num_layers: int, groups: int = 4, max_batch_tokens: int = 256,
                 max_running: int | None = None):
        check_budget(max_batch_tokens, max_running)
        super().__init__(max_batch_tokens, max_running)
        self.num_layers = num_layers
        self.groups = layer_groups(num_layers, groups)
        self.inflight: dict[int, _InFlight] = {}
        self._committed = 0

    def cost(self, tokens: int, first: int, last: int | None = None) -> int:
        """Token-layers of `tokens` through groups first..last (default: first only), rounded up: what they
        take of the step budget."""
        lo, hi = self.groups[first][0], self.groups[first if last is None else last][1]
        return -(-tokens * (hi - lo) // self.num_layers)

    def segment(self, budget: int) -> int:
        """The longest segment whose pass through any group fits `budget`."""
        widest = max(hi - lo for lo, hi in self.groups)
        return budget * self.num_layers // widest

    def _run(self, plan: Plan, req: Request, tokens: int, group: int) -> None:
        """Schedule `tokens` of `req` through `group` and as many groups after it as the budget still allows
        (a short prompt, or a long one's last segment, need not take G steps)."""
        last = group
        while last + 1 < len(self.groups) and self.cost(tokens, group, last + 1) <= plan.budget:
            last += 1
        plan.tokens[req.id] = tokens
        plan.budget -= self.cost(tokens, group, last)
        plan.out.layers[req.id] = (self.groups[group][0], self.groups[last][1])
        if last + 1 < len(self.groups):
            plan.out.partial.add(req.id)
            self.inflight[req.id] = _InFlight(last + 1, tokens)
            self._committed += self.cost(tokens, last + 1)
        else:
            self.inflight.pop(req.id, None)
            self._committed += req.num_computed + tokens == len(req.tokens)  # a decode from the next step

    def _start(self, plan: Plan, req: Request, preempt: bool) -> bool:
        """Start a segment of `req` (running, blocks claimed for it here); False if none fits. Sized so that
        next step, too, has room for every decode and every segment's next group (`_committed`): a segment
        in flight never waits for budget that newer work took. With `preempt`, when blocks are short the
        newest running requests are preempted for it (never an older one; `req` itself when it is the newest)."""
        while True:
            room = self.segment(min(plan.budget, self.max_batch_tokens - self._committed))
            n = min(req.remaining, room, plan.blocks.max_tokens(req.id) - req.num_computed)
            if n >= 1 and plan.blocks.allocate(req.id, req.num_computed + n):
                self._run(plan, req, n, 0)
                return True
            if room < 1 or not preempt:
                return False
            victim = plan.running[-1]
            if victim.id in plan.out.layers:  # scheduled this step as a layered chunk: give back its cost
                lo, hi = plan.out.layers.pop(victim.id)
                plan.budget += -(-plan.tokens[victim.id] * (hi - lo) // self.num_layers) - plan.tokens[victim.id]
                plan.out.partial.discard(victim.id)
            plan.preempt_newest()
            self.inflight.pop(victim.id, None)
            if victim is req:
                return False

    def schedule(self, running, waiting, blocks: BlockManager):
        plan = Plan(running, blocks, self.max_batch_tokens)
        live = {r.id for r in plan.running}
        self.inflight = {i: f for i, f in self.inflight.items() if i in live}  # finished, aborted, preempted
        decodes = [r for r in plan.running if r.remaining == 1 and r.id not in self.inflight]
        for req in decodes:
            if req in plan.running:  # not preempted by an older request this step
                self.advance(plan, req, 1, shrink=False)
        for i in [r.id for r in plan.out.preempted]:
            self.inflight.pop(i, None)  # its blocks are gone: it starts over from waiting
        self._committed = len(plan.tokens)  # next step's budget already promised: these decodes, and below
        for req in [r for r in plan.running if r.id in self.inflight]:  # segments in flight, oldest first
            f = self.inflight[req.id]
            if self.cost(f.tokens, f.group) <= plan.budget:
                self._run(plan, req, f.tokens, f.group)
            else:
                self._committed += self.cost(f.tokens, f.group)
        for req in [r for r in plan.running if r.remaining > 1 and r.id not in plan.tokens]:
            if req in plan.running and req.id not in self.inflight and not self._start(plan, req, preempt=True):
                break
        if not plan.out.preempted:
            for req in sorted(waiting, key=lambda r: r.arrival):
                if len(plan.running) >= self.max_running:
                    break
                plan.running.append(req)
                if not self._start(plan, req, preempt=False):
                    plan.running.pop()
                    break
                plan.out.admitted.append(req)
        return plan.finish()


@dataclass
class _Held:
    """A prefill between layer groups: its hidden state and what every layer of it reads."""
    hidden: torch.Tensor
    mask: object
    position_ids: torch.Tensor
    position_embeddings: tuple
    next_layer: int


class LayerGroupRunner:
    """A ModelRunner that runs any contiguous range of a transformers decoder's layers for an entry (see the
    module docstring); every entry without `layers` runs the whole model. `last_step_routing`: after each
    step, the MoE layers' activated experts (layer -> expert ids, routing.RouterTap); `forwards`: layer calls."""
    runs_layer_groups = True

    def __init__(self, model):
        from transformers import DynamicCache
        from transformers.masking_utils import create_causal_mask

        self.model = model
        self.core = model.model
        self.layers = decoder_layers(model)
        self.config = model.config.get_text_config()
        window = getattr(self.config, "sliding_window", None) if getattr(self.config, "use_sliding_window",
                                                                           True) else None
        if window or any(t != "full_attention" for t in getattr(self.config, "layer_types", None) or ()):
            raise ValueError("einfuse: LayerGroupRunner runs full-attention decoders; this model has sliding-"
                             "window layers")
        self._new_cache = lambda: DynamicCache(config=self.config)
        self._mask = create_causal_mask
        params = inspect.signature(type(self.core).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.cache: CacheConfig | None = None
        self.caches: dict[int, object] = {}
        self.held: dict[int, _Held] = {}
        self.tap = RouterTap(model)
        self.last_step_routing: dict = {}
        self.last_step_bytes = None
        self.layer_calls = 0

    def bind(self, cache: CacheConfig) -> None:
        if cache.policy.window is not None:
            raise ValueError("einfuse: LayerGroupRunner keeps every position (no sliding window or StreamingLLM "
                             "cache policy)")
        self.cache = cache

    def release(self, request_id: int, blocks: list[int]) -> None:
        self.caches.pop(request_id, None)  # finished, aborted or preempted (no window: nothing is evicted)
        self.held.pop(request_id, None)

    @torch.no_grad()
    def step(self, entries: list[StepEntry]) -> torch.Tensor:
        if self.cache is None:
            raise RuntimeError("einfuse: LayerGroupRunner.step before bind(); LLM binds its runner when it is made")
        self.tap.take()
        rows = [self._entry(e) for e in entries]
        self.last_step_routing = self.tap.take()
        return torch.stack(rows)

    def _entry(self, e: StepEntry) -> torch.Tensor:
        lo, hi = e.layers or (0, len(self.layers))
        device = next(self.model.parameters()).device
        if lo == 0:
            if e.start == 0:
                self.caches[e.request_id] = self._new_cache()
            cache = self.caches.get(e.request_id)
            if cache is None or cache.get_seq_length() != e.start:
                raise RuntimeError(f"einfuse: request {e.request_id} sent tokens from position {e.start}, but its "
                                   f"cache holds {cache.get_seq_length() if cache is not None else 0}")
            ids = torch.tensor([e.token_ids], device=device)
            hidden = self.core.embed_tokens(ids)
            pos = torch.arange(e.start, e.start + len(e.token_ids), device=device)[None]
            mask = self._mask(config=self.config, inputs_embeds=hidden, attention_mask=None, cache=cache,
                              position_ids=pos)
            held = _Held(hidden, mask, pos, self.core.rotary_emb(hidden, position_ids=pos), 0)
        else:
            held = self.held.pop(e.request_id, None)
            if held is None or held.next_layer != lo:
                raise RuntimeError(f"einfuse: request {e.request_id} asks for layers {lo}..{hi - 1}, but its "
                                   f"prefill stopped before layer {held.next_layer if held else 0}")
            cache = self.caches[e.request_id]
        hidden = held.hidden
        for layer in self.layers[lo:hi]:
            hidden = layer(hidden, attention_mask=held.mask, position_ids=held.position_ids,
                           position_embeddings=held.position_embeddings, use_cache=True,
                           **{self._cache_kw: cache})
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            self.layer_calls += 1
        if hi < len(self.layers):
            held.hidden, held.next_layer = hidden, hi
            self.held[e.request_id] = held
            return torch.zeros(self.config.vocab_size, device=device)  # not read (sample=False)
        last = self.core.norm(hidden[:, -1:])
        return self.model.lm_head(last)[0, -1].float()


def layered_runner(model, cache: CacheConfig, groups: int, backend: str | None = None):
    """The runner `LLM(model, scheduler="layered")` uses: LayerGroupRunner for backend "eager", else
    CompiledLayerGroupRunner over `groups` stages; the model converted to the cache's dtype, as make_runner does."""
    if next(model.parameters()).dtype != cache.dtype:
        model.to(cache.dtype)
    if backend == "eager":
        return LayerGroupRunner(model)
    return CompiledLayerGroupRunner(model, groups, backend)


class CompiledLayerGroupRunner:
    """Layered prefill on einfuse's compiled programs: decodes and whole-model chunks run through PagedRunner's
    prefill/decode programs; a chunk over some layer groups runs the *stage programs* of those groups —
    the serving prefill program (one sequence, keys/values in the paged cache states) cut by passes.stages
    into `groups` stages, each built by the backend and sharing PagedRunner's cache states (written in place).
    The values a stage passes on (hidden state, positions, rotary tables, mask) wait per request for its next
    group. `groups` must be the layered scheduler's."""
    runs_layer_groups = True

    def __init__(self, model, groups: int, backend: str | None = None):
        from .paged import PagedRunner

        self.paged = PagedRunner(model, backend)
        self.model = model
        self.groups = groups
        self.stages = None
        self.held: dict[int, dict] = {}
        self.last_step_bytes = None
        self.stage_calls = 0

    def bind(self, cache: CacheConfig) -> None:
        self.paged.bind(cache)
        self.stages = stage_programs(self.model, self.groups, cache.block_size, self.paged.backend)
        missing = {n for s in self.stages.stages for i in s.module.inputs if i.kind == "state"
                   for n in [i.name]} - set(self.paged.states)
        if missing:
            raise RuntimeError(f"einfuse: stage programs read cache states {sorted(missing)} the paged runner "
                               f"does not have")
        self.bounds = [s.layers for s in self.stages.stages]

    def release(self, request_id: int, blocks: list[int]) -> None:
        self.held.pop(request_id, None)

    @torch.no_grad()
    def step(self, entries: list[StepEntry]) -> torch.Tensor:
        whole = [e for e in entries if e.layers is None or e.layers == (0, self.bounds[-1][1])]
        rows = dict(zip((e.request_id for e in whole), self.paged.step(whole))) if whole else {}
        out = []
        for e in entries:
            if e.request_id in rows:
                out.append(rows[e.request_id])
                continue
            out.append(self._stages(e))
        return torch.stack(out)

    def _stages(self, e: StepEntry) -> torch.Tensor:
        lo, hi = e.layers
        first = next(g for g, b in enumerate(self.bounds) if b[0] == lo)
        last = next(g for g, b in enumerate(self.bounds) if b[1] == hi)
        device = self.paged.device
        env = self.held.pop(e.request_id, {}) if first > 0 else {
            "input_ids": torch.tensor([e.token_ids], dtype=torch.int64, device=device),
            "position_ids": torch.arange(e.start, e.start + len(e.token_ids), device=device)[None],
            "block_table": _table(e, device)}
        for g in range(first, last + 1):
            stage, run, bindings = self.stages.stages[g], self.stages.runs[g], self.stages.bindings
            inputs = {i.name: env[i.name] if i.name in env else
                      self.paged.states[i.name] if i.kind == "state" else bindings[i.name]
                      for i in stage.module.inputs}
            env.update(run(inputs))
            self.stage_calls += 1
        if last + 1 < len(self.bounds):
            self.held[e.request_id] = env
            return torch.zeros(self.model.config.get_text_config().vocab_size, device=device)
        logits = env[self.stages.source.outputs[0]]
        return logits.reshape(-1, logits.shape[-1])[-1].float()


def _table(e: StepEntry, device) -> torch.Tensor:
    """One entry's block table padded with DEAD to a power-of-two width, as PagedRunner pads its tables."""
    table = torch.full((1, bucket(len(e.block_table))), DEAD, dtype=torch.int32)
    table[0, :len(e.block_table)] = torch.tensor(e.block_table, dtype=torch.int32)
    return table.to(device)


@dataclass
class StagePrograms:
    """The serving prefill program cut into layer-group stages, each built by a backend."""
    stages: list  # passes.stages.Stage
    runs: list  # the backend's run(inputs) -> outputs per stage
    bindings: dict  # weights by IR input name
    source: object  # the whole (uncut) program


def stage_programs(model, groups: int, block_size: int, backend: str | None = None) -> StagePrograms:
    """Capture `model` as einfuse.api.compile_cached does (one sequence, dynamic tokens, keys and values in paged
    cache states: passes.serving), cut the program into `groups` stages (passes.stages) and build each with the
    backend after cleanup and fusion. State names match compile_cached's programs (the same passes before the
    cut)."""
    from ..frontend.capture import export
    from ..frontend.lower import lower_graph
    from ..passes import Verify, cleanup_passes, fusion_passes, run_pipeline
    from ..passes.serving import CacheKV, Specialize
    from ..passes.stages import partition_stages
    from ..runtime import backends

    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    kwargs = {"input_ids": ids, "position_ids": torch.arange(8).expand(2, 8).contiguous(), "use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    dim = {0: torch.export.Dim("batch", min=1), 1: torch.export.Dim("tokens", min=1)}
    cap = export(model, (), kwargs, dynamic_shapes={k: dim if k in ("input_ids", "position_ids") else None
                                                     for k in kwargs})
    lowered = lower_graph(cap.gm, cap.kinds, f"{type(model).__name__.lower()}_prefill")
    m = run_pipeline(lowered.module, [Specialize({"input_ids": {0: 1}}), *cleanup_passes(), CacheKV(block_size),
                                      *cleanup_passes()], [Verify()])
    cut = partition_stages(m, lowered.instances, groups)
    from ..api import default_backend

    name = backend or default_backend([next(model.parameters())])
    runs = [backends.build(name, run_pipeline(s.module, fusion_passes(), [Verify()])) for s in cut.stages]
    return StagePrograms(cut.stages, runs, dict(cap.bindings), m)
