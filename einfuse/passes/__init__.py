"""Passes over the IR: the Pass interface, pipelines with instruments, and the built-in passes."""
from .base import FunctionPass, Instrument, Pass, PassError, module_pass, run_pipeline
from .cleanup import CSE, DCE, FOLD_RULES, FoldConstants, InlineCopies, SimplifyIndices, cleanup_passes
from .instruments import Dump, NumericCheck, PassNumericsError, PrintAfter, Timing, Verify


def default_pipeline() -> list[Pass]:
    """The passes `einfuse.compile` runs when `passes=` is not given; a fresh list each call."""
    return cleanup_passes()


__all__ = [
    "CSE", "DCE", "Dump", "FOLD_RULES", "FoldConstants", "FunctionPass", "InlineCopies", "Instrument",
    "NumericCheck", "Pass", "PassError", "PassNumericsError", "PrintAfter", "SimplifyIndices", "Timing", "Verify",
    "default_pipeline", "module_pass", "run_pipeline",
]
