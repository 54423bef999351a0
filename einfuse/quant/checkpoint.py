"""Quantized checkpoints: `save(quantized_or_llm, dir)` writes `weights.safetensors` (each quantized Linear's
codes, scales and zeros as stored — packed u4, int8, u8, f16 — and the model's other tensors) and
`manifest.json` (format, scheme, the model's fingerprint, the quantized layers, sizes). `load(model, dir)`
rebuilds the quantized model from a float model of the same architecture without calibrating."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os

import torch

from . import formats as fm
from .calibrate import KEY_BUFFERS, QUANT_BUFFERS, ROT_BUFFERS, Quantized, block_rotate, untie
from .schemes import Scheme

FORMAT = "einfuse.quant/1"
WEIGHTS, MANIFEST = "weights.safetensors", "manifest.json"


def fingerprint(model: torch.nn.Module) -> str:
    """The architecture a checkpoint belongs to: class, config, parameter names and shapes (not values)."""
    config = getattr(model, "config", None)
    text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(config)
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters(remove_duplicate=False)]
    blob = f"{type(model).__module__}.{type(model).__qualname__}|{text}|{params}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _quantized_of(obj) -> Quantized:
    if isinstance(obj, Quantized):
        return obj
    runner = getattr(obj, "runner", None)
    if runner is not None and isinstance(getattr(runner, "quantized", None), Quantized):
        return runner.quantized
    raise TypeError("einfuse.quant.save: pass the Quantized that einfuse.quant.calibrate (or load) returned, or an "
                    "LLM made from it (Quantized.llm())")


def save(obj, directory: str) -> dict:
    """Write a quantized model (a Quantized, or an LLM serving one) to `directory`; returns the sizes."""
    from safetensors.torch import save_file

    q = _quantized_of(obj)
    os.makedirs(directory, exist_ok=True)
    replaced = {f"{name}.weight" for name in q.layers}
    tensors, seen, tied = {}, {}, {}
    for name, t in q.model.state_dict(keep_vars=False).items():
        if name in replaced:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:  # a tied weight (the LM head and the embedding): stored once
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    save_file(tensors, os.path.join(directory, WEIGHTS))
    quant = sum(tensors[f"{n}.{b}"].numel() * tensors[f"{n}.{b}"].element_size()
                for n in q.layers for b in QUANT_BUFFERS if f"{n}.{b}" in tensors)
    fp16 = sum(q.model.get_submodule(n).weight.numel() * 2 for n in q.layers)
    sizes = {"file_bytes": os.path.getsize(os.path.join(directory, WEIGHTS)), "quantized_linear_bytes": quant,
             "fp16_linear_bytes": fp16, "ratio": round(quant / fp16, 4) if fp16 else None}
    manifest = {"format": FORMAT, "scheme": dataclasses.asdict(q.scheme), "fingerprint": fingerprint(q.model),
                "model": f"{type(q.model).__module__}.{type(q.model).__qualname__}", "layers": q.layers,
                "tied": tied, "sizes": sizes, "report": q.report}
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, default=str)
    return sizes


def load(model: torch.nn.Module, directory: str, inplace: bool = False) -> Quantized:
    """The quantized model of `directory`, built on `model` (a float model of the architecture it was saved
    from; copied unless `inplace`) without calibration."""
    from safetensors.torch import load_file

    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"einfuse.quant.load: {directory} has no {MANIFEST}; save one with einfuse.quant.save")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"einfuse.quant.load: {directory} is {manifest.get('format')!r}, not {FORMAT!r}")
    want, got = manifest["fingerprint"], fingerprint(model)
    if want != got:
        raise ValueError(f"einfuse.quant.load: the checkpoint in {directory} was saved from a different model "
                         f"({manifest['model']}, fingerprint {want}; this {type(model).__name__} is {got}): load it "
                         "into the model it was calibrated from (same class, config and weights' shapes)")
    scheme = Scheme(**manifest["scheme"])
    tensors = load_file(os.path.join(directory, WEIGHTS))
    model = model if inplace else copy.deepcopy(model)
    layers = manifest["layers"]
    for name in layers:
        mod = model.get_submodule(name)
        untie(model, mod)  # a quantized LM head: the embedding keeps its own weight
        bufs = {b: tensors.pop(f"{name}.{b}") for b in QUANT_BUFFERS if f"{name}.{b}" in tensors}
        for b, t in bufs.items():
            mod.register_buffer(b, t)
        mod.weight.data = dequantize(bufs, scheme, mod.weight.shape).to(mod.weight.dtype)
        rot = {b: tensors.pop(f"{name}.{b}") for b in ROT_BUFFERS if f"{name}.{b}" in tensors}
        for b, t in rot.items():  # rotated inputs: the stored codes are of W Hb, the float weight deq(W Hb) Hb^T
            mod.register_buffer(b, t)
        if "weight_hb" in rot:
            hb = rot["weight_hb"].double()
            mod.weight.data = block_rotate(mod.weight.data.double(), hb.T).to(mod.weight.dtype)
    for name in [n for n in tensors if n.rsplit(".", 1)[-1] in KEY_BUFFERS]:  # centred keys' params (k_proj)
        mod, attr = name.rsplit(".", 1)
        try:
            target = model.get_submodule(mod)
        except AttributeError:
            continue  # reported as a tensor this model lacks
        target.register_buffer(attr, tensors.pop(name))
    params = dict(model.named_parameters(remove_duplicate=False))
    owner: dict = {}
    for name in tensors:  # tied in this model, separate in the checkpoint (a rotated model's LM head): untie
        p = params.get(name)
        if p is None:
            continue
        if p.data_ptr() in owner:
            mod, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(mod), attr, torch.nn.Parameter(p.detach().clone(), requires_grad=False))
        owner[p.data_ptr()] = name
    bad = list(model.load_state_dict(tensors, strict=False).unexpected_keys)
    if bad:
        raise ValueError(f"einfuse.quant.load: {directory} holds tensors this model lacks: {bad[:5]}")
    return Quantized(model, scheme, layers, dict(manifest.get("report", {}), loaded_from=directory))


def dequantize(bufs: dict, scheme: Scheme, shape) -> torch.Tensor:
    """The float weight a Linear's stored buffers stand for (docs/quant.md)."""
    k = shape[-1]
    g = scheme.group
    q = bufs["weight_q"]
    if scheme.weights == "w4":
        codes = fm.unpack_u4(q, k).to(torch.int16)
        gs = bufs["weight_gs"].to(torch.int16).repeat_interleave(g, -1)[:, :k]
        gz = bufs["weight_gz"].to(torch.int16).repeat_interleave(g, -1)[:, :k]
        return (codes * gs - gz).to(torch.int8).float() * bufs["weight_s"][:, None]
    if scheme.weights == "w4a16":
        return fm.asym4_weight(fm.unpack_u4(q, k), bufs["weight_gs"], bufs["weight_gz"], g)
    return q.float() * bufs["weight_s"][:, None]
