"""`compress_experts`: MoE expert weights become dictionary-coded ternary streams (QMoE) in the IR.

    import einfuse
    from einfuse.passes.compress import compress_experts
    p = compress_experts(bits="ternary", calibration=token_batches, model=model)   # quantizes the model
    fn = einfuse.compile(model, (ids,), prepare=[p])

`compress_experts(...)` runs `einfuse.compress.experts.compress_moe` on the torch model (ternary GPTQ with
routing-aware Hessians, the dictionary code), registers the stored arrays as buffers next to each expert
weight (`<weight>_codes`, `_bases`, `_scales`, `_sbase`, `_checksums`, `_dict`: what
einfuse binds a pass's derived inputs to), and returns the pass. The pass replaces each expert weight
input `W [E, N, K]` whose name ends with the weight's path (dots as underscores) by those inputs — the code
stream typed `tdict<bits>[bytes]` — and an opaque decode `W_dq = decode_experts(...)` that the reference
evaluator runs; the dump line carries the sizes (bytes, bits per parameter).
"""
from __future__ import annotations

import hashlib
import re

import torch

from ..compress.experts import CompressedModel, compress_moe
from ..compress.format import CompressedTensor
from ..compress.ir import code_dtype
from ..ir import dtypes as dt
from ..ir.module import Input, Module, Opaque, TensorRef, TensorType
from .base import Pass, PassError

SUFFIXES = ("codes", "bases", "scales", "sbase", "checksums", "dict")


def _flat(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]+", "_", name)


def arrays(ct: CompressedTensor, dict_table: torch.Tensor) -> dict[str, torch.Tensor]:
    """The arrays a compressed weight binds, in SUFFIXES order (the decode call reads them without checksums)."""
    return {**ct.arrays(), "dict": dict_table}


def register_buffers(model: torch.nn.Module, compressed: CompressedModel) -> None:
    """`<weight>_<suffix>` buffers beside every compressed expert weight (what bind_derived reads)."""
    from ..kinds.cdot import padded_dictionary
    table = padded_dictionary(compressed.dictionary)
    for name, ct in compressed.tensors.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        for suffix, t in arrays(ct, table).items():
            owner.register_buffer(f"{attr}_{suffix}", t, persistent=False)


class CompressExperts(Pass):
    name = "compress_experts"

    def __init__(self, compressed: CompressedModel, bits: str = "ternary"):
        if bits != "ternary":
            raise ValueError(f"einfuse compress_experts: bits={bits!r}; only 'ternary' (QMoE) is implemented")
        self.bits = bits
        self._compressed = compressed
        from ..kinds.cdot import padded_dictionary
        self._dict = padded_dictionary(compressed.dictionary)
        # what the pass does depends on the compressed weights: their checksums identify them
        blob = b"".join(ct.checksums.numpy().tobytes() for ct in compressed.tensors.values())
        self.weights_digest = hashlib.sha256(blob).hexdigest()[:16]

    def run(self, m: Module) -> Module:
        flat = {_flat(k): (k, ct) for k, ct in self._compressed.tensors.items()}
        found = {}
        for i in m.inputs:
            if len(i.type.shape) != 3 or not i.type.dtype.is_float:
                continue
            hits = [k for k in flat if _flat(i.name).endswith(k)]
            if hits:
                found[i.name] = flat[max(hits, key=len)]
        if not found:
            raise PassError(self.name, f"module {m.name!r} has no MoE expert weight inputs (3-D float params "
                            f"named like {', '.join(list(self._compressed.tensors)[:2])}, ...); nothing to compress")
        inputs, decodes = [], []
        taken = set(m.types())
        for i in m.inputs:
            if i.name not in found:
                inputs.append(i)
                continue
            path, ct = found[i.name]
            if tuple(int(s) for s in i.type.shape) != ct.shape:
                raise PassError(self.name, f"{i.name} is {list(i.type.shape)} but the compressed {path} is "
                                f"{list(ct.shape)}")
            kind = "buffer" if i.kind == "const" else i.kind
            new = []
            for suffix, t in arrays(ct, self._dict).items():
                d = code_dtype(ct.bits) if suffix == "codes" else _dtype_of(t)
                name = f"{i.name}_{suffix}"
                if name in taken:
                    raise PassError(self.name, f"{name!r} already exists; rename the model's tensor")
                taken.add(name)
                new.append(Input(name, TensorType(d, tuple(t.shape)), kind))
            inputs += new
            params = ct.shape[0] * ct.shape[1] * ct.shape[2]
            nbytes = sum(ct.nbytes().values())
            out = f"{i.name}_dq"
            taken.add(out)
            decodes.append(Opaque(((out, i.type),), "einfuse.compress.ir:decode_experts",
                                  tuple(TensorRef(x.name) for x in new if not x.name.endswith("_checksums")),
                                  (("shape", list(ct.shape)), ("ncodes", ct.ncodes), ("bits", ct.bits),
                                   ("row_codes", ct.row_codes),
                                   ("dtype", str(i.type.dtype.storage).removeprefix("torch.")),
                                   ("checksums", TensorRef(f"{i.name}_checksums")),
                                   ("stored_bytes", nbytes), ("dense_bytes", params * i.type.dtype.bits // 8),
                                   ("bits_per_param", round(8 * nbytes / params, 4)))))
        mapping = {old: f"{old}_dq" for old in found}
        body = tuple(decodes) + tuple(op.rename_reads(mapping) for op in m.body)
        outputs = tuple(mapping.get(o, o) for o in m.outputs)
        return m.replace(inputs=tuple(inputs), body=body, outputs=outputs)


def _dtype_of(t: torch.Tensor) -> dt.DType:
    return {torch.uint8: dt.u8, torch.int16: dt.i16, torch.int32: dt.i32, torch.int64: dt.i64,
            torch.float16: dt.f16, torch.float32: dt.f32}[t.dtype]


def compress_experts(bits: str = "ternary", calibration=None, model: torch.nn.Module | None = None,
                     method: str = "gptq", compressed: CompressedModel | None = None, **options) -> CompressExperts:
    """Quantize and encode `model`'s experts (unless `compressed` is given), register the stored arrays as
    buffers, and return the pass that rewrites the IR to read them."""
    if compressed is None:
        if model is None:
            raise ValueError("einfuse compress_experts: pass model= (the torch model whose experts to compress) "
                             "or compressed= (a CompressedModel)")
        compressed = compress_moe(model, calibration, method=method if calibration else "rtn", **options)
    if model is not None:
        register_buffers(model, compressed)
    return CompressExperts(compressed, bits)
