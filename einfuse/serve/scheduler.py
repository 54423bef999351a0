"""Scheduling policies: which requests advance by how many tokens in the next step. A policy is a small class
behind one interface, `Scheduler.schedule(running, waiting, blocks) -> Schedule`; it claims the blocks for what
it schedules from the BlockManager, and when blocks run out it preempts the *newest* running request (its blocks
are freed; it goes back to waiting with its prompt + generated tokens, recomputed when readmitted). A request
never preempts an older one, so the oldest request always advances.

* ChunkedPrefill (`"chunked"`, Sarathi-Serve's stall-free batching): every running decode advances one token;
  prefills fill the rest of the per-step token budget in chunks, oldest first.
* WholePrompt (`"none"`, the baseline): every running decode advances one token; a waiting request is
  admitted only when its whole prompt fits in what is left of the budget.

Both admit waiting requests first come, first served (a request that does not fit holds back the younger
ones; a step that preempted admits none), and never more running requests than the token budget, so every
running decode fits every step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .blocks import BlockManager


class Request:
    """What a scheduler sees of a request: its id, its arrival order, its tokens (prompt + generated so far) and
    how many of them are in the KV cache."""

    def __init__(self, id: int, arrival: int, tokens: list[int]):
        self.id = id
        self.arrival = arrival
        self.tokens = list(tokens)
        self.prompt_len = len(self.tokens)
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.preemptions = 0

    @property
    def remaining(self) -> int:
        """Tokens not yet in the cache: 1 for a decode (the token sampled last step), more for a prefill."""
        return len(self.tokens) - self.num_computed

    def __repr__(self) -> str:
        return f"Request({self.id}, {self.num_computed}/{len(self.tokens)} computed)"


@dataclass
class Schedule:
    """One step's plan: `chunks` (request, number of its next tokens to process), in the order scheduled;
    `admitted` moved from waiting to running; `preempted` moved from running to waiting, their blocks freed
    (`freed`: request id -> blocks). A layered policy (layered.py) also sets `layers` (request id -> the model
    layers [lo, hi) its chunk passes through this step; absent: all) and `partial` (the requests whose chunk
    stops before the last layer: its tokens are not computed yet and nothing is sampled)."""
    chunks: list[tuple[Request, int]] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    freed: dict[int, list[int]] = field(default_factory=dict)
    layers: dict[int, tuple[int, int]] = field(default_factory=dict)
    partial: set[int] = field(default_factory=set)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.chunks)


class Plan:
    """The state of one `schedule` call: what still runs (oldest first), the budget left, the chunks so far."""

    def __init__(self, running: list[Request], blocks: BlockManager, budget: int):
        self.running = sorted(running, key=lambda r: r.arrival)  # oldest first
        self.blocks = blocks
        self.budget = budget
        self.out = Schedule()
        self.tokens: dict[int, int] = {}  # request id -> tokens scheduled

    def add(self, req: Request, n: int) -> None:
        self.tokens[req.id] = n
        self.budget -= n

    def preempt_newest(self) -> Request:
        victim = self.running.pop()
        self.budget += self.tokens.pop(victim.id, 0)
        self.out.freed[victim.id] = self.blocks.free(victim.id)
        self.out.preempted.append(victim)
        return victim

    def finish(self) -> Schedule:
        by_id = {r.id: r for r in self.running}
        self.out.chunks = [(by_id[i], n) for i, n in self.tokens.items()]
        return self.out


class Scheduler:
    """A scheduling policy over a per-step token budget (`max_batch_tokens`). Subclasses implement `schedule`,
    usually as: `plan = Plan(running, blocks, budget)`, `advance` running requests and `admit` waiting ones in
    the policy's order, `return plan.finish()`."""
    name = "base"

    def __init__(self, max_batch_tokens: int = 256, max_running: int | None = None):
        if max_batch_tokens < 1:
            raise ValueError(f"einfuse: max_batch_tokens must be at least 1, got {max_batch_tokens}")
        self.max_batch_tokens = max_batch_tokens
        self.max_running = min(max_running or max_batch_tokens, max_batch_tokens)

    def schedule(self, running: list[Request], waiting: list[Request], blocks: BlockManager) -> Schedule:
        """Plan the next step: claim blocks for every chunk scheduled (`blocks.allocate`), free the blocks of
        the requests preempted. `running` hold blocks; `waiting` hold none (num_computed == 0)."""
        raise NotImplementedError

    def max_sequence_tokens(self) -> int | None:
        """The longest sequence (prompt + generated) this policy can ever run, or None for no bound of its own."""
        return None

    def advance(self, plan: Plan, req: Request, n: int, shrink: bool) -> None:
        """Schedule `n` tokens of the running `req` (with `shrink`, fewer — down to one — when blocks are
        short), preempting the newest running requests while its blocks cannot be allocated; `req` itself
        is preempted when it is the newest."""
        while True:
            fit = min(n, plan.blocks.max_tokens(req.id) - req.num_computed) if shrink else n
            if fit >= 1 and plan.blocks.allocate(req.id, req.num_computed + fit):
                plan.add(req, fit)
                return
            if plan.preempt_newest() is req:
                return

    def admit(self, plan: Plan, waiting: list[Request], whole: bool) -> None:
        """Admit waiting requests oldest first while the budget, the running limit and the free blocks allow
        (`whole`: only with all their tokens); stop at the first that does not fit. None in a step that
        preempted: the preempted requests (back in waiting next step) go before younger ones."""
        if plan.out.preempted:
            return
        for req in sorted(waiting, key=lambda r: r.arrival):
            if len(plan.running) >= self.max_running:
                return
            n = min(req.remaining, plan.budget, plan.blocks.max_tokens(req.id) - req.num_computed)
            if n < 1 or (whole and n < req.remaining):
                return
            plan.blocks.allocate(req.id, req.num_computed + n)
            plan.running.append(req)
            plan.out.admitted.append(req)
            plan.add(req, n)


class ChunkedPrefill(Scheduler):
    """Sarathi-Serve's stall-free batching: running decodes first (one token each, oldest first), then
    running prefills, then waiting requests, each prefill taking as much of the remaining budget as it needs
    (a chunk), oldest first."""
    name = "chunked"

    def schedule(self, running, waiting, blocks):
        plan = Plan(running, blocks, self.max_batch_tokens)
        order = ([r for r in plan.running if r.remaining == 1] +  # decodes
                 [r for r in plan.running if r.remaining > 1])  # prefills cut short by the budget last step
        for req in order:
            if plan.budget == 0:
                break
            if req in plan.running:  # not preempted by an older request this step
                self.advance(plan, req, min(req.remaining, plan.budget), shrink=True)
        self.admit(plan, waiting, whole=False)
        return plan.finish()


class WholePrompt(Scheduler):
    """The baseline without chunking: running decodes advance one token each; a waiting request is admitted
    only when its whole prompt (after a preemption: prompt + generated tokens) fits in the budget left, so the
    longest sequence it can run is `max_batch_tokens`."""
    name = "none"

    def schedule(self, running, waiting, blocks):
        plan = Plan(running, blocks, self.max_batch_tokens)
        for req in list(plan.running):
            if req in plan.running and req.remaining <= plan.budget:
                self.advance(plan, req, req.remaining, shrink=False)
        self.admit(plan, waiting, whole=True)
        return plan.finish()

    def max_sequence_tokens(self) -> int:
        return self.max_batch_tokens


SCHEDULERS = {cls.name: cls for cls in (ChunkedPrefill, WholePrompt)}


def make_scheduler(scheduler, max_batch_tokens: int) -> Scheduler:
    """A Scheduler from a name in SCHEDULERS ("chunked", "none") or an instance (returned as it is)."""
    if isinstance(scheduler, Scheduler):
        return scheduler
    if scheduler not in SCHEDULERS:
        raise ValueError(f"einfuse: unknown scheduler {scheduler!r}; choose one of {sorted(SCHEDULERS)} "
                         f"or pass a Scheduler instance")
    return SCHEDULERS[scheduler](max_batch_tokens)
