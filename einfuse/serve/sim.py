"""Serving simulation: a workload trace replayed through the engine under a scheduling policy, timed by a
labelled H100 *model* (CPU time beside it), with TTFT/TBT/end-to-end latency and expert-weight bytes.

Workload. `bursty_trace` draws arrivals with Gamma-distributed gaps and long-tailed (Zipf / truncated power
law) prompt and response lengths — the shapes BurstGPT (Wang et al., "BurstGPT: A Real-World Workload Dataset
to Optimize LLM Serving Systems", arXiv:2401.17644, 2024) fits to Azure OpenAI traces: Gamma inter-arrival
times (a shape below 1 is burstier than Poisson) and Zipf-distributed request/response token counts. The
parameters here are ours (shape 0.5, exponent 1.2, lengths truncated to a range), not the paper's fitted values.
A trace file is JSONL, one request per line: {"arrival": seconds, "prompt_len": n, "output_len": n} and
optionally "prompt": [token ids]; `read_trace` names the line and the field of any malformed entry.

Replay. `replay` feeds the requests to `LLM` as the modelled clock passes their arrival, steps until all
finish, and records per step the entries the runner got, the experts they activated (routing.RouterTap),
CPU seconds and the modelled H100 seconds; per request, the modelled time of every token.

The H100 model (`StepCostModel`, MODEL_LABEL) — a model, not a measurement. A step runs, per decoder layer that
any of its tokens pass through, the kernels a fused serving stack launches: QKV projection, attention over
the cache, output projection, then router + expert GEMM (MoE) or gate/up + down (dense); plus the embedding
and the LM head over the sampled rows. Each kernel takes max(bytes / 3.35 TB/s, FLOPs / 989 TFLOP/s) +
a launch cost; weights, activations and KV at bf16 (2 bytes). Bytes: the kernel's weights once (an MoE layer's
*activated* experts only, `routing.expert_bytes`, plus a shared expert if it has one), its activations in and
out, the KV it reads; FLOPs: 2 per
multiply-add of the projections, 4·q·k·d for attention, each routed token through top-k experts. The bytes and
FLOPs are counted from the model config and the step's entries and routing (analytic, the same formulas for
every policy), not read from compiled kernels; for a dense prefill step the FLOPs are within a few percent of
the IR's own count (`ir.cost.statement_flops` over the lowered forward; tests/test_layered.py checks it).
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field

import torch

from ..runtime.report import H100_BYTES_PER_S, H100_FLOPS
from .layered import LayeredPrefill, LayerGroupRunner, check_budget
from .routing import ExpertGeometry, RouterTap, expert_bytes, expert_geometry
from .runner import CacheConfig, StepEntry
from .scheduler import ChunkedPrefill, WholePrompt

LAUNCH_S = 3e-6  # per kernel launch (no CUDA graphs)
BYTES_PER_VALUE = 2  # bf16
MODEL_LABEL = (f"modelled H100: per kernel max(bytes / {H100_BYTES_PER_S / 1e12:.2f} TB/s, FLOPs / "
               f"{H100_FLOPS / 1e12:.0f} TFLOP/s) + {LAUNCH_S * 1e6:.0f} us launch, bf16 weights/KV; not a timing")
POLICIES = ("none", "chunked", "layered")


# ------------------------------------------------------------------------------------------------- traces
@dataclass(frozen=True)
class TraceRequest:
    """One request of a workload: arrival (seconds from the trace's start), prompt and response lengths in
    tokens, and optionally the prompt's token ids (else replay draws them from a seed)."""
    arrival: float
    prompt_len: int
    output_len: int
    prompt: tuple | None = None


def _power_law(rng: random.Random, lo: int, hi: int, exponent: float) -> int:
    """A length in [lo, hi] with P(n) ~ n^-exponent (a Zipf law truncated to the range), by inverse CDF."""
    if lo == hi:
        return lo
    a = 1.0 - exponent
    u = rng.random()
    x = (lo ** a + u * (hi ** a - lo ** a)) ** (1 / a) if a != 0 else lo * (hi / lo) ** u
    return max(lo, min(hi, round(x)))


def bursty_trace(n: int = 16, seed: int = 0, rate: float = 2.0, burstiness: float = 0.5,
                 prompt: tuple = (512, 4096), output: tuple = (16, 128), exponent: float = 1.2) -> list:
    """`n` requests: Gamma(shape=burstiness, mean 1/rate s) gaps between arrivals, prompt and output lengths
    from a Zipf law (exponent) truncated to the `prompt` / `output` ranges (see the module docstring)."""
    if n < 1 or rate <= 0 or burstiness <= 0:
        raise ValueError(f"einfuse: bursty_trace needs n >= 1, rate > 0 and burstiness > 0, got {n}, {rate}, "
                         f"{burstiness}")
    for what, (lo, hi) in (("prompt", prompt), ("output", output)):
        if not 1 <= lo <= hi:
            raise ValueError(f"einfuse: {what} length range {lo}..{hi} is empty or below 1")
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        out.append(TraceRequest(round(t, 6), _power_law(rng, *prompt, exponent), _power_law(rng, *output, exponent)))
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


def write_trace(path: str, trace: list) -> None:
    with open(path, "w") as f:
        for r in trace:
            row = {k: v for k, v in asdict(r).items() if v is not None}
            if r.prompt is not None:
                row["prompt"] = list(r.prompt)
            f.write(json.dumps(row) + "\n")


_FIELDS = {"arrival": (int, float), "prompt_len": int, "output_len": int}


def read_trace(path: str) -> list:
    """Requests from a JSONL trace file (see the module docstring), sorted by arrival. A malformed line is a
    ValueError naming the file, the line and what is wrong; blank lines are skipped."""
    out = []
    with open(path) as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"einfuse: trace {path}, line {no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg}); each line is an object like "
                                 f'{{"arrival": 0.5, "prompt_len": 512, "output_len": 64}}') from None
            if not isinstance(row, dict):  # a malformed file is a ValueError, whatever the line holds
                raise ValueError(f"{where}: a JSON object is expected, got {type(row).__name__}")  # noqa: TRY004
            unknown = sorted(set(row) - set(_FIELDS) - {"prompt"})
            if unknown:
                raise ValueError(f"{where}: unknown field(s) {unknown}; fields are {sorted(_FIELDS)} and 'prompt'")
            for key, kind in _FIELDS.items():
                v = row.get(key)
                if v is None:
                    raise ValueError(f"{where}: missing {key!r}")
                if isinstance(v, bool) or not isinstance(v, kind):
                    raise ValueError(f"{where}: {key!r} must be a number, got {v!r}")  # noqa: TRY004
                if (key == "arrival" and (v < 0 or not math.isfinite(v))) or (key != "arrival" and v < 1):
                    raise ValueError(f"{where}: {key!r} = {v!r} is out of range ("
                                     f"{'a finite time >= 0' if key == 'arrival' else 'at least 1'})")
            prompt = row.get("prompt")
            if prompt is not None:
                if not isinstance(prompt, list) or not all(isinstance(t, int) and t >= 0 for t in prompt):
                    raise ValueError(f"{where}: 'prompt' must be a list of token ids (ints >= 0)")
                if len(prompt) != row["prompt_len"]:
                    raise ValueError(f"{where}: 'prompt' has {len(prompt)} tokens but prompt_len is "
                                     f"{row['prompt_len']}")
                prompt = tuple(prompt)
            out.append(TraceRequest(float(row["arrival"]), row["prompt_len"], row["output_len"], prompt))
    if not out:
        raise ValueError(f"einfuse: trace {path} has no requests")
    return sorted(out, key=lambda r: r.arrival)


def prompt_ids(trace: list, vocab: int, seed: int = 0) -> list[list[int]]:
    """Every request's prompt: its own ids, or ids drawn from `seed` (reproducible) in [1, vocab)."""
    rng = random.Random(seed)
    return [list(r.prompt) if r.prompt is not None else [rng.randrange(1, vocab) for _ in range(r.prompt_len)]
            for r in trace]


# ------------------------------------------------------------------------------------------ the H100 model
@dataclass
class StepCost:
    seconds: float
    bytes: int
    flops: int
    kernels: int
    expert_bytes: int | None


class StepCostModel:
    """The modelled H100 time of one step from its entries and routing (see the module docstring)."""

    def __init__(self, config, geometry: ExpertGeometry | None):
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.layers = c.num_hidden_layers
        self.hidden = c.hidden_size
        heads = c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        self.head_dim = getattr(c, "head_dim", None) or self.hidden // heads
        self.q_dim = heads * self.head_dim
        self.kv_dim = kv_heads * self.head_dim
        self.vocab = c.vocab_size
        self.geometry = geometry
        self.router_params = self.hidden * max(geometry.layers.values()) if geometry else 0
        self.intermediate = c.intermediate_size

    @staticmethod
    def kernel(nbytes: float, flops: float) -> float:
        return max(nbytes / H100_BYTES_PER_S, flops / H100_FLOPS) + LAUNCH_S

    def step(self, entries: list[StepEntry], routing: dict) -> StepCost:
        b = BYTES_PER_VALUE
        h = self.hidden
        per_layer: list[list[StepEntry]] = [[] for _ in range(self.layers)]
        for e in entries:
            lo, hi = e.layers or (0, self.layers)
            for layer in range(lo, hi):
                per_layer[layer].append(e)
        kernels = []  # (bytes, flops)
        first = sum(len(e.token_ids) for e in entries if (e.layers or (0,))[0] == 0)
        kernels.append((first * h * b * 2, 0))  # embedding gather
        total_expert = 0 if self.geometry else None
        for layer, group in enumerate(per_layer):
            if not group:
                continue
            t = sum(len(e.token_ids) for e in group)
            qkv = h * (self.q_dim + 2 * self.kv_dim)
            kernels.append((qkv * b + t * (h + self.q_dim + 2 * self.kv_dim) * b, 2 * t * qkv))
            ctx = sum(e.start + len(e.token_ids) for e in group)  # keys read per entry
            att_flops = sum(4 * len(e.token_ids) * (e.start + (len(e.token_ids) + 1) / 2) * self.q_dim for e in group)
            kernels.append((ctx * 2 * self.kv_dim * b + 2 * t * self.q_dim * b, att_flops))
            kernels.append((self.q_dim * h * b + t * (self.q_dim + 2 * h) * b, 2 * t * self.q_dim * h))
            if self.geometry and layer in self.geometry.layers:
                kernels.append((self.router_params * b + t * h * b, 2 * t * self.router_params))
                eb = expert_bytes({layer: routing.get(layer, ())}, self.geometry)
                total_expert += eb
                kernels.append((eb + 3 * t * h * b, 2 * t * self.geometry.top_k * self.geometry.expert_params))
                if self.geometry.shared_params:  # the shared expert: every token, weights loaded every step
                    kernels.append((self.geometry.shared_params * b + 3 * t * h * b,
                                    2 * t * self.geometry.shared_params))
            else:
                i = self.intermediate
                kernels.append((2 * h * i * b + t * (h + i) * b, 2 * t * 2 * h * i))  # gate/up, SiLU*up epilogue
                kernels.append((h * i * b + t * (i + 2 * h) * b, 2 * t * h * i))  # down + residual
        sampled = sum(1 for e in entries if e.sample)
        if sampled:
            kernels.append((self.vocab * h * b + sampled * (h + self.vocab) * b, 2 * sampled * self.vocab * h))
        seconds = sum(self.kernel(nb, fl) for nb, fl in kernels)
        return StepCost(seconds, int(sum(k[0] for k in kernels)), int(sum(k[1] for k in kernels)), len(kernels),
                        total_expert)


# ------------------------------------------------------------------------------------------------ runners
class RecordingRunner:
    """Wraps a ModelRunner: keeps the last step's entries, routing (the inner runner's `last_step_routing`)
    and CPU seconds for the replay."""

    def __init__(self, inner):
        self.inner = inner
        self.runs_layer_groups = getattr(inner, "runs_layer_groups", False)
        self.last_step_bytes = None
        self.last: tuple = ([], {}, 0.0)

    def bind(self, cache: CacheConfig) -> None:
        self.inner.bind(cache)

    def release(self, request_id: int, blocks: list[int]) -> None:
        if hasattr(self.inner, "release"):
            self.inner.release(request_id, blocks)

    def step(self, entries):
        start = time.perf_counter()
        out = self.inner.step(entries)
        self.last = (entries, getattr(self.inner, "last_step_routing", {}), time.perf_counter() - start)
        return out


class RoutedReplayRunner:
    """A route-only runner: every request's tokens and its per-token routing were recorded from the real model
    beforehand (`record_routing`); a step reports the experts its entries' positions routed to in the layers
    they pass, and returns logits that pick the recorded next token (so greedy decoding replays the model's
    own output). No model compute: for replaying long prompts on a CPU when only routing and bytes matter."""
    runs_layer_groups = True

    def __init__(self, recorded: list, vocab: int, num_layers: int):
        self.recorded = recorded  # per request, in add order: (tokens, {layer: [positions, top_k] int tensor})
        self.vocab = vocab
        self.num_layers = num_layers
        self.last_step_routing: dict = {}
        self.last_step_bytes = None
        self.cache = None

    def bind(self, cache: CacheConfig) -> None:
        self.cache = cache

    def step(self, entries):
        rows, active = [], {}
        for e in entries:
            tokens, routes = self.recorded[e.request_id]
            lo, hi = e.layers or (0, self.num_layers)
            end = e.start + len(e.token_ids)
            if list(e.token_ids) != tokens[e.start:end]:
                raise RuntimeError(f"einfuse: request {e.request_id} replays tokens that were not recorded")
            for layer in range(lo, hi):
                if layer in routes:
                    active.setdefault(layer, set()).update(routes[layer][e.start:end].reshape(-1).tolist())
            row = torch.zeros(self.vocab)
            if e.sample and end < len(tokens):
                row[tokens[end]] = 1.0
            rows.append(row)
        self.last_step_routing = {layer: frozenset(s) for layer, s in active.items()}
        return torch.stack(rows)


def route_only_runner(model, trace: list, seed: int = 0, progress=None):
    """A `replay` runner factory that replays `trace` (prompts drawn as replay draws them) from the real
    model's recorded tokens and routing (`record_routing`), and the recording itself."""
    trace = sorted(trace, key=lambda r: r.arrival)
    config = model.config.get_text_config()
    recorded = record_routing(model, prompt_ids(trace, config.vocab_size, seed), [r.output_len for r in trace],
                              progress)
    return (lambda: RoutedReplayRunner(recorded, config.vocab_size, config.num_hidden_layers)), recorded


@torch.no_grad()
def record_routing(model, prompts: list, output_lens: list, progress=None) -> list:
    """Run the real model greedily over each prompt for its output length (transformers generate, KV cache) and
    record every token and, per MoE layer, each fed position's top-k experts: (tokens, {layer: [n, k]})."""
    tap = RouterTap(model, per_token=True)
    out = []
    try:
        for i, (ids, n) in enumerate(zip(prompts, output_lens)):
            seq = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 use_cache=True, pad_token_id=0)[0].tolist()
            routes = tap.take_routes()
            for layer, r in routes.items():
                if r.shape[0] != len(seq) - 1:
                    raise RuntimeError(f"einfuse: recorded {r.shape[0]} routed positions at layer {layer} for a "
                                       f"sequence of {len(seq)}")
            out.append((seq, routes))
            if progress is not None:
                progress(i)
    finally:
        tap.close()
    return out


# ------------------------------------------------------------------------------------------------- replay
def make_policy(policy: str, num_layers: int, groups: int, max_batch_tokens: int, max_running: int | None = None):
    """The Scheduler of a policy name: none (WholePrompt), chunked (ChunkedPrefill), layered (LayeredPrefill)."""
    check_budget(max_batch_tokens, max_running)
    if policy == "none":
        return WholePrompt(max_batch_tokens, max_running)
    if policy == "chunked":
        return ChunkedPrefill(max_batch_tokens, max_running)
    if policy == "layered":
        return LayeredPrefill(num_layers, groups, max_batch_tokens, max_running)
    raise ValueError(f"einfuse: unknown policy {policy!r}; choose one of {list(POLICIES)}")


@dataclass
class StepRecord:
    step: int
    start_s: float  # modelled clock when the step began
    model_s: float
    cpu_s: float
    prefill_tokens: int  # tokens in entries that are not single-token decodes
    decode_tokens: int
    bytes: int
    flops: int
    kernels: int
    expert_bytes: int | None
    group_passes: int = 0  # entries that passed through some of the layers only (layered prefill)


@dataclass
class RequestRecord:
    arrival: float
    prompt_len: int
    output_len: int
    token_times: list = field(default_factory=list)  # modelled time each output token was sampled
    output: list = field(default_factory=list)


def _pct(xs: list, q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class SimResult:
    policy: str
    groups: int
    budget: int
    steps: list
    requests: list
    moe: bool
    label: str = MODEL_LABEL

    @property
    def ttft(self) -> list:
        return [r.token_times[0] - r.arrival for r in self.requests if r.token_times]

    @property
    def tbt(self) -> list:
        """(time of the token, gap since the request's previous token) for every token after the first."""
        return [(b, b - a) for r in self.requests for a, b in zip(r.token_times, r.token_times[1:])]

    @property
    def e2e(self) -> list:
        return [r.token_times[-1] - r.arrival for r in self.requests if r.token_times]

    def metrics(self) -> dict:
        gen = sum(len(r.token_times) for r in self.requests)
        tbt = [g for _, g in self.tbt]
        eb = sum(s.expert_bytes for s in self.steps) if self.moe else None
        return {"policy": self.policy, "groups": self.groups if self.policy == "layered" else None,
                "budget": self.budget, "steps": len(self.steps), "generated": gen,
                "ttft_mean": sum(self.ttft) / len(self.ttft), "ttft_p50": _pct(self.ttft, 50),
                "ttft_p99": _pct(self.ttft, 99), "tbt_p50": _pct(tbt, 50), "tbt_p99": _pct(tbt, 99),
                "e2e_mean": sum(self.e2e) / len(self.e2e), "e2e_p99": _pct(self.e2e, 99),
                "expert_bytes": eb, "expert_bytes_per_token": eb / gen if self.moe else None,
                "modelled_s": sum(s.model_s for s in self.steps), "cpu_s": sum(s.cpu_s for s in self.steps)}


def replay(model, trace: list, policy: str, groups: int = 4, max_batch_tokens: int = 256,
           max_running: int | None = None, runner=None, seed: int = 0, block_size: int = 16) -> SimResult:
    """Replay `trace` through `LLM(model)` under `policy` (see the module docstring). runner: a ModelRunner
    factory `() -> runner` (default: LayerGroupRunner(model), the real model, eager); every request is greedy
    with `ignore_eos` and its trace's output length. For `none` the budget is raised to the longest sequence
    (a whole prompt must fit one step)."""
    from .engine import LLM

    trace = sorted(trace, key=lambda r: r.arrival)  # request i of the engine is trace[i] (ids in add order)
    config = model.config.get_text_config()
    geometry = expert_geometry(model)
    cost = StepCostModel(config, geometry)
    prompts = prompt_ids(trace, config.vocab_size, seed)
    if policy == "none":
        max_batch_tokens = max(max_batch_tokens, max(len(p) + r.output_len for p, r in zip(prompts, trace)))
    sched = make_policy(policy, config.num_hidden_layers, groups, max_batch_tokens, max_running)
    rec = RecordingRunner(runner() if runner is not None else LayerGroupRunner(model))
    total = sum(len(p) + r.output_len for p, r in zip(prompts, trace))
    llm = LLM(model, scheduler=sched, runner=rec, block_size=block_size,
              num_blocks=-(-total // block_size) + len(trace) + 1)
    order = list(range(len(trace)))
    records = [RequestRecord(r.arrival, len(p), r.output_len) for r, p in zip(trace, prompts)]
    of_id: dict[int, int] = {}
    steps, clock, nxt, full = [], 0.0, 0, (0, config.num_hidden_layers)
    while nxt < len(order) or llm.has_unfinished():
        while nxt < len(order) and trace[order[nxt]].arrival <= clock:
            i = order[nxt]
            of_id[llm.add_request(prompts[i], max_new_tokens=trace[i].output_len, ignore_eos=True)] = i
            nxt += 1
        if not llm.has_unfinished():
            clock = trace[order[nxt]].arrival
            continue
        for out in llm.step():
            records[of_id[out.request_id]].output = out.token_ids
        entries, routing, cpu = rec.last
        c = cost.step(entries, routing)
        steps.append(StepRecord(len(steps), clock, c.seconds, cpu,
                                sum(len(e.token_ids) for e in entries if len(e.token_ids) > 1),
                                sum(1 for e in entries if len(e.token_ids) == 1), c.bytes, c.flops, c.kernels,
                                c.expert_bytes, sum(1 for e in entries if e.layers not in (None, full))))
        clock += c.seconds
        for e in entries:
            if e.sample:
                records[of_id[e.request_id]].token_times.append(clock)
    return SimResult(policy, groups, max_batch_tokens, steps, records, geometry is not None)


# ------------------------------------------------------------------------------------------------- report
def _fmt_bytes(n) -> str:
    if n is None:
        return "n/a (dense)"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000


def table(results: list) -> str:
    """A Markdown table of the results' metrics (milliseconds of the modelled H100 clock; CPU seconds beside)."""
    head = ["policy", "budget", "steps", "gen tok", "TTFT mean ms", "TTFT p50 ms", "TTFT p99 ms", "TBT p50 ms",
            "TBT p99 ms", "E2E mean ms", "E2E p99 ms", "expert bytes", "expert bytes / gen tok", "modelled s",
            "CPU s"]
    rows = []
    for r in results:
        m = r.metrics()
        name = f"layered (G={m['groups']})" if m["policy"] == "layered" else m["policy"]
        rows.append([name, str(m["budget"]), str(m["steps"]), str(m["generated"])] +
                    [f"{m[k] * 1e3:.3f}" for k in ("ttft_mean", "ttft_p50", "ttft_p99", "tbt_p50", "tbt_p99",
                                                    "e2e_mean", "e2e_p99")] +
                    [_fmt_bytes(m["expert_bytes"]), _fmt_bytes(m["expert_bytes_per_token"]),
                     f"{m['modelled_s']:.4f}", f"{m['cpu_s']:.2f}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    note = "" if any(r.moe for r in results) else "\nexpert bytes: not applicable (a dense model has no experts)"
    return "\n".join(lines) + f"\n\nTimes: {MODEL_LABEL}." + note


def plots(results: list, out_dir: str, title: str = "") -> list[str]:
    """PNG plots: TTFT CDF per policy, TBT over time per policy, expert bytes per step (MoE only)."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    def label(r):
        return f"layered (G={r.groups})" if r.policy == "layered" else r.policy
    def finish(fig, ax, name: str) -> str:
        """Legend, grid, saved as out_dir/name (closed); the path."""
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        return os.path.join(out_dir, name)

    paths = []
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in results:
        xs = sorted(t * 1e3 for t in r.ttft)
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label(r))
    ax.set(xlabel="TTFT (ms, modelled H100)", ylabel="fraction of requests",
           title=f"TTFT CDF per policy, modelled H100\n{title}".strip())
    paths.append(finish(fig, ax, "ttft_cdf.png"))

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for r in results:
        pts = r.tbt
        ax.plot([t * 1e3 for t, _ in pts], [g * 1e3 for _, g in pts], ".", ms=3, alpha=0.6, label=label(r))
    ax.set(xlabel="time (ms, modelled H100)", ylabel="time between tokens (ms)",
           title=f"TBT over time per policy, modelled H100\n{title}".strip())
    paths.append(finish(fig, ax, "tbt_over_time.png"))

    if any(r.moe for r in results):
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        for r in results:
            xs, ys = [], []
            for a, b in zip(r.steps, r.steps[1:] + [None]):
                xs += [a.start_s * 1e3, (a.start_s + a.model_s) * 1e3]
                ys += [a.expert_bytes / 1e6] * 2
                if b is None or b.start_s > a.start_s + a.model_s * 1.001:  # idle until the next arrival: a gap
                    xs.append(float("nan"))
                    ys.append(float("nan"))
            ax.plot(xs, ys, "-", lw=1, label=label(r))
        ax.set(xlabel="step start (ms, modelled H100)", ylabel="expert-weight bytes loaded (MB)",
               title=f"Expert-weight bytes per step, modelled H100\n{title}".strip())
        paths.append(finish(fig, ax, "expert_bytes_per_step.png"))
    return paths


def save_recording(path: str, recorded: list) -> None:
    """`record_routing`'s result as safetensors (tokens_i: int64, routes_i_layer: int16)."""
    from safetensors.torch import save_file

    tensors = {}
    for i, (tokens, routes) in enumerate(recorded):
        tensors[f"tokens_{i}"] = torch.tensor(tokens, dtype=torch.int64)
        for layer, r in routes.items():
            tensors[f"routes_{i}_{layer}"] = r.contiguous()
    save_file(tensors, path)


def load_recording(path: str) -> list:
    from safetensors.torch import load_file

    tensors = load_file(path)
    n = sum(1 for k in tensors if k.startswith("tokens_"))
    out = []
    for i in range(n):
        routes = {int(k.rsplit("_", 1)[1]): v for k, v in tensors.items() if k.startswith(f"routes_{i}_")}
        out.append((tensors[f"tokens_{i}"].tolist(), routes))
    return out
