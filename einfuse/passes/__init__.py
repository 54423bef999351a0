"""Passes over the IR: the Pass interface, pipelines with instruments, and the built-in passes."""
from .attention import FuseAttention
from .base import FunctionPass, Instrument, Pass, PassError, module_pass, run_pipeline
from .cleanup import CSE, DCE, FOLD_RULES, FoldConstants, InlineCopies, SimplifyIndices, cleanup_passes
from .fusion import RULES, FuseElementwise, FuseKernels, Rule, fusion_passes
from .instruments import Dump, NumericCheck, PassNumericsError, PrintAfter, Timing, Verify


def default_pipeline() -> list[Pass]:
    """The passes `einfuse.compile` runs when `passes=` is not given (cleanup, then fusion); a fresh
    list each call."""
    return cleanup_passes() + fusion_passes()


__all__ = [
    "CSE", "DCE", "Dump", "FOLD_RULES", "FoldConstants", "FunctionPass", "FuseAttention", "FuseElementwise",
    "FuseKernels", "InlineCopies", "Instrument", "NumericCheck", "Pass", "PassError", "PassNumericsError",
    "PrintAfter", "RULES", "Rule", "SimplifyIndices", "Timing", "Verify", "cleanup_passes", "default_pipeline",
    "fusion_passes", "module_pass", "run_pipeline",
]
