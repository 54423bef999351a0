"""Serving: `LLM` (engine.py) over a Scheduler (scheduler.py), a BlockManager (blocks.py), a ModelRunner
(runner.py) and sampling (sampling.py) — vLLM's split. DESIGN.md, "Serving: the runtime above compile"."""
from .blocks import DEAD, BlockManager, CachePolicy
from .engine import LLM, RequestOutput, StepStats, kv_bytes_per_token
from .layered import CompiledLayerGroupRunner, LayeredPrefill, LayerGroupRunner
from .paged import PagedRunner
from .runner import CacheConfig, EagerRunner, ModelRunner, StepEntry, make_runner
from .sampling import SamplingParams
from .scheduler import ChunkedPrefill, Plan, Request, Schedule, Scheduler, WholePrompt

__all__ = ["DEAD", "LLM", "BlockManager", "CacheConfig", "CachePolicy", "ChunkedPrefill", "CompiledLayerGroupRunner",
           "EagerRunner", "LayerGroupRunner", "LayeredPrefill", "ModelRunner", "PagedRunner", "Plan", "Request",
           "RequestOutput", "SamplingParams", "Schedule", "Scheduler", "StepEntry", "StepStats", "WholePrompt",
           "kv_bytes_per_token", "make_runner"]
