"""Compress a model's MoE experts to dictionary-coded ternary weights (QMoE), and run them.

`compress_moe(model, calibration, method="gptq")`:

1. finds the MoE layers: modules holding stacked expert weights `gate_up_proj` [E, 2I, H] and `down_proj`
   [E, H, I] (transformers' fused experts: Mixtral, Qwen-MoE, ...); a model without one is refused;
2. layer by layer (sequential GPTQ: layer l is calibrated on the outputs of the already-quantized layers
   before it), runs the calibration tokens through the model, records which tokens the router sends to
   each expert, and builds each expert's Hessians from *its* tokens only — gate_up's from the layer input,
   down's from the SwiGLU activations through the quantized gate_up;
3. quantizes all experts of a tensor at once (batched GPTQ, per-row ternary grid). An expert that gets
   fewer than `min_tokens` calibration tokens has its Hessian shrunk towards the identity in proportion
   (extra dampening); one that gets none is quantized round-to-nearest. Both are reported per expert;
4. builds one dictionary from the symbol statistics of every expert (its width chosen by total size) and
   encodes every tensor (`CompressedTensor`).

`CompressedExperts` replaces an experts module: its forward sorts tokens by expert and runs the fused
decode-and-multiply kernel (einfuse.kinds.cdot) for gate_up and down; only activated experts are read.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..quant.gptq import Hessian
from .codec import Dictionary, build_dictionary, choose_bits, entropy, symbol_probs
from .format import CompressedTensor, group_streams
from .ternary import dequantize, ternary_gptq, ternary_rtn


class NoMoELayers(ValueError):
    pass


def find_moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every module with stacked expert weights gate_up_proj and down_proj."""
    found = []
    for name, mod in model.named_modules():
        gu, dn = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
        if isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3:
            found.append((name, mod))
    return found


def require_moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = find_moe_layers(model)
    if not layers:
        linear = sum(isinstance(m, nn.Linear) for m in model.modules())
        raise NoMoELayers(
            f"einfuse.compress: {type(model).__name__} has no MoE layers (no module with stacked expert weights "
            f"gate_up_proj [E, 2I, H] and down_proj [E, H, I]); compress_experts only compresses experts. "
            f"It has {linear} nn.Linear layers: use einfuse.compress.experts.compress_matrices(...) to compress "
            "dense weights on purpose")
    return layers


@dataclass
class ExpertReport:
    layer: str
    tensor: str
    expert: int
    tokens: int
    method: str  # "gptq" | "gptq+damp (few tokens)" | "rtn (no tokens)" | "rtn"
    zero_share: float


@dataclass
class CompressedModel:
    tensors: dict[str, CompressedTensor]
    dictionary: Dictionary
    experts: list[ExpertReport] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def summary(self) -> dict:
        params = sum(ct.shape[0] * ct.shape[1] * ct.shape[2] for ct in self.tensors.values())
        parts: dict[str, int] = {}
        for ct in self.tensors.values():
            for k, v in ct.nbytes().items():
                parts[k] = parts.get(k, 0) + v
        parts["dictionary"] = self.dictionary.stored_nbytes
        total = sum(parts.values())
        return {"params": params, "bytes": parts, "total_bytes": total, "bits_per_param": 8 * total / params,
                "decoder_table_bytes": self.dictionary.nbytes,
                "code_bits_per_param": 8 * parts["codes"] / params, **self.stats,
                "no_tokens": [(r.layer, r.tensor, r.expert) for r in self.experts if r.tokens == 0],
                "few_tokens": [(r.layer, r.tensor, r.expert, r.tokens) for r in self.experts
                               if "few" in r.method]}


def _routed_inputs(model, layer: nn.Module, calibration: list[torch.Tensor], num_experts: int):
    """Per expert: the layer-input rows of the calibration tokens the router sends to it."""
    per: list[list[torch.Tensor]] = [[] for _ in range(num_experts)]

    def hook(mod, args, kwargs):
        hidden, idx = args[0], args[1]
        hidden = hidden.reshape(-1, hidden.shape[-1]).detach()
        idx = idx.reshape(hidden.shape[0], -1)
        for e in range(num_experts):
            rows = (idx == e).any(-1)
            if rows.any():
                per[e].append(hidden[rows].double())
        raise _Stop

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for ids in calibration:
                try:
                    model(ids, use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return [torch.cat(x) if x else torch.zeros(0, layer.gate_up_proj.shape[-1], dtype=torch.float64)
            for x in per]


class _Stop(Exception):
    """Raised by the calibration hook once the layer's input is captured (the rest of the model is skipped)."""


def _hessians(xs: list[torch.Tensor], cols: int, min_tokens: int) -> tuple[torch.Tensor, list[str], list[int]]:
    E = len(xs)
    acc = Hessian(cols, batch=(E,))
    methods, counts = [], []
    for e, x in enumerate(xs):
        acc.add(x, e)
    H = acc.H.clone()
    for e in range(E):
        n = int(acc.count[e])
        counts.append(n)
        if n == 0:
            H[e] = torch.eye(cols, dtype=H.dtype)  # identity Hessian: GPTQ is exactly round-to-nearest
            methods.append("rtn (no tokens)")
        elif n < min_tokens:
            mean = H[e].diagonal().mean().clamp(min=1e-12)
            H[e] += torch.eye(cols, dtype=H.dtype) * mean * (min_tokens - n) / n
            methods.append("gptq+damp (few tokens)")
        else:
            methods.append("gptq")
    return H, methods, counts


def compress_moe(model: nn.Module, calibration: list[torch.Tensor] | None, method: str = "gptq",
                 min_tokens: int | None = None, damp: float = 0.01, widths=range(8, 17),
                 progress: bool = True) -> CompressedModel:
    """Quantize every expert of `model` to ternary (`method` "gptq" with `calibration` token batches, or
    "rtn"), write the dequantized weights back into the model (so it evaluates as compressed), and encode."""
    if method not in ("gptq", "rtn"):
        raise ValueError(f"einfuse.compress: method {method!r} is not 'gptq' or 'rtn'")
    if method == "gptq" and not calibration:
        raise ValueError("einfuse.compress: GPTQ needs calibration= token batches (or method='rtn')")
    layers = require_moe_layers(model)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    quantized: dict[str, tuple] = {}
    reports: list[ExpertReport] = []
    with Progress(TextColumn("[bold]compress experts[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), disable=not progress, transient=True) as bar:
        task = bar.add_task("", total=2 * len(layers))
        for name, layer in layers:
            E, two_i, hidden = layer.gate_up_proj.shape
            W_gu = layer.gate_up_proj.detach().double()
            W_dn = layer.down_proj.detach().double()
            if method == "rtn":
                bar.update(task, description=f"{name} (round to nearest)")
                q_gu = ternary_rtn(W_gu)
                q_dn = ternary_rtn(W_dn)
                meth_gu = meth_dn = ["rtn"] * E
                n_gu = n_dn = [-1] * E
            else:
                need = min_tokens if min_tokens is not None else hidden // 2
                bar.update(task, description=f"{name}.gate_up_proj: routing calibration tokens")
                xs = _routed_inputs(model, layer, calibration, E)
                H, meth_gu, n_gu = _hessians(xs, hidden, need)
                bar.update(task, description=f"{name}.gate_up_proj: GPTQ x {E} experts")
                q_gu = ternary_gptq(W_gu, H, damp=damp)
                bar.advance(task)
                deq_gu = dequantize(*q_gu).double()
                acts = []
                for e, x in enumerate(xs):
                    gate, up = (x @ deq_gu[e].T).chunk(2, dim=-1)
                    acts.append(layer.act_fn(gate) * up)
                H, meth_dn, n_dn = _hessians(acts, two_i // 2, need)
                bar.update(task, description=f"{name}.down_proj: GPTQ x {E} experts")
                q_dn = ternary_gptq(W_dn, H, damp=damp)
            bar.advance(task)
            for tname, q, meths, ns in (("gate_up_proj", q_gu, meth_gu, n_gu), ("down_proj", q_dn, meth_dn, n_dn)):
                full = f"{name}.{tname}" if name else tname
                quantized[full] = q
                zero = (q[0] == 0).double().mean((-1, -2))
                for e in range(E):
                    reports.append(ExpertReport(name, tname, e, ns[e], meths[e], float(zero[e])))
                with torch.no_grad():
                    getattr(layer, tname).copy_(dequantize(*q).to(getattr(layer, tname).dtype))
    return encode_all(quantized, widths, method, reports)


SAMPLE_SYMBOLS = 2 ** 21  # symbols of the sample that chooses the codeword width


def encode_all(quantized: dict[str, tuple], widths, method: str, reports=()) -> CompressedModel:
    """One dictionary for every tensor's symbols (its width by `choose_bits` on a sample of each tensor's
    16-row groups), every tensor encoded with it."""
    symbols = torch.cat([q[0].reshape(-1) for q in quantized.values()])
    probs = symbol_probs(symbols)
    g = torch.Generator().manual_seed(0)
    samples, lengths = [], []
    for s, _, _ in quantized.values():  # a sample of each tensor's groups in proportion to its size
        streams, lens = group_streams(s if s.dim() == 3 else s[None])
        share = max(1, round(SAMPLE_SYMBOLS * s.numel() / symbols.numel() / max(streams.shape[1], 1)))
        pick = torch.randperm(streams.shape[0], generator=g)[:share]
        samples.append(streams[pick])
        lengths.append(lens[pick])
    width = max(t.shape[1] for t in samples)
    streams = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in samples])
    bits, table = choose_bits(streams, widths=widths, sample=streams.shape[0], lengths=torch.cat(lengths),
                              total_symbols=symbols.numel(), probs=probs)
    d = build_dictionary(probs, bits)
    tensors = {k: CompressedTensor.encode(s, lo, hi, d) for k, (s, lo, hi) in quantized.items()}
    stats = {"method": method, "probs": probs, "entropy_bits": entropy(probs), "bits": bits,
             "width_table": {w: round(v["total_bits"] / symbols.numel(), 4) for w, v in table.items()}}
    return CompressedModel(tensors, d, list(reports), stats)


def sort_by_expert(expert_of_row: torch.Tensor, num_experts: int):
    """Rows (token, expert) pairs grouped by expert, as the fused kernel takes them: (order [P] — the pairs
    in expert order, stable —, seg [A+1] int32 offsets of each active expert's rows, experts [A] int32 ids
    of the experts at least one pair routes to)."""
    flat = expert_of_row.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    experts = torch.nonzero(counts).flatten()
    seg = torch.cat([torch.zeros(1, dtype=torch.long, device=flat.device), torch.cumsum(counts[experts], 0)])
    return order, seg.to(torch.int32), experts.to(torch.int32)


def project(x: torch.Tensor, ct: CompressedTensor, d: Dictionary, seg: torch.Tensor, experts: torch.Tensor,
            dict_table=None, kernel: bool = True) -> torch.Tensor:
    """y [S, rows]: each active expert's rows x[seg[a]:seg[a+1]] @ W_e.T. `kernel`: the fused decode-and-
    multiply Triton kernel (einfuse.kinds.cdot; W never materialized); else the activated experts alone
    decoded (`CompressedTensor.dequantize_experts`) and multiplied — the CPU path, same values."""
    if kernel:
        from ..kinds.cdot import cdot
        return cdot(x, ct, d, seg, experts, dict_table=dict_table)
    W = ct.dequantize_experts(d, experts).to(x.device)
    y = torch.empty(x.shape[0], ct.shape[1], dtype=torch.float32, device=x.device)
    bounds = seg.tolist()
    for a in range(experts.numel()):
        y[bounds[a]:bounds[a + 1]] = x[bounds[a]:bounds[a + 1]].float() @ W[a].T
    return y


def swiglu_experts(x: torch.Tensor, seg: torch.Tensor, experts: torch.Tensor, gate_up: CompressedTensor,
                   down: CompressedTensor, d: Dictionary, act_fn, dict_table=None, kernel: bool = True,
                   down_dictionary: Dictionary | None = None, down_dict_table=None):
    """down(act(gate) * up) per expert segment of x [S, H] (rows sorted by expert), both projections
    through `project`; returns (y [S, H2], the intermediate h [S, I])."""
    gu = project(x, gate_up, d, seg, experts, dict_table, kernel)
    gate, up = gu.chunk(2, dim=-1)
    h = (act_fn(gate) * up).contiguous()
    dd = down_dictionary if down_dictionary is not None else d
    ddt = down_dict_table if down_dictionary is not None else dict_table
    return project(h, down, dd, seg, experts, ddt, kernel), h


def routed_moe(x: torch.Tensor, gate: torch.Tensor, up: tuple, up_meta: dict, down: tuple, down_meta: dict,
               kernel: bool, seen: set | None = None, up_checksums=None, down_checksums=None) -> torch.Tensor:
    """A compiled MoE chain on compressed experts (einfuse.codegen.torch_moe, `MoEPlan.compressed`): x [T, H],
    gate [T, E] (0 where a token does not use the expert), `up`/`down` the stored arrays of a
    `decode_experts` call (codes, bases, scales, sbase and the padded dictionary) and `*_meta` its shape,
    ncodes, bits and row_codes -> [T, H2]. The (token, expert) pairs the gate keeps, sorted by expert, through
    `swiglu_experts` (`kernel`: the fused cdot kernel; else the activated experts decoded), each row weighted
    by its gate and added to its token. Only activated experts' bytes are read. With `seen` (a set the
    caller keeps) the stored checksums are verified the first time the arrays are seen (`verify_once`)."""
    from .format import verify_once
    from .ir import stored_weight
    wu, du = stored_weight(*up, checksums=up_checksums, **up_meta)
    wd, dd = stored_weight(*down, checksums=down_checksums, **down_meta)
    if seen is not None:
        verify_once(seen, "gate/up", wu, up_checksums)
        verify_once(seen, "down", wd, down_checksums)
    pairs = (gate != 0).nonzero()  # (token, expert), token-major
    order, seg, experts = sort_by_expert(pairs[:, 1], wu.shape[0])
    token, expert = pairs[order, 0], pairs[order, 1]
    xs = x.index_select(0, token).float().contiguous()
    y, _ = swiglu_experts(xs, seg, experts, wu, wd, du, torch.nn.functional.silu, dict_table=up[4],
                          kernel=kernel, down_dictionary=dd, down_dict_table=down[4])
    out = torch.zeros(x.shape[0], wd.shape[1], dtype=torch.float32, device=x.device)
    return out.index_add_(0, token, y * gate[token, expert][:, None].float())


class CompressedExperts(nn.Module):
    """Drop-in for a fused experts module (forward(hidden, top_k_index, top_k_weights)) that keeps the
    experts compressed and multiplies through the fused kernel; only activated experts are read."""

    def __init__(self, gate_up: CompressedTensor, down: CompressedTensor, d: Dictionary, act_fn):
        from ..kinds.cdot import padded_dictionary
        super().__init__()
        self.gate_up, self.down, self.dictionary, self.act_fn = gate_up, down, d, act_fn
        self.num_experts = gate_up.shape[0]
        self.dict_table = padded_dictionary(d)

    def route(self, hidden_states, top_k_index):
        """Tokens sorted by expert: (x [T*k, H] f32, seg [A+1], active experts [A], order, token of each row)."""
        k = top_k_index.shape[-1]
        order, seg, experts = sort_by_expert(top_k_index, self.num_experts)
        token = order // k
        return hidden_states[token].float().contiguous(), seg, experts, order, token

    def experts_forward(self, x, seg, experts):
        """down(act(gate_up(x))) per expert segment, through the fused kernel; the intermediate h returned too."""
        return swiglu_experts(x, seg, experts, self.gate_up, self.down, self.dictionary, self.act_fn,
                              self.dict_table)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        T, H = hidden_states.shape
        x, seg, experts, order, token = self.route(hidden_states, top_k_index)
        y, _ = self.experts_forward(x, seg, experts)
        y = y * top_k_weights.reshape(-1)[order, None].float()
        out = torch.zeros(T, H, dtype=torch.float32).index_add_(0, token, y)
        return out.to(hidden_states.dtype)


def install(model: nn.Module, compressed: CompressedModel) -> nn.Module:
    """Replace every experts module of `model` with a `CompressedExperts` running the fused kernel."""
    for name, layer in require_moe_layers(model):
        prefix = f"{name}." if name else ""
        new = CompressedExperts(compressed.tensors[prefix + "gate_up_proj"], compressed.tensors[prefix + "down_proj"],
                                compressed.dictionary, layer.act_fn)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
    return model


def compress_matrices(weights: dict[str, torch.Tensor], widths=range(8, 17)) -> CompressedModel:
    """Round-to-nearest ternary + the dictionary code for any weights {name: W [E, rows, cols] or [rows, cols]}
    (dense nn.Linear weights treated as experts, e.g. a dense model's MLP projections)."""
    quantized = {k: ternary_rtn(W.detach().double() if W.dim() == 3 else W.detach().double()[None])
                 for k, W in weights.items()}
    return encode_all(quantized, widths, "rtn")
