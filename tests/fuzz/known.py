"""Known failures: bugs whose fix belongs to code this fuzzer's owner does not change (kernel kinds, code
generation, passes, IR, the Triton runtime). Each has a minimal program as a strict xfail in
tests/test_fuzz.py (named here); random programs that hit one are counted under its name instead of
failing, so the fuzzer keeps looking for new bugs. A result is "known" only when every one of its
failures matches a known issue. Remove an entry when its xfail starts passing.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Known:
    name: str
    test: str  # the strict xfail in tests/test_fuzz.py that holds its minimal program
    matches: Callable[[dict, dict], bool]  # (failure, job) -> bool


def _triton(f: dict) -> bool:
    return f["backend"] == "triton"


KNOWN = (
    Known("triton: an out-of-range index reads 0 instead of raising", "test_triton_out_of_range_index_raises",
          lambda f, job: _triton(f) and f["call"] == "out_of_range" and f["kind"] == "no exception"),
    Known("triton: floor division of floats uses `//` (InterpreterError: unexpected type fp32)",
          "test_triton_float_floor_divide",
          lambda f, job: _triton(f) and "unexpected type fp" in f["error"]),
    # (programs with a bf16 value and an f64 one or an arange, whose index values the IR casts through f64)
    Known("triton: a cast from f64 to bf16 gives wrong values under the interpreter", "test_triton_f64_to_bf16_cast",
          lambda f, job: _triton(f) and f["kind"] == "mismatch" and "bfloat16" in job["source"]
          and ("float64" in job["source"] or "arange" in job["source"])),
    Known("triton: integer division by zero returns instead of raising ZeroDivisionError",
          "test_triton_integer_division_by_zero_raises",
          lambda f, job: _triton(f) and f["kind"] == "no exception" and "ZeroDivisionError" in f["error"]),
    Known("triton: adding bools wraps (True + True is False)", "test_triton_bool_add",
          lambda f, job: _triton(f) and f["kind"] == "mismatch" and "add:bool,bool" in job["meta"].get("aten", ())),
)


def known_issue(job: dict, result: dict) -> str | None:
    """The known issue(s) explaining every failure of `result`, or None when one is new."""
    names = []
    for f in result["failures"]:
        k = next((k for k in KNOWN if k.matches(f, job)), None)
        if k is None:
            return None
        if k.name not in names:
            names.append(k.name)
    return "; ".join(names) or None
