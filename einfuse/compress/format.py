"""Compressed expert weights: the stored layout, its byte accounting, checksums and safetensors checkpoints.

One `CompressedTensor` holds a stack of expert matrices W [E, rows, cols] (y = x @ W[e].T):

  codes     uint8   the dictionary codewords of every row, expert-major, `bits` each, packed little-endian
  counts    uint8|int16 [E, groups*16]  codewords per row (rows padded to a multiple of GROUP with 0)
  bases     int32   [E, groups]          index of the first codeword of each group of GROUP rows
  scales    f16     [E, rows, 2]         each row's (w_min, w_max)
  checksums int64   [E, 3]               CRC-32 per expert of its codewords, row offsets, scales

A row's start = bases[e, r // GROUP] + the counts of the rows before it in its group (the per-row offset,
stored in 8 or 16 bits instead of 32). The `Dictionary` is shared by every tensor of a model and stored once.

A checkpoint is a folder: `experts.safetensors` (every array; never pickle) and `manifest.json` (format,
tensor shapes, codeword width, dictionary checksum, bytes per part, the compression report).
`load()` verifies every checksum before anything is decoded and refuses a damaged file naming the tensor,
the expert and the part.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass

import torch

from .codec import Dictionary, Encoded, decode, encode, pack, unpack
from .ternary import dequantize

GROUP = 16  # rows per offset base; also the kernel's row tile
FORMAT = "einfuse-ternary-dict/1"


class CorruptCheckpoint(ValueError):
    """A compressed checkpoint whose bytes do not match their checksums."""


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().view(torch.uint8).numpy().tobytes()) if t.numel() else 0


@dataclass
class CompressedTensor:
    shape: tuple[int, int, int]  # (experts, rows, cols)
    bits: int
    ncodes: int
    codes: torch.Tensor
    counts: torch.Tensor
    bases: torch.Tensor
    scales: torch.Tensor
    checksums: torch.Tensor

    # ---- construction
    @classmethod
    def encode(cls, symbols: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, d: Dictionary) -> CompressedTensor:
        if symbols.dim() == 2:
            symbols, lo, hi = symbols[None], lo[None], hi[None]
        E, rows, cols = symbols.shape
        enc = encode(symbols.reshape(E * rows, cols), d)
        groups = -(-rows // GROUP)
        counts = torch.zeros(E, groups * GROUP, dtype=torch.int64)
        counts[:, :rows] = enc.counts.view(E, rows).long()
        per_group = counts.view(E, groups, GROUP).sum(-1).reshape(-1)
        bases = (torch.cumsum(per_group, 0) - per_group).view(E, groups).to(torch.int32)
        cdtype = torch.uint8 if (int(counts.max()) if counts.numel() else 0) < 256 else torch.int16
        if (int(counts.max()) if counts.numel() else 0) >= 2 ** 15:
            raise ValueError("einfuse.compress: a row needs more than 32767 codewords")
        scales = torch.stack([lo, hi], -1).to(torch.float16)
        ct = cls((E, rows, cols), d.bits, enc.codes.numel(), pack(enc.codes, d.bits), counts.to(cdtype),
                 bases, scales, torch.zeros(E, 3, dtype=torch.int64))
        ct.checksums = ct.compute_checksums()
        return ct

    # ---- views
    def expert_code_range(self, e: int) -> tuple[int, int]:
        start = int(self.bases[e, 0]) if self.bases.shape[1] else 0
        stop = int(self.bases[e + 1, 0]) if e + 1 < self.shape[0] else self.ncodes
        return start, stop

    def compute_checksums(self) -> torch.Tensor:
        E = self.shape[0]
        out = torch.zeros(E, 3, dtype=torch.int64)
        allcodes = unpack(self.codes, self.bits, self.ncodes)
        for e in range(E):
            a, b = self.expert_code_range(e)
            out[e, 0] = _crc(allcodes[a:b])
            out[e, 1] = zlib.crc32(self.bases[e].numpy().tobytes(), _crc(self.counts[e]))
            out[e, 2] = _crc(self.scales[e])
        return out

    def verify(self, name: str = "tensor", d: Dictionary | None = None) -> None:
        """Raise CorruptCheckpoint naming the expert and part whose checksum fails."""
        if self.codes.numel() < (self.ncodes * self.bits + 7) // 8 + 3:
            raise CorruptCheckpoint(f"einfuse.compress: {name}: the code stream is truncated "
                                    f"({self.codes.numel()} bytes for {self.ncodes} codewords); refusing to "
                                    "decode it — recompress the model")
        got = self.compute_checksums()
        parts = ("code stream", "row offsets", "row scales")
        bad = (got != self.checksums).nonzero().tolist()
        if bad:
            e, p = bad[0]
            raise CorruptCheckpoint(
                f"einfuse.compress: {name}: expert {e} fails its {parts[p]} checksum "
                f"(stored {int(self.checksums[e, p]):#010x}, computed {int(got[e, p]):#010x}; "
                f"{len(bad)} damaged part(s) in all); refusing to decode damaged weights — recompress the model "
                "or restore the checkpoint")
        if int(self.counts.long().sum()) != self.ncodes:
            raise CorruptCheckpoint(f"einfuse.compress: {name}: row counts sum to {int(self.counts.long().sum())}"
                                    f", the stream holds {self.ncodes} codewords; refusing to decode it")

    @property
    def row_counts(self) -> torch.Tensor:
        return self.counts[:, :self.shape[1]].to(torch.int64)

    def symbols(self, d: Dictionary, experts: list | None = None) -> torch.Tensor:
        """Symbols [E, rows, cols] of every expert, or [A, rows, cols] of the expert ids `experts` (in that
        order): only their codewords are unpacked from the stream."""
        E, rows, cols = self.shape
        counts = self.row_counts
        if experts is None:
            codes = unpack(self.codes, self.bits, self.ncodes)
        else:
            ranges = [self.expert_code_range(e) for e in experts]
            codes = torch.cat([unpack(self.codes, self.bits, b - a, start=a) for a, b in ranges])
            counts = counts.index_select(0, torch.tensor(experts, dtype=torch.long))
            E = len(experts)
        return decode(Encoded(codes, counts.reshape(-1).to(torch.int32)), d, cols).view(E, rows, cols)

    def dequantize(self, d: Dictionary) -> torch.Tensor:
        """Dense float32 W [E, rows, cols] (the reference the fused kernel is checked against)."""
        s = self.scales.float()
        return dequantize(self.symbols(d), s[..., 0], s[..., 1])

    def dequantize_experts(self, d: Dictionary, experts) -> torch.Tensor:
        """Dense float32 W [A, rows, cols] of the experts `experts` (ids, any order) only: their codewords
        unpacked from the stream and decoded, the other experts' bytes not read."""
        ids = [int(e) for e in torch.as_tensor(experts).reshape(-1).tolist()]
        _, rows, cols = self.shape
        if not ids:
            return torch.zeros(0, rows, cols)
        s = self.scales.index_select(0, torch.tensor(ids, dtype=torch.long)).float()
        return dequantize(self.symbols(d, ids), s[..., 0], s[..., 1])

    # ---- accounting
    def nbytes(self) -> dict[str, int]:
        return {"codes": self.codes.numel(), "offsets": self.counts.numel() * self.counts.element_size()
                + self.bases.numel() * 4, "scales": self.scales.numel() * 2, "checksums": self.checksums.numel() * 8}

    def expert_nbytes(self, e: int) -> int:
        """Bytes a kernel reads for expert e: its codewords, offsets and scales."""
        a, b = self.expert_code_range(e)
        per = self.nbytes()
        E = self.shape[0]
        return (b - a) * self.bits // 8 + (per["offsets"] + per["scales"]) // E

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.codes": self.codes, f"{prefix}.counts": self.counts, f"{prefix}.bases": self.bases,
                f"{prefix}.scales": self.scales, f"{prefix}.checksums": self.checksums}

    def meta(self) -> dict:
        return {"shape": list(self.shape), "bits": self.bits, "ncodes": self.ncodes, "bytes": self.nbytes()}

    @classmethod
    def from_tensors(cls, meta: dict, t: dict[str, torch.Tensor], prefix: str) -> CompressedTensor:
        return cls(tuple(meta["shape"]), meta["bits"], meta["ncodes"], t[f"{prefix}.codes"], t[f"{prefix}.counts"],
                   t[f"{prefix}.bases"], t[f"{prefix}.scales"], t[f"{prefix}.checksums"])


def verify_once(seen: set, name: str, ct: CompressedTensor, checksums) -> None:
    """`ct.verify` the first time its arrays are seen (and again after an in-place write to one of them:
    keyed by their addresses and versions, recorded in `seen`); arrays on a GPU are checked on a CPU copy.
    No `checksums`: nothing to check."""
    if checksums is None:
        return
    arrays = (ct.codes, ct.counts, ct.bases, ct.scales, checksums)
    key = tuple((t.data_ptr(), t._version) for t in arrays)
    if key in seen:
        return
    CompressedTensor(ct.shape, ct.bits, ct.ncodes, *(t.cpu() for t in arrays)).verify(f"compressed expert weight ({name})")
    seen.add(key)


def dictionary_checksum(d: Dictionary) -> int:
    return zlib.crc32(d.nz.numpy().tobytes(), zlib.crc32(d.neg.numpy().tobytes(), _crc(d.lengths)))


def save(path: str, tensors: dict[str, CompressedTensor], d: Dictionary, report: dict | None = None) -> None:
    """Write `experts.safetensors` + `manifest.json` under the folder `path`."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    arrays = {f"dictionary.{k}": v.contiguous() for k, v in d.tensors().items()}
    for name, ct in tensors.items():
        arrays.update({k: v.contiguous() for k, v in ct.tensors(name).items()})
    save_file(arrays, os.path.join(path, "experts.safetensors"))
    manifest = {"format": FORMAT, "group_rows": GROUP,
                "dictionary": {"bits": d.bits, "max_len": d.max_len, "entries": d.size, "bytes": d.nbytes,
                               "crc32": dictionary_checksum(d)},
                "tensors": {name: ct.meta() for name, ct in tensors.items()}, "report": report or {}}
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


def load(path: str) -> tuple[dict[str, CompressedTensor], Dictionary, dict]:
    """Read and verify a checkpoint written by `save`; raise CorruptCheckpoint on any damage."""
    from safetensors.torch import load_file
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise CorruptCheckpoint(f"einfuse.compress: {path} is not a {FORMAT} checkpoint "
                                f"(format {manifest.get('format')!r})")
    arrays = load_file(os.path.join(path, "experts.safetensors"))
    dm = manifest["dictionary"]
    d = Dictionary.from_tensors(dm["bits"], dm["max_len"],
                                {k: arrays[f"dictionary.{k}"] for k in ("lengths", "nz", "neg")})
    if dictionary_checksum(d) != dm["crc32"]:
        raise CorruptCheckpoint(f"einfuse.compress: {path}: the dictionary fails its checksum; refusing to "
                                "decode any expert with it — recompress the model or restore the checkpoint")
    tensors = {}
    for name, meta in manifest["tensors"].items():
        ct = CompressedTensor.from_tensors(meta, arrays, name)
        ct.verify(name, d)
        tensors[name] = ct
    return tensors, d, manifest
