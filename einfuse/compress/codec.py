"""The dictionary code for ternary weight streams: fixed-length codewords, each a run of ternary symbols.

QMoE (2023) codes a ternary stream with 2^16 fixed 16-bit codewords, each standing for a run of up to 14
ternary pairs, the dictionary chosen from symbol statistics. That is a variable-to-fixed code; the optimal
one for a memoryless source is Tunstall's: grow a parse tree by repeatedly splitting its most probable leaf
into the three one-symbol extensions; the leaves are the dictionary. `build_dictionary(probs, bits)` does
that with runs of up to `MAX_LEN` = 64 symbols holding at most `NZ_MAX` = 7 nonzeros (a leaf at either cap
is not split).

The dictionary is a deterministic function of its width and the symbol probabilities quantized to integers
summing to 2^16 (`Dictionary.weights`): leaf weights are exact integer products, ties broken by creation
order. A checkpoint stores those three integers, not the 2^bits entries, and rebuilds the same dictionary on
load (its CRC is checked) — the dictionary costs 48 bits however wide it is, so einfuse can use QMoE's 2^16
entries where they pay (`choose_bits`).

Symbols: 0 = zero, 1 = the row's high value (w_max), 2 = the row's low value (w_min); as signed values
{0, +1, -1}. An entry is one int64 (what the fused kernel reads):

    bits 0..6   L, the run's length (1..64)          bits 7..9  k, its nonzeros (0..7)
    bits 10+7i..15+7i  the i-th nonzero's offset      bit 16+7i  1 if it is -1 (w_min)     (i < k)

Streams are coded independently from the tree's root (einfuse.compress.format codes each group of 16 rows as
one stream, so runs cross row boundaries); a stream's last run is completed with zeros (the most probable
symbol) to the next leaf, and the decoder stops at the stream's length. Encoding is vectorized over
streams: all of them walk the tree one symbol per step in lockstep.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

MAX_LEN = 64  # symbols per run: offsets are 6 bits
NZ_MAX = 7  # nonzeros per run: 10 + 7 * 7 = 59 bits of an int64 entry
PROB_BITS = 16  # the probabilities a dictionary is built from: integers summing to 2^16
ZERO, HIGH, LOW = 0, 1, 2


def quantize_probs(probs) -> tuple[int, int, int]:
    """(zero, high, low) frequencies as integers >= 1 summing to 2^PROB_BITS (a symbol that never occurred
    still gets weight 1: the tree must parse every stream)."""
    total = 1 << PROB_BITS
    p = [max(float(q), 0.0) for q in probs]
    s = sum(p) or 1.0
    w = [max(1, round(q / s * total)) for q in p]
    w[w.index(max(w))] += total - sum(w)  # the rounding remainder goes to the most probable symbol
    return tuple(w)


@dataclass
class Dictionary:
    bits: int
    weights: tuple[int, int, int]  # quantized (zero, high, low) probabilities it was built from
    entries: torch.Tensor  # [M] int64 packed entries (module docstring)
    child: torch.Tensor | None = None  # [nodes, 3] int32 parse tree (encoder only; not stored)
    leaf: torch.Tensor | None = None  # [nodes] int32 codeword of a leaf node, -1 for internal nodes

    @property
    def size(self) -> int:
        return int(self.entries.numel())

    @property
    def nbytes(self) -> int:
        """Bytes the decoder holds: one int64 per entry (the checkpoint stores only `weights`)."""
        return self.size * 8

    @property
    def stored_nbytes(self) -> int:
        """Bytes a checkpoint stores for it: the three 16-bit weights and the width."""
        return 3 * PROB_BITS // 8 + 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.entries & 127

    def symbols(self) -> torch.Tensor:
        """[M, MAX_LEN] uint8 symbol indices (0 zero, 1 high, 2 low) of every entry; 0 past its length."""
        e = self.entries
        k = (e >> 7) & 7
        out = torch.zeros(self.size, MAX_LEN, dtype=torch.uint8)
        rows = torch.arange(self.size)
        for i in range(NZ_MAX):
            has = i < k
            off = (e >> (10 + 7 * i)) & 63
            neg = (e >> (16 + 7 * i)) & 1
            out[rows[has], off[has]] = (1 + neg[has]).to(torch.uint8)
        return out

    def expected_length(self, probs) -> float:
        """Mean symbols per codeword on a memoryless source with `probs` (zero, high, low)."""
        p = torch.as_tensor(probs, dtype=torch.float64)
        syms = self.symbols()
        valid = torch.arange(MAX_LEN)[None, :] < self.lengths[:, None]
        logp = torch.where(valid, torch.log(p)[syms.long()], torch.zeros((), dtype=torch.float64))
        prob = logp.sum(1).exp()
        return float((prob * self.lengths.double()).sum() / prob.sum())


def entropy(probs) -> float:
    """Order-0 entropy in bits per symbol."""
    return -sum(p * math.log2(p) for p in probs if p > 0)


def symbol_probs(symbols: torch.Tensor) -> tuple[float, float, float]:
    """Frequencies of (zero, high, low) in a stream of symbol indices."""
    counts = torch.bincount(symbols.reshape(-1).long(), minlength=3)[:3].double()
    total = counts.sum().clamp(min=1)
    return tuple(float(c) for c in counts / total)


def build_dictionary(probs, bits: int, max_len: int = MAX_LEN) -> Dictionary:
    """Tunstall dictionary of at most 2^bits entries for a memoryless ternary source with `probs` (or the
    integer `weights` of a stored dictionary: the same integers give the same dictionary, bit for bit).
    `max_len` < 64 caps the runs shorter (QMoE's scheme: bits=16, max_len=28; checkpoints use 64)."""
    if not 2 <= bits <= 16:
        raise ValueError(f"einfuse.compress.codec: codeword width {bits} bits is outside 2..16")
    if not 1 <= max_len <= MAX_LEN:
        raise ValueError(f"einfuse.compress.codec: max_len {max_len} is outside 1..{MAX_LEN}")
    w = tuple(int(v) for v in probs) if all(isinstance(v, int) for v in probs) else quantize_probs(probs)
    if len(w) != 3 or min(w) < 1:
        raise ValueError(f"einfuse.compress.codec: dictionary weights {w} must be three integers >= 1")
    capacity = 2 ** bits
    # nodes: depth, nonzero count, entry fields so far (offset/sign pairs), children; node 0 is the root
    depth, nnz, fields = [0], [0], [0]
    child = [[-1, -1, -1]]
    # (-weight, creation order, node) of splittable leaves; a node's weight is the product of its symbols'
    # integer weights scaled to depth MAX_LEN (x 2^(16 (MAX_LEN - depth))), so every key has one denominator
    heap: list[tuple[int, int, int]] = [(-(1 << (PROB_BITS * MAX_LEN)), 0, 0)]
    leaves = 1
    while heap and leaves + 2 <= capacity:
        neg_w, _, node = heapq.heappop(heap)
        d, k, f = depth[node], nnz[node], fields[node]
        for sym in (ZERO, HIGH, LOW):
            nid = len(depth)
            nk = k + (sym != ZERO)
            depth.append(d + 1)
            nnz.append(nk)
            fields.append(f if sym == ZERO else f | ((d | ((sym == LOW) << 6)) << (10 + 7 * k)))
            child.append([-1, -1, -1])
            child[node][sym] = nid
            if d + 1 < max_len and nk < NZ_MAX:
                heapq.heappush(heap, ((neg_w >> PROB_BITS) * w[sym], nid, nid))
        leaves += 2
    child_t = torch.tensor(child, dtype=torch.int32)
    is_leaf = (child_t < 0).all(1)
    is_leaf[0] = len(depth) == 1
    leaf_nodes = torch.nonzero(is_leaf).flatten()
    leaf = torch.full((len(depth),), -1, dtype=torch.int32)
    leaf[leaf_nodes] = torch.arange(len(leaf_nodes), dtype=torch.int32)
    ids = leaf_nodes.tolist()
    entries = torch.tensor([fields[i] | (nnz[i] << 7) | depth[i] for i in ids], dtype=torch.int64)
    return Dictionary(bits, w, entries, child_t, leaf)


@dataclass
class Encoded:
    codes: torch.Tensor  # [n] int32 codewords, streams back to back
    counts: torch.Tensor  # [streams] int32 codewords per stream


def encode(streams: torch.Tensor, d: Dictionary, lengths: torch.Tensor | None = None) -> Encoded:
    """Code every stream of `streams` [S, n] (uint8 0/1/2) independently; stream s is its first
    `lengths[s]` symbols (default: all n)."""
    if d.child is None:
        raise ValueError("einfuse.compress.codec: this dictionary has no parse tree; build_dictionary() makes "
                         "one that encodes")
    streams = (streams if streams.dim() == 2 else streams.reshape(-1, streams.shape[-1])).long()
    S, n = streams.shape
    lengths = torch.full((S,), n, dtype=torch.long) if lengths is None else lengths.long()
    child, leaf = d.child.long(), d.leaf.long()
    node = torch.zeros(S, dtype=torch.long)
    out = torch.zeros(S, n + 1, dtype=torch.int32)
    counts = torch.zeros(S, dtype=torch.long)
    ar = torch.arange(S)

    def emit(done, code):
        r = ar[done]
        out[r, counts[r]] = code[done].to(torch.int32)
        counts[r] += 1

    for c in range(n):
        active = c < lengths
        nxt = child[node, streams[:, c]]
        code = leaf[nxt]
        done = active & (code >= 0)
        if bool(done.any()):
            emit(done, code)
        node = torch.where(done, torch.zeros_like(node), torch.where(active, nxt, node))
    for _ in range(MAX_LEN):  # finish each stream's last run with zeros
        pending = node != 0
        if not bool(pending.any()):
            break
        nxt = child[node, ZERO]
        code = leaf[nxt]
        done = pending & (code >= 0)
        emit(done, code)
        node = torch.where(done, torch.zeros_like(node), torch.where(pending, nxt, node))
    mask = torch.arange(n + 1)[None, :] < counts[:, None]
    return Encoded(out[mask], counts.to(torch.int32))


def decode(enc: Encoded, d: Dictionary, lengths: torch.Tensor) -> torch.Tensor:
    """The symbols of every stream back to back (uint8, sum(lengths)) from its codewords; raises if a stream
    decodes to fewer symbols than its length."""
    codes = enc.codes.long()
    counts = enc.counts.long()
    lengths = torch.as_tensor(lengths).long()
    S = counts.numel()
    if codes.numel() != int(counts.sum()):
        raise ValueError(f"einfuse.compress.codec: {codes.numel()} codewords but the stream counts sum to "
                         f"{int(counts.sum())}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= d.size):
        raise ValueError("einfuse.compress.codec: a codeword is outside the dictionary")
    lens = d.lengths[codes]
    valid = torch.arange(MAX_LEN)[None, :] < lens[:, None]
    flat = d.symbols()[codes][valid]  # every decoded symbol, stream after stream (each padded to a leaf)
    per_stream = torch.zeros(S, dtype=torch.long).index_add_(0, torch.repeat_interleave(torch.arange(S), counts), lens)
    short = per_stream < lengths
    if bool(short.any()):
        s = int(short.nonzero()[0])
        raise ValueError(f"einfuse.compress.codec: stream {s} decodes to {int(per_stream[s])} symbols, fewer "
                         f"than its {int(lengths[s])}")
    starts = torch.cumsum(per_stream, 0) - per_stream
    keep = torch.repeat_interleave(starts - torch.cumsum(lengths, 0) + lengths, lengths) + torch.arange(int(lengths.sum()))
    return flat[keep].to(torch.uint8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`bits`-bit codewords (<= 16), little-endian bit order, into bytes (+3 bytes of padding for 24-bit
    reads)."""
    n = codes.numel()
    nbytes = (n * bits + 7) // 8 + 3
    bitpos = torch.arange(n, dtype=torch.int64) * bits
    out = torch.zeros(nbytes, dtype=torch.int64)
    c = codes.reshape(-1).long()
    for k in range(3):  # a codeword of <= 16 bits touches at most 3 bytes
        byte = bitpos // 8 + k
        shift = 8 * k - bitpos % 8
        part = torch.where(shift >= 0, c >> shift.clamp(min=0), c << (-shift).clamp(min=0)) & 0xFF
        out.index_add_(0, byte, part)
    return out.to(torch.uint8)


def unpack(data: torch.Tensor, bits: int, n: int, start: int = 0) -> torch.Tensor:
    """Inverse of `pack`: `n` codewords from the `start`-th on, as int32 (the same 24-bit window read the
    kernel does)."""
    bitpos = torch.arange(start, start + n, dtype=torch.int64, device=data.device) * bits
    b = bitpos // 8
    d = data.long()
    window = d[b] | (d[b + 1] << 8) | (d[b + 2] << 16)
    return ((window >> (bitpos % 8)) & ((1 << bits) - 1)).to(torch.int32)


WIDTH_TOLERANCE = 0.005  # a narrower width within 0.5% of the smallest total wins (a smaller runtime table)


def choose_bits(streams: torch.Tensor, widths=range(8, 17), sample: int = 256, lengths: torch.Tensor | None = None,
                total_symbols: int | None = None, probs=None) -> tuple[int, dict[int, dict]]:
    """The codeword width for `streams` [S, n] (the groups einfuse.compress.format codes): each width's
    dictionary (built from `probs`, default: the streams' frequencies) codes a sample of the streams; the
    stored cost is the codes (the dictionary is 7 bytes).
    Among the widths within WIDTH_TOLERANCE of the smallest total the narrowest wins (its decoder table,
    8 bytes x 2^bits, is smaller). Returns (width, {width: {"bits_per_symbol", "dictionary_bytes",
    "total_bits"}}), totals scaled to `total_symbols` (default: the sampled streams' whole length)."""
    streams = streams.reshape(-1, streams.shape[-1])
    lengths = torch.full((streams.shape[0],), streams.shape[1]) if lengths is None else lengths
    valid = torch.arange(streams.shape[1])[None, :] < lengths[:, None]
    probs = probs if probs is not None else symbol_probs(streams[valid])
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(streams.shape[0], generator=g)[:sample]
    total = total_symbols or int(lengths.sum())
    table = {}
    for w in sorted(widths):
        d = build_dictionary(probs, w)
        enc = encode(streams[pick], d, lengths[pick])
        bps = enc.codes.numel() * w / max(int(lengths[pick].sum()), 1)
        table[w] = {"bits_per_symbol": bps, "dictionary_bytes": d.nbytes, "total_bits": bps * total + 8 * d.stored_nbytes}
    least = min(v["total_bits"] for v in table.values())
    best = min(w for w in table if table[w]["total_bits"] <= least * (1 + WIDTH_TOLERANCE))
    return best, table
