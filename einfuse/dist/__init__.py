"""Tensor parallelism on torch.distributed: `einfuse.compile(model, args, dist=einfuse.Dist(tp=2))` inside a
torchrun job (or `einfuse run-dist --nproc 2 script.py`).

Each rank captures and lowers the same model, checks with the others that it is the same (a hash of the
IR and the settings, exchanged before anything else), shards it (`einfuse.passes.sharding`: Megatron's
plan inferred, each rank's weight slices, the collectives the split reductions need), optionally applies
the overlap passes (`einfuse.passes.overlap`), and runs its share; collectives run on the process group
with async_op=True and are waited for where read. A rank that dies makes the others fail with an error
naming it (heartbeats); every collective has the group's timeout. A per-rank Chrome-trace timeline of
steps and collectives is written to the dump folder."""
from __future__ import annotations

import atexit
import functools
import json
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist

from ..ir import collective as coll
from ..passes.base import Pass
from ..passes.sharding import Shard, slice_tensor
from .group import DistError, exchange_hash, init, stopped_ranks
from .timeline import chrome_trace

log = logging.getLogger("einfuse")

__all__ = ["Dist", "DistError", "Session", "chrome_trace", "init", "stopped_ranks", "write_timeline"]

OVERLAP_PASSES = ("split_tokens", "allreduce_rmsnorm", "overlap_experts")  # see einfuse.passes.overlap


@dataclass(frozen=True)
class Dist:
    """How to split a model over the ranks of a torchrun job: `tp` ranks of tensor parallelism (Megatron's
    plan, or `plan` = {IR parameter name: (dim, fused parts)}) or `ep` ranks of expert parallelism (each
    rank holds 1/ep of the experts; an all-reduce combines them) or both (tp*ep ranks: the attention and
    dense layers split over groups of tp consecutive ranks, the experts over the ranks tp apart), `overlap`
    passes by name (e.g.
    ("split_tokens",)), the collectives' `timeout_s`, and whether ranks record a `timeline`."""

    tp: int = 1
    ep: int = 1
    overlap: tuple = ()
    timeout_s: float = 60.0
    plan: tuple | None = None  # ((param, (dim, outer)), ...) to override the inferred plan
    timeline: bool = True

    def __post_init__(self):
        object.__setattr__(self, "overlap", tuple(self.overlap))
        if self.plan is not None and isinstance(self.plan, dict):
            object.__setattr__(self, "plan", tuple(sorted(self.plan.items())))
        bad = [p for p in self.overlap if p not in OVERLAP_PASSES]
        if bad:
            raise ValueError(f"einfuse: unknown overlap pass {bad[0]!r}; available: {', '.join(OVERLAP_PASSES)}")
        if self.tp < 1 or self.ep < 1:
            raise ValueError("einfuse: Dist(tp, ep) are numbers of ranks, at least 1")

    def start(self, model=None) -> Session:
        """Join the process group and check the model's shape fits this split."""
        init(self.timeout_s)
        world = tdist.get_world_size()
        if self.tp * self.ep != world:
            raise DistError(f"einfuse: Dist(tp={self.tp}, ep={self.ep}) needs a world of {self.tp * self.ep} ranks; "
                            f"this job has {world} (torchrun --nproc-per-node {self.tp * self.ep})")
        if model is not None:
            check_divides(getattr(model, "config", None), self.tp, self.ep)
        if self.tp > 1 and self.ep > 1:  # every rank makes every subgroup, in the same order
            for ranks in self.tp_groups(world) + self.ep_groups(world):
                if ranks not in coll.ENV.groups:
                    coll.ENV.groups[ranks] = tdist.new_group(list(ranks))
        return Session(self, tdist.get_rank(), tuple(range(world)))

    def tp_groups(self, world: int) -> list:
        """With tp and ep together: ranks r*tp .. r*tp + tp - 1 split the attention and dense layers."""
        return [tuple(range(g * self.tp, (g + 1) * self.tp)) for g in range(world // self.tp)]

    def ep_groups(self, world: int) -> list:
        """With tp and ep together: ranks p, p + tp, p + 2*tp, ... split the experts."""
        return [tuple(range(p, world, self.tp)) for p in range(self.tp)]


def check_divides(config, tp: int, ep: int = 1) -> None:
    """A clear error at compile time when `tp` ranks cannot split the model's heads, KV heads, experts or
    MLP width evenly, or `ep` ranks its experts."""
    if config is None:
        return
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        n = getattr(config, key, None)
        if ep > 1 and isinstance(n, int) and n % ep:
            raise DistError(f"einfuse: expert parallelism over {ep} ranks cannot split {n} experts (config.{key}); "
                            f"use a number of ranks that divides {n}")
    if tp == 1:
        return
    for key, what in [("num_attention_heads", "attention heads"), ("n_head", "attention heads"),
                      ("num_key_value_heads", "key/value heads"), ("num_local_experts", "experts"),
                      ("num_experts", "experts"), ("intermediate_size", "MLP width"), ("n_inner", "MLP width")]:
        n = getattr(config, key, None)
        if isinstance(n, int) and n % tp:
            raise DistError(f"einfuse: tensor parallelism over {tp} ranks cannot split {n} {what} "
                            f"(config.{key}); use a number of ranks that divides {n}")


class CheckSame(Pass):
    """Every rank lowered the same module with the same settings (a hash exchanged; a mismatch is an
    error on every rank, not a hang)."""

    name = "check_same_model"

    def __init__(self, spec: Dist):
        self.spec = spec

    def fingerprint(self) -> str:
        return f"check_same:{self.spec}"

    def run(self, module):
        exchange_hash(str(module) + repr(self.spec), "model (IR and Dist settings)")
        return module


@dataclass
class Session:
    """One rank's part of a distributed compile: the passes that shard its module, its weights' slices,
    and its timeline."""

    spec: Dist
    rank: int
    ranks: tuple
    shards: list = field(default_factory=list)
    runners: list = field(default_factory=list)

    def prepare(self) -> tuple:
        """The passes run on the whole lowered module before the pipeline: the hash check, sharding, overlap."""
        from ..passes.overlap import overlap_passes

        spec = self.spec
        if spec.tp > 1 and spec.ep > 1:  # attention and dense layers over the tp group, experts over the ep group
            world = len(self.ranks)
            tp = next(g for g in spec.tp_groups(world) if self.rank in g)
            ep = next(g for g in spec.ep_groups(world) if self.rank in g)
            shards = (Shard(tp, tp.index(self.rank), dict(spec.plan) if spec.plan else "dense"),
                      Shard(ep, ep.index(self.rank), "experts", vocab_parallel=False))
        else:
            plan = dict(spec.plan) if spec.plan else ("experts" if spec.ep > 1 else "megatron")
            shards = (Shard(self.ranks, self.ranks.index(self.rank), plan, vocab_parallel=spec.ep == 1),)
        self.shards.append(shards)
        return (CheckSame(spec),) + shards + tuple(overlap_passes(spec.overlap))

    def pipeline(self, passes=None) -> list:
        """The pipeline after sharding and the overlap passes (see einfuse.passes.overlap.overlap_pipeline)."""
        from ..passes.overlap import overlap_pipeline

        return overlap_pipeline(self.spec.overlap, passes)

    def bind(self, v):
        """A built variant reads this rank's slices of the split weights; its runner records a timeline."""
        shards = self.shards[-1]
        gathers = [g for shard in shards for g in shard.gathers]
        if gathers:  # correct, but the plan did not fit these reads: each costs an all-gather per call
            log.warning("einfuse: the sharding plan left %d reads misaligned (all-gathered every call): %s",
                        len(gathers), ", ".join(gathers[:8]))
        # the same weights on every rank (a model built without the same seed would compute garbage silently)
        sample = [f"{n}:{float(t.detach().flatten()[:256].double().sum()):.9e}" for n, t in sorted(v.bindings.items())
                  if isinstance(t, torch.Tensor) and t.numel()]
        exchange_hash("\n".join(sample), "weights (sampled)")
        # the same collectives in the same order, or the first mismatched one hangs or garbles the transport
        types = v.ir.types() if v.ir is not None else {}
        schedule = [f"{op.kind}:{types[op.src]}:{op.op}:{op.dim}:{len(op.ranks)}" for op in getattr(v.ir, "body", ())
                    if isinstance(op, coll.Collective)]  # group sizes: with tp and ep the groups themselves differ
        exchange_hash("\n".join(schedule), "collectives (kind, shape, order) after einfuse's passes",
                      fix="the sharding and overlap passes made different programs on different ranks: an einfuse "
                          "bug; please report it with the dump folder (dump_dir)")
        for shard in shards:
            for name, lay in shard.slices.items():
                if name in v.bindings:
                    if name in v.cuts:
                        raise DistError(f"einfuse: {name} is split twice (tensor and expert parallelism); give "
                                        "Dist(plan=...) a plan that leaves the experts to ep")
                    v.cuts[name] = functools.partial(slice_tensor, lay=lay, part=shard.part)
                    v.bindings[name] = v.cuts[name](v.bindings[name])
        if self.spec.timeline and hasattr(v.run, "timeline"):
            v.run.timeline = []
            coll.ENV.events = []
            self.runners.append(v)
            if v.dump_dir:
                _AT_EXIT.append((self, v.dump_dir))
        return v

    def timeline(self) -> dict:
        """The Chrome trace (Perfetto) of this rank's calls so far."""
        return chrome_trace(self.rank, self.runners, coll.ENV.events or [])


_AT_EXIT: list = []


def write_timeline(session: Session, directory: str) -> str:
    """Write `timeline_rank<r>.json` (Chrome trace, open in Perfetto) into `directory`; returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"timeline_rank{session.rank}.json")
    with open(path, "w") as f:
        json.dump(session.timeline(), f)
    return path


@atexit.register
def _write_timelines():
    for session, directory in _AT_EXIT:
        try:
            write_timeline(session, directory)
        except Exception:  # noqa: BLE001, S110 (exiting: nothing to report to)
            pass
