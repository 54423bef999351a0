"""`einfuse.quant.calibrate`: a model's Linear weights quantized for a scheme, from statistics of real text.

Calibration runs the float model on the text once (forward hooks on every Linear's input and on the key
projections' outputs), then applies the scheme's weight transforms in order — smoothing folded into the
preceding norm or projection (SmoothQuant), SmoothAttention (keys -> queries, equal within each RoPE pair),
GPTQ or round-to-nearest onto the scheme's grid — and registers what `quantize_weights`' params read as
buffers on each Linear (`weight_q`, `weight_s`, `weight_gs`, `weight_gz`; see docs/quant.md). The Linear's
float `weight` is replaced by the dequantized values, so the eager model computes what the quantized
weights stand for (a test oracle for the compiled program). A scheme with `center_keys` also measures the
rotated post-RoPE keys (`KeyStats`) and registers `weight_kc` / `weight_kl` on each key projection (what
RotateKeys(center=True)'s params read; the float model's function is unchanged).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from . import formats as fm
from .gptq import Hessian, gptq
from .schemes import Scheme, get_scheme

QUANT_BUFFERS = ("weight_q", "weight_s", "weight_gs", "weight_gz")
KEY_BUFFERS = ("weight_kc", "weight_kl")  # a key projection's centred-key params (RotateKeys(center=True))
ROT_BUFFERS = ("weight_hb",)  # a Linear's input rotation (RotateInputs' W_hb: the block's Hadamard matrix)


# ---------------------------------------------------------------- grids for GPTQ (einfuse.quant.gptq's callback)

@dataclass
class ProgressiveGrid:
    """Level 2 of W4A8 on level-1 units (the weight divided by its per-channel scale, in ±119). With `clip`,
    each group's integer scale and zero are searched (the min/max fit, scales up to 3 smaller, zeros that keep
    either end or centre the range) for the least squared error: clipping an outlier the integer scale would
    otherwise stretch the whole group for (QServe's weight clipping, on the progressive grid)."""

    group_size: int
    clip: bool = False

    def fit(self, w):
        w = w.clamp(-fm.PROTECT, fm.PROTECT)  # GPTQ's updates may push a weight past the protective range
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        s = torch.ceil((hi - lo) / 15).clamp(1, 16)
        z = torch.round(-lo / s).clamp(0, 15)
        if not self.clip:
            return s, z
        best_s, best_z, best = s, z, self._error(w, s, z)
        for shrink in range(1, 4):
            sc = (s - shrink).clamp(min=1)
            for zc in (torch.round(-lo / sc), torch.round(15 - hi / sc), torch.round((15 - (hi + lo) / sc) / 2)):
                zc = zc.clamp(0, 15)
                err = self._error(w, sc, zc)
                ok = (err < best) & (torch.maximum(zc * sc, (15 - zc) * sc) <= 127)  # (q - z) * s stays in int8
                best_s, best_z, best = torch.where(ok, sc, best_s), torch.where(ok, zc, best_z), torch.where(ok, err, best)
        return best_s, best_z

    def _error(self, w, s, z):
        """Squared error of groups w [..., group] on per-group (s, z) [...]."""
        deq, _ = self.quantize(w, (s[..., None], z[..., None]))
        return ((w - deq) ** 2).sum(-1)

    def quantize(self, w, params):
        s, z = params
        q = (torch.round(w.clamp(-fm.PROTECT, fm.PROTECT) / s) + z).clamp(0, 15)  # (q - z) * s stays in int8
        return (q - z) * s, q.to(torch.int32)


@dataclass
class Asym4Grid:
    """W4A16: asymmetric 4 bits per group, the scale rounded to f16 as stored."""

    group_size: int

    def fit(self, w):
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp_min(1e-8).half().to(w.dtype)
        return scale, torch.round(-lo / scale).clamp(0, 15)

    def quantize(self, w, params):
        scale, zero = params
        q = (torch.round(w / scale) + zero).clamp(0, 15)
        return (q - zero) * scale, q.to(torch.int32)


@dataclass
class Sym8Grid:
    """W8: symmetric int8 per output channel."""

    group_size: None = None

    def fit(self, w):
        return (w.abs().amax(-1) / 127).clamp_min(1e-12)

    def quantize(self, w, scale):
        q = torch.round(w / scale).clamp(-127, 127)
        return q * scale, q.to(torch.int32)


# ---------------------------------------------------------------- the result

@dataclass
class Quantized:
    """A model whose Linear layers carry the quantized buffers of `scheme`, and what calibration did."""

    model: torch.nn.Module
    scheme: Scheme
    layers: list = field(default_factory=list)  # the quantized Linears' module names
    report: dict = field(default_factory=dict)

    def passes(self) -> list:
        return self.scheme.passes()

    def compile(self, args=(), kwargs=None, **options):
        """einfuse.compile of the quantized model, with the scheme's passes before the pipeline."""
        from ..api import compile as compile_

        return compile_(self.model, args, kwargs, prepare=self.scheme.passes(), **options)

    def compile_cached(self, **options):
        """The serving programs (prefill/decode over a paged cache) with the scheme's passes."""
        from ..api import compile_cached

        return compile_cached(self.model, prepare=self.scheme.weight_passes(), after_cache=self.scheme.kv_passes(),
                              **options)

    def llm(self, tokenizer=None, backend: str | None = None, **kwargs):
        """An einfuse.LLM serving the quantized programs (its KV cache quantized as the scheme says)."""
        from ..serve import LLM

        runner = QuantPagedRunner(self, backend)
        return LLM(self.model, tokenizer, runner=runner, backend=backend or "torch", **kwargs)

    def weight_bytes(self) -> dict:
        """Bytes of the quantized Linears: stored (codes, scales, zeros) against fp16."""
        stored = fp16 = 0
        for name in self.layers:
            mod = self.model.get_submodule(name)
            stored += sum(getattr(mod, b).numel() * getattr(mod, b).element_size()
                          for b in QUANT_BUFFERS if hasattr(mod, b))
            fp16 += mod.weight.numel() * 2
        return {"stored": stored, "fp16": fp16, "ratio": stored / max(fp16, 1)}


def _paged_runner_class():
    from ..serve.paged import PagedRunner

    class _Runner(PagedRunner):
        """PagedRunner over a Quantized model's programs."""

        def __init__(self, q: Quantized, backend):
            super().__init__(q.model, backend)
            self.quantized = q

        def bind(self, cache):
            self.cache = cache
            self.programs = self.quantized.compile_cached(block_size=cache.block_size, backend=self.backend)
            nb = next(s for s in self.programs.decode.ir.sizes if str(s) == "NB")
            self.states = {i.name: torch.zeros(i.type.concrete_shape({nb: cache.num_blocks}),
                                               dtype=i.type.dtype.torch, device=self.device)
                           for i in self.programs.states}

    return _Runner


def QuantPagedRunner(q: Quantized, backend=None):
    return _paged_runner_class()(q, backend)


# ---------------------------------------------------------------- calibration

def linears(model: torch.nn.Module, skip=("lm_head",)) -> dict:
    """{name: nn.Linear} of every Linear to quantize (none named by `skip`: the LM head by default; a Linear
    sharing an embedding's weight is untied from it first)."""
    out = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not any(s in n for s in skip)}
    for mod in out.values():
        untie(model, mod)
    return out


def untie(model: torch.nn.Module, mod: torch.nn.Linear) -> None:
    """Give `mod` a weight of its own when it shares one with an embedding (a tied LM head), so that
    quantizing it leaves the embedding as it was."""
    if any(isinstance(m, torch.nn.Embedding) and m.weight is mod.weight for m in model.modules()):
        mod.weight = torch.nn.Parameter(mod.weight.detach().clone(), requires_grad=False)


def token_segments(texts, tokenizer, seq_len: int, segments: int, sentences: bool = False) -> list:
    """Calibration pieces of `seq_len` tokens from `texts` (strings, or token-id tensors). A decoder reads a
    stream: the texts are concatenated and cut into pieces of `seq_len`. An encoder (`sentences=True`) reads
    sentences as its users give them: each text is one piece, tokenized with the model's special tokens
    ([CLS] ... [SEP]) and truncated to `seq_len` (a tensor is taken as is)."""
    if texts is None or (isinstance(texts, (list, tuple)) and not texts) or (isinstance(texts, str) and not texts.strip()):
        raise ValueError("einfuse.quant.calibrate: no calibration text; pass texts=[...] (real text, e.g. "
                         "einfuse.hub.austen('emma')['emma']) and the tokenizer, or a tensor of token ids")
    if isinstance(texts, str):
        texts = [texts]
    if any(not isinstance(t, torch.Tensor) for t in texts) and tokenizer is None:
        raise ValueError("einfuse.quant.calibrate: texts are strings but no tokenizer= was given")
    if sentences:
        pieces = [t.reshape(-1).long()[:seq_len] if isinstance(t, torch.Tensor) else torch.tensor(
            tokenizer(t, truncation=True, max_length=seq_len, verbose=False)["input_ids"]) for t in texts[:segments]]
        pieces = [p for p in pieces if len(p) > 1]
    else:
        ids = []
        for t in texts:
            if not isinstance(t, torch.Tensor):
                t = t[:seq_len * segments * 16]  # enough characters for the pieces (a token is a few characters)
                t = torch.tensor(tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"])
            ids.append(t.reshape(-1).long())
        flat = torch.cat(ids)
        pieces = [p for p in flat.split(seq_len) if len(p) == seq_len][:segments]
        if not pieces:
            pieces = [flat[:seq_len]] if len(flat) > 1 else []
    if not pieces:
        raise ValueError("einfuse.quant.calibrate: the calibration text has fewer than 2 tokens; pass more text")
    return pieces


class Stats:
    """Per Linear: input channel amax and (for GPTQ) the Hessian; per key projection: output channel amax."""

    def __init__(self, model, layers: dict, hessians: bool):
        self.amax, self.hess, self.kmax, self.owner, self._inputs = {}, {}, {}, {}, {}
        self.handles = []
        for name, mod in layers.items():
            self.handles.append(mod.register_forward_hook(self._hook(name, hessians)))

    def _hook(self, name, hessians):
        def hook(mod, inp, out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
            a = x.abs().amax(0)
            self.amax[name] = torch.maximum(self.amax[name], a) if name in self.amax else a
            if name.endswith("k_proj"):
                o = out.detach().reshape(-1, out.shape[-1]).float().abs().amax(0)
                self.kmax[name] = torch.maximum(self.kmax[name], o) if name in self.kmax else o
            if hessians:
                key = (inp[0].data_ptr(), tuple(inp[0].shape))
                if name not in self.hess:  # Linears reading one tensor (q/k/v, gate/up) share one Hessian
                    first = self._inputs.get(key, (None,))[0]
                    self.hess[name] = self.hess[first] if first is not None else Hessian(x.shape[-1], dtype=torch.float32)
                    self.owner[name] = first is None
                if self.owner[name]:
                    self.hess[name].add(x)
                # held until the next forward, so no later tensor reuses the address within this one
                self._inputs.setdefault(key, (name, inp[0]))
        return hook

    def next_input(self):
        """Called before each calibration forward: input tensors of the last one are gone."""
        self._inputs = {}

    def distinct_hessians(self, names) -> list:
        """The Hessian objects of `names`, each once (shared ones are transformed once)."""
        out = {}
        for n in names:
            if n in self.hess:
                out.setdefault(id(self.hess[n]), self.hess[n])
        return list(out.values())

    def close(self):
        for h in self.handles:
            h.remove()


class KeyStats:
    """Per decoder layer: the mean and std of the keys as the attention reads them after RoPE and the Hadamard
    rotation of RotateKeys (per KV head and channel), from hooks on the key projections (Llama layout: the
    model's rotary_emb and transformers' apply_rotary_pos_emb at positions 0..T-1 of each piece).
    `register(alpha)` stores `weight_kc` (the mean) and `weight_kl` (std^alpha, mean 1 per layer) as buffers
    on each k_proj; the float model's function is unchanged."""

    def __init__(self, model):
        blocks = _blocks(model)
        rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
        if blocks is None or rotary is None or not all(hasattr(b.self_attn, "k_proj") for b in blocks):
            raise ValueError("einfuse.quant.calibrate: center_keys needs a Llama-layout model (model.model.layers[i]"
                             ".self_attn.k_proj and model.model.rotary_emb); use a scheme without center_keys")
        cfg = model.config
        self.D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if self.D & (self.D - 1):
            raise ValueError(f"einfuse.quant.calibrate: center_keys: head dim {self.D} is not a power of two")
        self.rotary, self.mods = rotary, [b.self_attn.k_proj for b in blocks]
        self.H = hadamard(self.D)
        self.sums: dict = {}
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.mods)]

    def _hook(self, i):
        def hook(mod, inp, out):
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            B, T, C = out.shape
            k = out.detach().float().view(B, T, C // self.D, self.D).transpose(1, 2)  # [B, KVH, T, D]
            pos = torch.arange(T, device=out.device)[None].expand(B, T)
            cos, sin = self.rotary(k, pos)
            _, k = apply_rotary_pos_emb(k, k, cos.float(), sin.float())
            k = (k @ self.H.to(k.device)).double()
            n, s1, s2 = self.sums.get(i, (0, 0.0, 0.0))
            self.sums[i] = (n + B * T, s1 + k.sum((0, 2)), s2 + (k * k).sum((0, 2)))
        return hook

    def close(self):
        for h in self.handles:
            h.remove()

    def register(self, alpha: float) -> int:
        for i, mod in enumerate(self.mods):
            n, s1, s2 = self.sums[i]
            mu = s1 / n
            sd = (s2 / n - mu * mu).clamp_min(0).sqrt().clamp_min(1e-6)
            lam = sd.pow(alpha)
            lam = lam / lam.mean()
            dev = mod.weight.device
            mod.register_buffer("weight_kc", mu.float().to(dev).contiguous())
            mod.register_buffer("weight_kl", lam.float().to(dev).contiguous())
        return len(self.mods)


def hadamard(D: int) -> torch.Tensor:
    """The normalized Sylvester-Hadamard matrix RotateKeys rotates by (H[d, e] = (-1)^popcount(d & e) / sqrt(D))."""
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < D:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return (H / D ** 0.5).float()


def _progress(enabled: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), disable=not enabled, transient=False)


def calibrate(model: torch.nn.Module, texts=None, scheme="w4a8kv4", *, tokenizer=None, seq_len: int = 512,
              segments: int = 64, group: int | None = None, inplace: bool = False,
              progress: bool = True) -> Quantized:
    """Quantize `model`'s Linear layers for `scheme` (a name in einfuse.quant.SCHEMES or a Scheme), calibrated
    on `segments` pieces of `seq_len` tokens of `texts` (strings with `tokenizer`, or token-id tensors). A
    scheme with nothing to calibrate (round to nearest) needs no text. Returns a `Quantized` (the model —
    a copy unless `inplace` — with its quantized buffers; `.compile()`, `.llm()`, einfuse.quant.save)."""
    scheme = get_scheme(scheme, group)
    t0 = time.perf_counter()
    pieces = token_segments(texts, tokenizer, seq_len, segments, sentences=_is_encoder(model)) if scheme.calibrated else []
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    layers = linears(model, scheme.skip)
    report = {"scheme": scheme.name, "group": scheme.group, "calibration_tokens": sum(len(p) for p in pieces)}
    with _progress(progress) as bar, torch.no_grad():
        stats = keys = None
        if pieces and scheme.calibrated:
            stats = Stats(model, layers, hessians=scheme.gptq)
            keys = KeyStats(model) if scheme.center_keys is not None else None
            task = bar.add_task("einfuse.quant: calibration", total=len(pieces))
            for p in pieces:
                stats.next_input()
                model(p[None], use_cache=False) if _is_causal(model) else model(p[None])
                bar.advance(task)
            stats.close()
            if keys is not None:
                keys.close()
                report["centered_keys"] = keys.register(scheme.center_keys)
        if stats is not None and scheme.smooth_attention:
            report["smooth_attention"] = smooth_attention(model, stats, scheme.smooth_attention)
        if scheme.rotate:
            report["rotated"] = rotate_residual(model, stats)
        elif stats is not None and scheme.smooth and scheme.acts:
            report["smoothed"] = smooth_activations(model, layers, stats, scheme.smooth)
        if scheme.weights:
            task = bar.add_task(f"einfuse.quant: {scheme.weights} {'GPTQ' if scheme.gptq and stats else 'RTN'}",
                                total=len(layers))
            for name, mod in layers.items():
                h = stats.hess[name].H if stats is not None and scheme.gptq and name in stats.hess else None
                quantize_linear(mod, scheme, h, name=name)
                bar.advance(task)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    q = Quantized(model, scheme, list(layers) if scheme.weights else [], report)
    if scheme.weights:
        report["weight_bytes"] = q.weight_bytes()
    return q


def _is_encoder(model) -> bool:
    """A transformers model that does not generate (BERT-like): it is calibrated on sentences, not a stream."""
    can_generate = getattr(model, "can_generate", None)
    return hasattr(model, "config") and callable(can_generate) and not can_generate()


def _is_causal(model) -> bool:
    import inspect

    return "use_cache" in inspect.signature(model.forward).parameters


# ---------------------------------------------------------------- weight transforms

def quantize_linear(mod: torch.nn.Linear, scheme: Scheme, hessian: torch.Tensor | None = None,
                    name: str = "Linear") -> None:
    """Register `mod`'s quantized buffers for `scheme` (GPTQ with `hessian`, else round to nearest) and set
    its float weight to what they stand for. With `scheme.rotate_inputs` the quantized weight is W Hb (Hb the
    block-diagonal normalized Hadamard of blocks B = hadamard_block(K); GPTQ on Hb^T H Hb), `weight_hb` the
    B x B block is registered, and the float weight is deq(W Hb) Hb^T (the same function of the input)."""
    for b in ROT_BUFFERS:
        if hasattr(mod, b):
            delattr(mod, b)
    if not scheme.rotate_inputs:
        return _quantize_linear(mod, scheme, hessian)
    from ..passes.quantize import hadamard_block

    K = mod.weight.shape[1]
    B = hadamard_block(K)
    if B < 8:
        raise ValueError(f"einfuse.quant: scheme {scheme.name!r}: Linear {name!r} has {K} in-features, with no "
                         f"power-of-two block >= 8 dividing them (the largest is {B}): its input cannot be rotated; "
                         "use a scheme without rotate_inputs (e.g. 'w4a8')")
    hb = hadamard(B).double()
    w = mod.weight.data
    mod.weight.data = block_rotate(w.double(), hb).to(w.dtype)
    if hessian is not None:
        hd = hessian.double()
        hessian = block_rotate(block_rotate(hd, hb).T.contiguous(), hb).T.to(hessian.dtype).contiguous()
    _quantize_linear(mod, scheme, hessian)
    mod.weight.data = block_rotate(mod.weight.data.double(), hb.T).to(w.dtype)
    mod.register_buffer("weight_hb", hb.float().contiguous())


def block_rotate(x: torch.Tensor, hb: torch.Tensor) -> torch.Tensor:
    """x [.., K] times the block-diagonal matrix of `hb` [B, B] (x Hb, block by block along the last dim)."""
    B = hb.shape[0]
    return (x.reshape(*x.shape[:-1], x.shape[-1] // B, B) @ hb.to(x.dtype)).reshape(x.shape)


def _quantize_linear(mod: torch.nn.Linear, scheme: Scheme, hessian: torch.Tensor | None = None) -> None:
    w = mod.weight.data.float()
    g = scheme.group
    for b in QUANT_BUFFERS:
        if hasattr(mod, b):
            delattr(mod, b)
    if scheme.weights == "w4":
        s1 = (w.abs().amax(-1) / fm.PROTECT).clamp_min(1e-12)
        lvl = w / s1[:, None]
        if hessian is not None:
            grid = ProgressiveGrid(g, clip=scheme.clip)
            res = gptq(lvl, hessian, grid)
            codes = res.codes.to(torch.uint8)
            gs, gz = _group_params(grid, res)
        else:
            w8 = torch.round(lvl).clamp(-fm.PROTECT, fm.PROTECT)
            gs, gz = fm.progressive_params(w8, g)
            codes = fm.progressive_codes(w8, gs, gz, g)
        exact = codes.int() * fm.expand_groups(gs, codes.shape[-1], g).int() - \
            fm.expand_groups(gz, codes.shape[-1], g).int() * fm.expand_groups(gs, codes.shape[-1], g).int()
        if exact.abs().max() > 127:
            raise RuntimeError(f"einfuse.quant: a W4A8 level-1 value {int(exact.abs().max())} leaves int8")
        w8 = fm.progressive_w8(codes, gs, gz, g)
        zs = (gz.to(torch.int16) * gs.to(torch.int16)).to(torch.uint8)  # the IR's zero: z * s
        bufs = {"weight_q": fm.pack_u4(codes), "weight_s": s1, "weight_gs": gs, "weight_gz": zs}
        deq = w8.float() * s1[:, None]
    elif scheme.weights == "w4a16":
        if hessian is not None:
            res = gptq(w, hessian, Asym4Grid(g))
            codes = res.codes.to(torch.uint8)
            scale, zero = _group_params(Asym4Grid(g), res)
        else:
            scale, zero = fm.asym4_params(w, g)
            codes = fm.asym4_codes(w, scale, zero, g)
        bufs = {"weight_q": fm.pack_u4(codes), "weight_gs": scale.half(), "weight_gz": zero.half()}
        deq = fm.asym4_weight(codes, scale, zero, g)
    elif scheme.weights == "w8":
        if hessian is not None:
            res = gptq(w, hessian, Sym8Grid())
            q, s = res.codes.to(torch.int8), res.params[0].float()
        else:
            q, s = fm.quant_sym8(w)
        bufs = {"weight_q": q, "weight_s": s}
        deq = q.float() * s[:, None]
    elif scheme.weights == "fp8":
        q, s = fm.quant_fp8(w)
        bufs = {"weight_q": q, "weight_s": s}
        deq = q.float() * s[:, None]
    else:
        raise ValueError(f"einfuse.quant: unknown weight format {scheme.weights!r}")
    for k, v in bufs.items():
        mod.register_buffer(k, v.contiguous())
    mod.weight.data = deq.to(mod.weight.dtype)


def _group_params(grid, res):
    """Per-group parameters GPTQ fitted, as [N, G] tensors of the stored dtypes."""
    a = torch.stack([p[0] for p in res.params], -1)
    b = torch.stack([p[1] for p in res.params], -1)
    if isinstance(grid, ProgressiveGrid):
        return a.to(torch.uint8), b.to(torch.uint8)
    return a.half(), b.half()


def _norm_before(model, name: str):
    """The module whose output feeds Linear `name` and can absorb a per-channel scale: Llama layout."""
    parent, leaf = name.rsplit(".", 1) if "." in name else ("", name)
    block = parent.rsplit(".", 1)[0]
    mods = dict(model.named_modules())
    if leaf in ("q_proj", "k_proj", "v_proj"):
        return mods.get(f"{block}.input_layernorm")
    if leaf in ("gate_proj", "up_proj"):
        return mods.get(f"{block}.post_attention_layernorm")
    return None


def smooth_activations(model, layers: dict, stats: Stats, alpha: float) -> int:
    """SmoothQuant: per input channel s = amax(X)^alpha / amax(W)^(1 - alpha); X / s folded into the norm
    before q/k/v and gate/up (Llama layout), W * s. Returns how many groups of Linears were smoothed."""
    groups: dict = {}
    for name in layers:
        norm = _norm_before(model, name)
        if norm is not None and name in stats.amax:
            groups.setdefault(id(norm), (norm, []))[1].append(name)
    for norm, names in groups.values():
        xmax = stats.amax[names[0]].clamp_min(1e-5)
        wmax = torch.stack([layers[n].weight.data.abs().amax(0).float() for n in names]).amax(0).clamp_min(1e-5)
        s = (xmax.pow(alpha) / wmax.pow(1 - alpha)).clamp(1e-2, 1e2)
        norm.weight.data = (norm.weight.data.float() / s).to(norm.weight.dtype)
        for n in names:
            w = layers[n].weight
            w.data = (w.data.float() * s[None, :]).to(w.dtype)
        for hess in stats.distinct_hessians(names):  # the Hessian of the smoothed input X / s
            inv = (1 / s).double()
            hess.H.mul_(inv[:, None] * inv[None, :])
    return len(groups) + _smooth_projections(model, layers, stats, alpha)


def _smooth_projections(model, layers: dict, stats: Stats, alpha: float) -> int:
    """SmoothQuant between two Linears with nothing nonlinear per channel between them: v_proj -> o_proj (the
    scale shared by the query heads of one KV head) and up_proj -> down_proj (Llama layout)."""
    blocks = _blocks(model)
    if blocks is None:
        return 0
    names = {id(m): n for n, m in model.named_modules()}
    cfg = model.config
    count = 0
    for b in blocks:
        a, m = b.self_attn, b.mlp
        D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        for src, dst, group in ((a.v_proj, a.o_proj, a.o_proj.weight.shape[1] // a.v_proj.weight.shape[0]),
                                (m.up_proj, m.down_proj, 1)):
            n_dst = names[id(dst)]
            if n_dst not in stats.amax or n_dst not in layers or src.bias is not None:
                continue
            xmax = stats.amax[n_dst].clamp_min(1e-5)
            wmax = dst.weight.data.abs().amax(0).float().clamp_min(1e-5)
            raw = (xmax.pow(alpha) / wmax.pow(1 - alpha)).clamp(1e-2, 1e2)
            if group > 1:  # o_proj's channel (h, d) reads V channel (h // group, d): one scale per V channel
                kvh = src.weight.shape[0] // D
                s_src = raw.view(kvh, group, D).amax(1).reshape(-1)
                s_dst = s_src.view(kvh, 1, D).expand(kvh, group, D).reshape(-1)
            else:
                s_src = s_dst = raw
            src.weight.data = (src.weight.data.float() / s_src[:, None]).to(src.weight.dtype)
            dst.weight.data = (dst.weight.data.float() * s_dst[None, :]).to(dst.weight.dtype)
            for hess in stats.distinct_hessians([n_dst]):
                inv = (1 / s_dst).to(hess.H.dtype)
                hess.H.mul_(inv[:, None] * inv[None, :])
            count += 1
    return count


def smooth_attention(model, stats: Stats, alpha: float) -> int:
    """QServe's SmoothAttention: per key channel lambda = max|K|^alpha, equal within each RoPE pair (d, d + D/2),
    moved from k_proj's rows to q_proj's (the scores are unchanged, RoPE commutes)."""
    count = 0
    for name, mod in model.named_modules():
        if not name.endswith("self_attn") or not hasattr(mod, "k_proj") or f"{name}.k_proj" not in stats.kmax:
            continue
        cfg = model.config
        D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kvh = mod.k_proj.weight.shape[0] // D
        group = mod.q_proj.weight.shape[0] // D // kvh
        km = stats.kmax[f"{name}.k_proj"].view(kvh, 2, D // 2)
        lam = km.amax(1, keepdim=True).expand(kvh, 2, D // 2).reshape(kvh, D).clamp_min(1e-5).pow(alpha)
        k = mod.k_proj.weight
        k.data = (k.data.float() / lam.reshape(-1, 1)).to(k.dtype)
        q = mod.q_proj.weight
        lam_q = lam.repeat_interleave(group, 0).reshape(-1, 1)
        q.data = (q.data.float() * lam_q).to(q.dtype)
        count += 1
    return count


def _blocks(model):
    """The decoder blocks of a Llama-layout model (model.model.layers), or None."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(model, "lm_head") or not hasattr(inner, "embed_tokens"):
        return None
    need = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
    return layers if all(all(hasattr(b, n) for n in need) for b in layers) else None


def rotate_residual(model, stats: Stats | None = None, seed: int = 0) -> int:
    """QuaRot/SpinQuant's rotation of the residual stream (beyond QServe): every RMSNorm's gain is folded into
    the Linears that read it, and the hidden dimension is rotated by a random orthogonal Q — embeddings E Q,
    readers of the stream W diag(g) Q, writers Q^T W, the LM head (untied) diag(g_final)-folded and rotated.
    RMSNorm commutes with Q, so the float model computes the same function; the quantizers then see weights
    and activations without outlier channels. Hessians of the rotated inputs follow (H -> Q^T g^-1 H g^-1 Q).
    Returns the number of blocks rotated (0: not a Llama-layout model, nothing changed)."""
    blocks = _blocks(model)
    if blocks is None:
        return 0
    for b in blocks:
        if any(getattr(getattr(b.self_attn, n), "bias", None) is not None for n in ("o_proj",)) or \
                getattr(b.mlp.down_proj, "bias", None) is not None:
            return 0
    hidden = model.model.embed_tokens.weight.shape[1]
    g = torch.Generator().manual_seed(seed)
    Q, r = torch.linalg.qr(torch.randn(hidden, hidden, generator=g, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(r))[None, :]
    names = {id(m): n for n, m in model.named_modules()}

    def set_(lin, w):
        lin.weight = torch.nn.Parameter(w.to(lin.weight.dtype), requires_grad=False)

    def reads(norm, lins):
        gain = norm.weight.data.double()
        for lin in lins:
            set_(lin, (lin.weight.data.double() * gain[None, :]) @ Q)
        for hess in stats.distinct_hessians([names[id(lin)] for lin in lins]) if stats is not None else ():
            hess.H.copy_(Q.T @ (hess.H / gain[:, None] / gain[None, :]) @ Q)
        norm.weight.data.fill_(1.0)

    emb = model.model.embed_tokens
    reads(model.model.norm, [model.lm_head])  # before the embedding: a tied head reads the unrotated weight
    emb.weight = torch.nn.Parameter((emb.weight.data.double() @ Q).to(emb.weight.dtype), requires_grad=False)
    for b in blocks:
        a, m = b.self_attn, b.mlp
        reads(b.input_layernorm, [a.q_proj, a.k_proj, a.v_proj])
        reads(b.post_attention_layernorm, [m.gate_proj, m.up_proj])
        set_(a.o_proj, Q.T @ a.o_proj.weight.data.double())
        set_(m.down_proj, Q.T @ m.down_proj.weight.data.double())
    return len(blocks)
