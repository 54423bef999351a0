"""Compressed expert weights: the stored layout, its byte accounting, checksums and safetensors checkpoints.

One `CompressedTensor` holds a stack of expert matrices W [E, N, K] (y = x @ W[e].T):

  codes     uint8   packed `bits`-bit dictionary codewords, expert after expert, group after group
  bases     int32   [E, G]  index of the first codeword of each group of GROUP rows (G = ceil(N / GROUP))
  scales    uint8   one packed 12-bit code per row (expert-major): the 6-bit log codes of w_min (low bits)
                    and w_max (einfuse.compress.ternary.scale_codes)
  sbase     f32     [E]     each expert's scale base (its largest magnitude)
  checksums int64   [E, 3]  CRC-32 per expert of its codewords, group offsets, scales (+ base)

A group's rows are coded as ONE stream (their symbols back to back, row after row), so a codeword's run may
cross a row boundary and no row pays for a half-used last codeword or a per-row offset; a decoder finds row
r of a group by walking the group's codewords (the fused kernel carries the codeword and position from row
to row). `row_codes` is the most codewords any one row touches (the kernel's loop bound). Side information
per row: 12 bits of scales + 32 bits of offset per 16 rows = 14 bits (v1 stored 42: two fp16 scales, an
8-bit codeword count and the offset).

The `Dictionary` is shared by every tensor of a model and stored as the three integers it is built from.
A checkpoint is a folder: `experts.safetensors` (every array; never pickle) and `manifest.json` (format,
tensor shapes, codeword width, the dictionary's weights and CRC, bytes per part, the compression report).
`load()` rebuilds the dictionary, checks its CRC and every tensor's checksums before anything is decoded,
and refuses a damaged file naming the tensor, the expert and the part.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass

import torch

from .codec import Dictionary, Encoded, build_dictionary, decode, encode, pack, unpack
from .ternary import dequantize, scale_codes, scale_values

GROUP = 16  # rows coded as one stream; one offset each
SCALE_BITS = 12  # per row: two 6-bit log codes
FORMAT = "einfuse-ternary-dict/2"


class CorruptCheckpoint(ValueError):
    """A compressed checkpoint whose bytes do not match their checksums."""


def _crc(t: torch.Tensor, start: int = 0) -> int:
    return zlib.crc32(t.contiguous().view(torch.uint8).numpy().tobytes(), start) if t.numel() else start


def group_streams(symbols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """symbols [E, N, K] -> (streams [E * G, GROUP * K], lengths [E * G]): each group's rows back to back,
    the last group of a matrix padded (its length counts only its rows)."""
    E, N, K = symbols.shape
    G = -(-N // GROUP)
    padded = torch.zeros(E, G * GROUP, K, dtype=symbols.dtype)
    padded[:, :N] = symbols
    rows_in = (N - torch.arange(G) * GROUP).clamp(max=GROUP)
    return padded.view(E * G, GROUP * K), (rows_in * K).repeat(E)


def _row_codes(enc: Encoded, d: Dictionary, K: int) -> int:
    """The most codewords one row touches (a codeword crossing into a row counts for it too)."""
    if enc.codes.numel() == 0 or K == 0:
        return 0
    lens = d.lengths[enc.codes.long()]
    counts = enc.counts.long()
    stream = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    total = torch.zeros(counts.numel(), dtype=torch.long).index_add_(0, stream, lens)
    pos = torch.cumsum(lens, 0) - lens - (torch.cumsum(total, 0) - total)[stream]  # start within its stream
    rows = GROUP + 1
    first, last = pos // K, (pos + lens - 1) // K
    key = stream * rows
    touch = torch.zeros(enc.counts.numel() * rows + 1, dtype=torch.long)
    touch.index_add_(0, key + first.clamp(max=rows - 1), torch.ones_like(first))
    touch.index_add_(0, key + (last + 1).clamp(max=rows - 1), -torch.ones_like(last))
    per_row = torch.cumsum(touch[:-1].view(-1, rows), 1)
    return int(per_row.max())


@dataclass
class CompressedTensor:
    shape: tuple[int, int, int]  # (experts, rows, cols)
    bits: int
    ncodes: int
    row_codes: int
    codes: torch.Tensor
    bases: torch.Tensor
    scales: torch.Tensor
    sbase: torch.Tensor
    checksums: torch.Tensor

    # ---- construction
    @classmethod
    def encode(cls, symbols: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, d: Dictionary) -> CompressedTensor:
        """Code symbols [E, N, K] (or [N, K]) with the rows' low/high values [E, N] (rounded to the log grid)."""
        if symbols.dim() == 2:
            symbols, lo, hi = symbols[None], lo[None], hi[None]
        E, N, K = symbols.shape
        streams, lengths = group_streams(symbols)
        enc = encode(streams, d, lengths)
        per_group = enc.counts.long()
        bases = (torch.cumsum(per_group, 0) - per_group).view(E, -1).to(torch.int32)
        q_lo, q_hi, base = scale_codes(lo.clamp(max=0), hi.clamp(min=0))
        ct = cls((E, N, K), d.bits, enc.codes.numel(), _row_codes(enc, d, K), pack(enc.codes, d.bits), bases,
                 pack((q_lo | (q_hi << 6)).reshape(-1), SCALE_BITS), base.reshape(E).float(),
                 torch.zeros(E, 3, dtype=torch.int64))
        ct.checksums = ct.compute_checksums()
        return ct

    # ---- views
    @property
    def groups(self) -> int:
        return int(self.bases.shape[1])

    def expert_code_range(self, e: int) -> tuple[int, int]:
        start = int(self.bases[e, 0]) if self.groups else 0
        stop = int(self.bases[e + 1, 0]) if e + 1 < self.shape[0] and self.groups else self.ncodes
        return start, stop

    def scale_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_min, w_max) float32 [E, N] of every row."""
        E, N, _ = self.shape
        q = unpack(self.scales, SCALE_BITS, E * N).long().view(E, N)
        return -scale_values(q & 63, self.sbase), scale_values(q >> 6, self.sbase)

    def compute_checksums(self) -> torch.Tensor:
        E, N, _ = self.shape
        out = torch.zeros(E, 3, dtype=torch.int64)
        allcodes = unpack(self.codes, self.bits, self.ncodes)
        q = unpack(self.scales, SCALE_BITS, E * N).view(E, N)
        for e in range(E):
            a, b = self.expert_code_range(e)
            out[e, 0] = _crc(allcodes[a:b])
            out[e, 1] = _crc(self.bases[e], self.row_codes)
            out[e, 2] = _crc(q[e], _crc(self.sbase[e:e + 1]))
        return out

    def verify(self, name: str = "tensor") -> None:
        """Raise CorruptCheckpoint naming the expert and part whose checksum fails."""
        E, N, _ = self.shape
        need = {"code stream": (self.codes, (self.ncodes * self.bits + 7) // 8 + 3),
                "row scales": (self.scales, (E * N * SCALE_BITS + 7) // 8 + 3)}
        for part, (t, n) in need.items():
            if t.numel() < n:
                raise CorruptCheckpoint(f"einfuse.compress: {name}: the {part} is truncated ({t.numel()} bytes, "
                                        f"{n} needed); refusing to decode it — recompress the model")
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
        flat = self.bases.reshape(-1).long()
        if flat.numel() and (int(flat[0]) != 0 or bool((flat[1:] < flat[:-1]).any()) or int(flat[-1]) > self.ncodes):
            raise CorruptCheckpoint(f"einfuse.compress: {name}: group offsets are not increasing within the "
                                    f"{self.ncodes} codewords; refusing to decode it")

    def group_counts(self) -> torch.Tensor:
        """Codewords of every group [E * G] (from the offsets)."""
        flat = self.bases.reshape(-1).long()
        return torch.diff(flat, append=torch.tensor([self.ncodes]))

    def symbols(self, d: Dictionary, experts: list | None = None) -> torch.Tensor:
        """Symbols [E, N, K] of every expert, or [A, N, K] of the expert ids `experts` (in that order): only
        their codewords are unpacked from the stream."""
        E, N, K = self.shape
        G = self.groups
        counts = self.group_counts().view(E, G)
        rows_in = (N - torch.arange(G) * GROUP).clamp(max=GROUP)
        ids = list(range(E)) if experts is None else [int(e) for e in experts]
        if experts is None:
            codes = unpack(self.codes, self.bits, self.ncodes)
        else:
            ranges = [self.expert_code_range(e) for e in ids]
            codes = torch.cat([unpack(self.codes, self.bits, b - a, start=a) for a, b in ranges]) if ids else \
                torch.zeros(0, dtype=torch.int32)
        sel = counts.index_select(0, torch.tensor(ids, dtype=torch.long)).reshape(-1)
        flat = decode(Encoded(codes, sel.to(torch.int32)), d, (rows_in * K).repeat(len(ids)))
        return flat.view(len(ids), N, K)

    def dequantize(self, d: Dictionary) -> torch.Tensor:
        """Dense float32 W [E, N, K] (the reference the fused kernel is checked against)."""
        lo, hi = self.scale_values()
        return dequantize(self.symbols(d), lo, hi)

    def dequantize_experts(self, d: Dictionary, experts) -> torch.Tensor:
        """Dense float32 W [A, N, K] of the experts `experts` (ids, any order) only: their codewords
        unpacked from the stream and decoded, the other experts' bytes not read."""
        ids = [int(e) for e in torch.as_tensor(experts).reshape(-1).tolist()]
        _, N, K = self.shape
        if not ids:
            return torch.zeros(0, N, K)
        lo, hi = self.scale_values()
        sel = torch.tensor(ids, dtype=torch.long)
        return dequantize(self.symbols(d, ids), lo.index_select(0, sel), hi.index_select(0, sel))

    # ---- accounting
    def nbytes(self) -> dict[str, int]:
        E, N, _ = self.shape
        return {"codes": (self.ncodes * self.bits + 7) // 8, "offsets": self.bases.numel() * 4,
                "scales": (E * N * SCALE_BITS + 7) // 8 + E * 4, "checksums": self.checksums.numel() * 8}

    def expert_nbytes(self, e: int) -> int:
        """Bytes a kernel reads for expert e: its codewords, offsets and scales."""
        a, b = self.expert_code_range(e)
        per = self.nbytes()
        E = self.shape[0]
        return (b - a) * self.bits // 8 + (per["offsets"] + per["scales"]) // E

    def arrays(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "bases": self.bases, "scales": self.scales, "sbase": self.sbase,
                "checksums": self.checksums}

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{k}": v for k, v in self.arrays().items()}

    def meta(self) -> dict:
        return {"shape": list(self.shape), "bits": self.bits, "ncodes": self.ncodes, "row_codes": self.row_codes,
                "bytes": self.nbytes()}

    @classmethod
    def from_tensors(cls, meta: dict, t: dict[str, torch.Tensor], prefix: str) -> CompressedTensor:
        return cls(tuple(meta["shape"]), meta["bits"], meta["ncodes"], meta["row_codes"], t[f"{prefix}.codes"],
                   t[f"{prefix}.bases"], t[f"{prefix}.scales"], t[f"{prefix}.sbase"], t[f"{prefix}.checksums"])


def verify_once(seen: set, name: str, ct: CompressedTensor, checksums) -> None:
    """`ct.verify` the first time its arrays are seen (and again after an in-place write to one of them:
    keyed by their addresses and versions, recorded in `seen`); arrays on a GPU are checked on a CPU copy.
    No `checksums`: nothing to check."""
    if checksums is None:
        return
    arrays = (ct.codes, ct.bases, ct.scales, ct.sbase, checksums)
    key = tuple((t.data_ptr(), t._version) for t in arrays)
    if key in seen:
        return
    CompressedTensor(ct.shape, ct.bits, ct.ncodes, ct.row_codes, *(t.cpu() for t in arrays)).verify(
        f"compressed expert weight ({name})")
    seen.add(key)


def dictionary_checksum(d: Dictionary) -> int:
    return _crc(d.entries)


def save(path: str, tensors: dict[str, CompressedTensor], d: Dictionary, report: dict | None = None) -> None:
    """Write `experts.safetensors` + `manifest.json` under the folder `path`."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    arrays = {}
    for name, ct in tensors.items():
        arrays.update({k: v.contiguous() for k, v in ct.tensors(name).items()})
    save_file(arrays, os.path.join(path, "experts.safetensors"))
    manifest = {"format": FORMAT, "group_rows": GROUP,
                "dictionary": {"bits": d.bits, "weights": list(d.weights), "entries": d.size,
                               "decoder_bytes": d.nbytes, "crc32": dictionary_checksum(d)},
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
    try:
        d = build_dictionary(tuple(int(w) for w in dm["weights"]), int(dm["bits"]))
    except (ValueError, TypeError, KeyError) as err:
        raise CorruptCheckpoint(f"einfuse.compress: {path}: the dictionary's parameters are invalid ({err}); "
                                "recompress the model or restore the checkpoint") from err
    if dictionary_checksum(d) != dm["crc32"]:
        raise CorruptCheckpoint(f"einfuse.compress: {path}: the dictionary fails its checksum; refusing to "
                                "decode any expert with it — recompress the model or restore the checkpoint")
    tensors = {}
    for name, meta in manifest["tensors"].items():
        ct = CompressedTensor.from_tensors(meta, arrays, name)
        ct.verify(name)
        tensors[name] = ct
    return tensors, d, manifest
