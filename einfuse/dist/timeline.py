"""A rank's timeline as a Chrome trace (the JSON Perfetto and chrome://tracing open): the program's steps
(one span per IR body position, from the runner's marks) on one track, each collective in flight on
another, and the time the program blocked waiting for it on a third."""
from __future__ import annotations

from itertools import pairwise


def _us(t: float, t0: float) -> float:
    return round((t - t0) * 1e6, 3)


def chrome_trace(rank: int, variants: list, events: list) -> dict:
    """`variants`: compiled variants whose runner recorded marks; `events`: (what, kind, issued, wait start,
    done) from `einfuse.ir.collective.ENV.events`, all in perf_counter seconds."""
    marks = [t for v in variants for _, t in (v.run.timeline or [])]
    starts = marks + [e[2] for e in events]
    t0 = min(starts) if starts else 0.0
    out = [{"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}}]
    for tid, name in ((0, "steps"), (1, "collectives in flight"), (2, "blocked in wait")):
        out.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": name}})
    for v in variants:
        body = v.ir.body
        ms = v.run.timeline or []
        for (n, t), (n2, t2) in pairwise(ms):
            if n2 <= n or n >= len(body):  # a new call starts
                continue
            op = body[n]
            out.append({"name": op.outputs[0], "cat": type(op).__name__.lower(), "ph": "X", "pid": rank, "tid": 0,
                        "ts": _us(t, t0), "dur": _us(t2, t)})
    for what, kind, issued, wait0, done in events:
        out.append({"name": what, "cat": kind, "ph": "X", "pid": rank, "tid": 1, "ts": _us(issued, t0),
                    "dur": _us(done, issued)})
        out.append({"name": f"wait {what}", "cat": "wait", "ph": "X", "pid": rank, "tid": 2, "ts": _us(wait0, t0),
                    "dur": _us(done, wait0)})
    return {"traceEvents": out, "displayTimeUnit": "ms"}
