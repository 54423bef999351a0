"""The process group under a distributed compile: started from torchrun's environment, with a heartbeat per
rank (so a failed collective names the rank that stopped) and a hash exchange (so ranks that compiled
different models or settings fail at start, not in a hang)."""
from __future__ import annotations

import atexit
import hashlib
import os
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from ..ir import collective as coll

BEAT_S = 0.25  # how often each rank writes its heartbeat
_state = {"thread": None, "store": None, "stop": None}


class DistError(RuntimeError):
    """A distributed run that cannot go on: mismatched ranks, a dead rank, a world that does not fit."""


def init(timeout_s: float = 60.0, backend: str | None = None) -> None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) unless the
    program already did; gloo on CPU, NCCL with CUDA. Starts the heartbeat and the failure explainer."""
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise DistError(f"einfuse: dist= needs a torchrun job (or einfuse run-dist); {', '.join(missing)} "
                            "not set. Start it with: torchrun --nproc-per-node 2 script.py")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        atexit.register(_shutdown)  # we started the group: end it (and the heartbeat) before the interpreter
    if _state["thread"] is None:
        _start_heartbeat()
    coll.ENV.explain = explain


def _store():
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()  # the rendezvous store every rank already shares
    except Exception:  # noqa: BLE001 (no store: failures are reported without naming a rank)
        return None


def _start_heartbeat() -> None:
    store = _store()
    if store is None:
        return
    rank = dist.get_rank()
    stop = threading.Event()

    def beat():
        n = 0
        while not stop.is_set():
            try:
                store.set(f"einfuse/beat/{rank}", f"{n}:{coll.ENV.issued}")
            except Exception:  # noqa: BLE001 (the store is gone: the run is ending)
                return
            n += 1
            stop.wait(BEAT_S)

    t = threading.Thread(target=beat, name="einfuse-heartbeat", daemon=True)
    t.start()
    _state.update(thread=t, store=store, stop=stop)


def _beats(store, world: int) -> dict:
    out = {}
    for r in range(world):
        try:
            out[r] = store.get(f"einfuse/beat/{r}") if store.check([f"einfuse/beat/{r}"]) else None
        except Exception:  # noqa: BLE001
            out[r] = None
    return out


def stopped_ranks(wait_s: float = 6 * BEAT_S) -> list:
    """Ranks whose heartbeat does not move over `wait_s` seconds."""
    store = _state["store"]
    if store is None or not dist.is_initialized():
        return []
    world, me = dist.get_world_size(), dist.get_rank()
    before = _beats(store, world)
    time.sleep(wait_s)
    after = _beats(store, world)
    return [r for r in range(world) if r != me and (after[r] is None or after[r] == before[r])]


def explain(exc: BaseException, what) -> str:
    """A failed collective in words, naming the ranks that stopped."""
    try:
        dead = stopped_ranks()
    except Exception:  # noqa: BLE001 (the store itself is gone)
        dead = None
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    me = dist.get_rank() if dist.is_initialized() else "?"
    if dead:
        names = ", ".join(f"rank {r}" for r in dead)
        return (f"{names} stopped responding (no heartbeat; it died), so rank {me} cannot go on "
                f"[{type(exc).__name__}: {first}]")
    if dead is None:
        return f"the rendezvous store is unreachable (rank 0 or the launcher died) [{type(exc).__name__}: {first}]"
    behind = behind_ranks()
    if behind:
        names = ", ".join(f"rank {r} ({n} collectives issued, this rank {coll.ENV.issued})" for r, n in behind)
        return (f"{names} is alive but behind: it hangs or is stuck before this collective, so rank {me} timed "
                f"out [{type(exc).__name__}: {first}]")
    return f"{type(exc).__name__}: {first} (every rank's heartbeat is alive: a timeout or a mismatched collective)"


def behind_ranks() -> list:
    """(rank, collectives it issued) for the ranks that issued fewer collectives than this one."""
    store = _state["store"]
    if store is None or not dist.is_initialized():
        return []
    out = []
    for r, v in _beats(store, dist.get_world_size()).items():
        if r == dist.get_rank() or v is None:
            continue
        issued = int(v.decode().split(":")[1]) if isinstance(v, bytes) else int(str(v).split(":")[1])
        if issued < coll.ENV.issued:
            out.append((r, issued))
    return out


def exchange_hash(text: str, what: str, fix: str = "every rank must run the same model, config and Dist settings") -> None:
    """Every rank hashes `text` (the model's IR and the settings); different hashes are an error naming the
    ranks that differ from rank 0, raised on every rank before any collective of the model runs."""
    digest = hashlib.sha256(text.encode()).digest()
    mine = torch.frombuffer(bytearray(digest), dtype=torch.uint8).clone()
    world = dist.get_world_size()
    parts = [torch.empty_like(mine) for _ in range(world)]
    try:
        dist.all_gather(parts, mine)
    except Exception as exc:
        raise DistError(f"einfuse: exchanging the {what} hash failed: {explain(exc, 'hash exchange')}") from exc
    differ = [r for r in range(world) if not torch.equal(parts[r], parts[0])]
    if differ:
        ranks = ", ".join(str(r) for r in differ)
        raise DistError(f"einfuse: rank(s) {ranks} differ from rank 0 in their {what} (hash "
                        f"{parts[differ[0]][:4].tolist()} vs {parts[0][:4].tolist()}); {fix}")


def stop_heartbeat() -> None:
    if _state["stop"] is not None:
        _state["stop"].set()


def _shutdown() -> None:
    stop_heartbeat()
    if _state["thread"] is not None:
        _state["thread"].join(timeout=2 * BEAT_S)
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001, S110 (exiting after a failure: nothing left to end cleanly)
        pass
