"""Checks in a child process: a segfault or a hang fails the program instead of ending pytest.

`Worker.check(job)` sends one program (`Program.to_json()`) to a long-lived child that runs `check.check` and
answers with the result; when the child dies (a signal) or runs past the timeout, the result is a failure
of kind "crashed" or "hung" with the end of the child's stderr (faulthandler's traceback), and the next
check starts a new child. With EINFUSE_FUZZ_INPROCESS=1 checks run in this process (for a debugger).

Command line (tests/ on sys.path), for long runs in the background:

    cd tests && nice -n 10 python -m fuzz.worker --programs 10000 --seed 1 --log /tmp/fuzz.jsonl

runs hypothesis campaigns of --chunk programs each (new seed per chunk) until --programs programs were
checked, appending one JSON line per chunk (and per minimal failure) to --log.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/


class Worker:
    def __init__(self, timeout: float = 300.0, env: dict | None = None):
        self.timeout, self.env = timeout, env
        self.proc: subprocess.Popen | None = None
        self.err = None
        self.inprocess = os.environ.get("EINFUSE_FUZZ_INPROCESS") == "1"
        self.checked = 0
        self.restarts = 0

    def _start(self):
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), HERE) if p)
        env.setdefault("OMP_NUM_THREADS", "1")
        self.err = tempfile.TemporaryFile()  # noqa: SIM115 (the child's stderr, read after a crash)
        cmd = [sys.executable, "-X", "faulthandler", "-c", "from fuzz.worker import serve; serve()"]
        # cwd tests/: `python -c` puts the working directory first on sys.path, and a checkout's root there would
        # shadow the einfuse that PYTHONPATH names (a run against another tree)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, env=env,
                                     text=True, bufsize=1, cwd=HERE)
        self.restarts += 1

    def _stderr_tail(self, n: int = 3000) -> str:
        """The end of the child's stderr, from faulthandler's report when there is one."""
        self.err.seek(0)
        text = self.err.read().decode(errors="replace")
        at = text.rfind("Fatal Python error")
        return text[at:at + n] if at >= 0 else text[-n:]

    def check(self, job: dict) -> dict:
        self.checked += 1
        if self.inprocess:
            from .check import check

            return check(job)
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.err.seek(0)
        self.err.truncate()
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        line = _readline(self.proc, self.timeout)
        if line:
            return json.loads(line)
        hung = line is None  # else end of file: the child is dying
        if hung:
            self.proc.kill()
        rc = self.proc.wait()
        tail = self._stderr_tail()
        self.proc = None
        kind = "hung" if hung else "crashed"
        error = f"no answer in {self.timeout:.0f} s" if hung else f"the process died (exit {rc}" + (
            f", signal {-rc})" if rc < 0 else ")")
        return {"ok": False, "failures": [{"backend": "?", "call": "?", "kind": kind, "error": error + "\n" + tail}],
                "stats": {}}

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _readline(proc: subprocess.Popen, timeout: float) -> str | None:
    """The child's next line; "" at end of file (it died); None when nothing came within `timeout`."""
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return None
    return proc.stdout.readline()  # one whole line per answer: no partial reads


def serve():
    """The child: one JSON job per stdin line, one JSON result per line on the original stdout (whatever
    einfuse or Triton print goes to stderr)."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import torch

    torch.set_num_threads(1)
    from .check import check

    for line in sys.stdin:
        job = json.loads(line)
        try:
            result = check(job)
        except Exception:  # noqa: BLE001 (a bug of the oracle itself: report it, keep serving)
            import traceback

            result = {"ok": False, "stats": {}, "failures": [{"backend": "?", "call": "?", "kind": "oracle error",
                                                               "error": traceback.format_exc()}]}
        out.write(json.dumps(result) + "\n")


# ---------------------------------------------------------------- campaigns

def signature(result: dict) -> str:
    """A failure's family, for counting: backend, kind, exception type and the start of its first line."""
    f = result["failures"][0]
    first = f["error"].splitlines()[0] if f["error"] else ""
    return f"{f['backend']}: {f['kind']}: {first[:80]}"


def campaign(worker: Worker, programs: int, seed: int, chunk: int = 200, log=None, max_statements: int = 6,
             known=None, match=None, first: bool = False) -> dict:
    """Hypothesis runs of `chunk` programs each (seed, seed + 1, ...) until `programs` programs were checked.
    A chunk that fails is shrunk by hypothesis; its minimal program is recorded and the next chunk starts.
    `known(job, result)` names a known issue (such a failure is counted, not shrunk). With `match` (a
    compiled regex), only failures whose report it matches count (a hunt for one bug; others are tallied
    under "other"); with `first`, the campaign ends at the first failure. Returns the tallies."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    from .check import describe
    from .ops import programs as strategy

    tally = {"programs": 0, "generated": 0, "chunks": 0, "failures": [], "known": {}, "other": 0, "fallbacks": {},
             "seconds": 0.0}
    t0 = time.time()
    k = 0
    while tally["programs"] < programs:
        found, first_at, count = [], [], [0]

        @hseed(seed + k)
        @settings(max_examples=chunk, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                  phases=(Phase.generate, Phase.shrink), report_multiple_bugs=False)
        @given(strategy(max_statements=max_statements))
        def run(p):
            job = p.to_json()
            result = worker.check(job)
            tally["programs"] += 1
            if not found:
                count[0] += 1
            why = result["stats"].get("fallback")
            if why:
                key = why.split("(")[0].strip()[:60]
                tally["fallbacks"][key] = tally["fallbacks"].get(key, 0) + 1
            if result["ok"]:
                return
            name = known(job, result) if known else None
            if name:
                tally["known"][name] = tally["known"].get(name, 0) + 1
                return
            if match is not None and not match.search(describe(job, result)):
                tally["other"] += 1
                return
            if not found:  # the chunk's first failure: generation stops, shrinking starts
                first_at.append(tally["generated"] + count[0])
            found.append((job, result))
            raise AssertionError(describe(job, result))

        try:
            run()
        except AssertionError:
            job, result = found[-1]  # the last failure hypothesis saw is its minimal one
            entry = {"seed": seed + k, "found_after": first_at[0], "signature": signature(result),
                     "report": describe(job, result)}
            tally["failures"].append(entry)
            if log:
                log.write(json.dumps({"failure": entry}) + "\n")
        except Exception as exc:  # noqa: BLE001 (hypothesis gave up on a chunk: note it, go on)
            if log:
                log.write(json.dumps({"chunk_error": repr(exc)[:500], "seed": seed + k}) + "\n")
        tally["generated"] += count[0]
        k += 1
        tally["chunks"] = k
        tally["seconds"] = round(time.time() - t0, 1)
        if log:
            log.write(json.dumps({"progress": {x: tally[x] for x in ("programs", "generated", "chunks", "known",
                                                                       "other", "fallbacks", "seconds")},
                                  "failures": len(tally["failures"])}) + "\n")
            log.flush()
        if first and tally["failures"]:
            break
    return tally


def main(argv=None):
    ap = argparse.ArgumentParser(description="einfuse differential fuzzing campaign")
    ap.add_argument("--programs", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=200)
    ap.add_argument("--statements", type=int, default=6)
    ap.add_argument("--log", default="fuzz.jsonl")
    ap.add_argument("--no-known", action="store_true", help="report known issues as failures too")
    ap.add_argument("--match", help="hunt: only failures whose report matches this regex (DOTALL) count")
    ap.add_argument("--first", action="store_true", help="stop at the first (minimal) failure")
    args = ap.parse_args(argv)
    known = None
    if not args.no_known:
        from .known import known_issue as known
    worker = Worker()
    try:
        with open(args.log, "a") as log:
            match = re.compile(args.match, re.DOTALL) if args.match else None
            tally = campaign(worker, args.programs, args.seed, args.chunk, log, args.statements, known, match,
                             args.first)
    finally:
        worker.close()
    print(json.dumps({k: v for k, v in tally.items() if k != "failures"}, indent=1))
    for f in tally["failures"]:
        print(f"\n--- found after {f['found_after']} generated programs (seed {f['seed']}), minimal:\n{f['report']}")


if __name__ == "__main__":
    main()
