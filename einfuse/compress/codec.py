"""The dictionary code for ternary weight streams: fixed-length codewords, each a run of ternary symbols.

QMoE (2023) codes a ternary stream with 2^16 fixed 16-bit codewords, each standing for a run of up to 14
ternary pairs, the dictionary chosen from symbol statistics. That is a variable-to-fixed code; the optimal
one for a memoryless source is Tunstall's: grow a parse tree by repeatedly splitting its most probable leaf
into the three one-symbol extensions; the leaves are the dictionary. `build_dictionary(probs, bits,
max_len)` does exactly that, and with `bits=16, max_len=28` it is QMoE's scheme (runs of up to 14 pairs).

einfuse picks `bits` per model by the total size (codes + the dictionary itself): a 2^16 dictionary is
~590 KB, more than the codes of a small model save — `choose_bits()` measures every width from 6 to 16 on
the stream and keeps the smallest total (the numbers are in docs/PERFORMANCE.md, "Sub-1-bit experts").

Symbols: 0 = zero, 1 = the row's high value (w_max), 2 = the row's low value (w_min); as signed values
{0, +1, -1}. A dictionary entry is `length` (1..max_len) and two bit masks over its positions: `nz` (the
symbol is not zero) and `neg` (the symbol is -1). Rows are coded independently (each row starts at the
root), so a decoder can start at any row; a row's last run is completed with zeros (the most probable
symbol) to the next leaf, and the decoder stops at the row's length.

Everything is vectorized over rows: all rows walk the tree one symbol per step in lockstep, so encoding
costs `cols` tensor steps whatever the number of rows.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

MAX_LEN = 32  # entry masks are int32; the kernel unrolls this many positions per codeword
ZERO, HIGH, LOW = 0, 1, 2


@dataclass
class Dictionary:
    bits: int
    max_len: int
    lengths: torch.Tensor  # [M] uint8
    nz: torch.Tensor  # [M] int32 bit j: symbol j is not zero
    neg: torch.Tensor  # [M] int32 bit j: symbol j is -1 (w_min)
    child: torch.Tensor | None = None  # [nodes, 3] int32 parse tree (encoder only; not stored)
    leaf: torch.Tensor | None = None  # [nodes] int32 codeword of a leaf node, -1 for internal nodes

    @property
    def size(self) -> int:
        return int(self.lengths.numel())

    @property
    def nbytes(self) -> int:
        """Bytes the decoder needs: per entry a length byte and two 32-bit masks."""
        return self.size * (1 + 4 + 4)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"lengths": self.lengths, "nz": self.nz, "neg": self.neg}

    @classmethod
    def from_tensors(cls, bits: int, max_len: int, t: dict[str, torch.Tensor]) -> Dictionary:
        return cls(bits, max_len, t["lengths"], t["nz"], t["neg"])

    def expected_length(self, probs) -> float:
        """Mean symbols per codeword on a memoryless source with `probs` (zero, high, low)."""
        p = torch.as_tensor(probs, dtype=torch.float64)
        syms = self.symbols()  # [M, max_len]
        valid = torch.arange(self.max_len)[None, :] < self.lengths[:, None].long()
        logp = torch.where(valid, torch.log(p)[syms.long()], torch.zeros(()))
        prob = logp.sum(1).exp()
        return float((prob * self.lengths.double()).sum() / prob.sum())

    def symbols(self) -> torch.Tensor:
        """[M, max_len] uint8 symbol indices (0 zero, 1 high, 2 low) of every entry; 0 past its length."""
        j = torch.arange(self.max_len, dtype=torch.int64)
        nz = (self.nz.long()[:, None] >> j) & 1
        neg = (self.neg.long()[:, None] >> j) & 1
        return (nz * (1 + neg)).to(torch.uint8)


def entropy(probs) -> float:
    """Order-0 entropy in bits per symbol."""
    return -sum(p * math.log2(p) for p in probs if p > 0)


def symbol_probs(symbols: torch.Tensor) -> tuple[float, float, float]:
    """Frequencies of (zero, high, low) in a stream of symbol indices."""
    counts = torch.bincount(symbols.reshape(-1).long(), minlength=3)[:3].double()
    total = counts.sum().clamp(min=1)
    return tuple(float(c) for c in counts / total)


def build_dictionary(probs, bits: int, max_len: int = MAX_LEN) -> Dictionary:
    """Tunstall dictionary of at most 2^bits entries for a memoryless ternary source with `probs`."""
    if not 2 <= bits <= 16:
        raise ValueError(f"einfuse.compress.codec: codeword width {bits} bits is outside 2..16")
    if not 1 <= max_len <= MAX_LEN:
        raise ValueError(f"einfuse.compress.codec: max_len {max_len} is outside 1..{MAX_LEN}")
    # a symbol that never occurred still gets a tiny probability: the tree must parse every stream
    p = [max(float(q), 1e-9) for q in probs]
    s = sum(p)
    logp = [math.log(q / s) for q in p]
    capacity = 2 ** bits
    # nodes: (parent, symbol, depth, nz, neg); node 0 is the root
    depth, nzm, negm = [0], [0], [0]
    child = [[-1, -1, -1]]
    heap: list[tuple[float, int]] = []  # (-logprob, node) of expandable leaves
    leaves = 1
    heapq.heappush(heap, (0.0, 0))
    while heap and leaves + 2 <= capacity:
        neg_lp, node = heapq.heappop(heap)
        d = depth[node]
        for sym in (ZERO, HIGH, LOW):
            nid = len(depth)
            depth.append(d + 1)
            nzm.append(nzm[node] | ((sym != ZERO) << d))
            negm.append(negm[node] | ((sym == LOW) << d))
            child.append([-1, -1, -1])
            child[node][sym] = nid
            if d + 1 < max_len:
                heapq.heappush(heap, (neg_lp - logp[sym], nid))
        leaves += 2
    child_t = torch.tensor(child, dtype=torch.int32)
    is_leaf = (child_t < 0).all(1)
    is_leaf[0] = len(depth) == 1
    leaf_nodes = torch.nonzero(is_leaf).flatten()
    leaf = torch.full((len(depth),), -1, dtype=torch.int32)
    leaf[leaf_nodes] = torch.arange(len(leaf_nodes), dtype=torch.int32)
    depth_t = torch.tensor(depth, dtype=torch.int64)[leaf_nodes]
    return Dictionary(bits, max_len, depth_t.to(torch.uint8), _as_i32(torch.tensor(nzm)[leaf_nodes]),
                      _as_i32(torch.tensor(negm)[leaf_nodes]), child_t, leaf)


def _as_i32(v: torch.Tensor) -> torch.Tensor:
    """int64 bit masks < 2^32 -> int32 with the same bits."""
    return torch.where(v >= 2 ** 31, v - 2 ** 32, v).to(torch.int32)


@dataclass
class Encoded:
    codes: torch.Tensor  # [n] int32 codewords, rows back to back
    counts: torch.Tensor  # [rows] int32 codewords per row


def encode(symbols: torch.Tensor, d: Dictionary) -> Encoded:
    """Code every row of `symbols` [rows, cols] (uint8 0/1/2) independently."""
    if d.child is None:
        raise ValueError("einfuse.compress.codec: this dictionary was loaded for decoding only; "
                         "build_dictionary() makes one that encodes")
    symbols = symbols.reshape(-1, symbols.shape[-1]).long()
    rows, cols = symbols.shape
    child, leaf = d.child.long(), d.leaf.long()
    node = torch.zeros(rows, dtype=torch.long)
    cap = cols + 1
    out = torch.zeros(rows, cap, dtype=torch.int32)
    counts = torch.zeros(rows, dtype=torch.long)
    ar = torch.arange(rows)

    def step(sym):
        nonlocal node
        node = child[node, sym]
        code = leaf[node]
        done = code >= 0
        if bool(done.any()):
            r = ar[done]
            out[r, counts[r]] = code[done].to(torch.int32)
            counts[r] += 1
            node = torch.where(done, torch.zeros_like(node), node)

    for c in range(cols):
        step(symbols[:, c])
    for _ in range(d.max_len):  # finish each row's last run with zeros
        if not bool((node != 0).any()):
            break
        pending = node != 0
        nxt = child[node, ZERO]
        code = leaf[nxt]
        done = pending & (code >= 0)
        r = ar[done]
        out[r, counts[r]] = code[done].to(torch.int32)
        counts[r] += 1
        node = torch.where(done, torch.zeros_like(node), torch.where(pending, nxt, node))
    mask = torch.arange(cap)[None, :] < counts[:, None]
    return Encoded(out[mask], counts.to(torch.int32))


def decode(enc: Encoded, d: Dictionary, cols: int) -> torch.Tensor:
    """Symbols [rows, cols] (uint8) back from codewords; raises if a row decodes to fewer than `cols`."""
    codes = enc.codes.long()
    counts = enc.counts.long()
    rows = counts.numel()
    if codes.numel() != int(counts.sum()):
        raise ValueError(f"einfuse.compress.codec: {codes.numel()} codewords but the row counts sum to "
                         f"{int(counts.sum())}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= d.size):
        raise ValueError("einfuse.compress.codec: a codeword is outside the dictionary")
    lens = d.lengths.long()[codes]
    syms = d.symbols()[codes]  # [n, max_len]
    valid = torch.arange(d.max_len)[None, :] < lens[:, None]
    flat = syms[valid]  # all decoded symbols, row after row (each row padded to a leaf)
    per_row = torch.zeros(rows, dtype=torch.long).index_add_(
        0, torch.repeat_interleave(torch.arange(rows), counts), lens)
    if rows and int(per_row.min()) < cols:
        raise ValueError(f"einfuse.compress.codec: a row decodes to {int(per_row.min())} symbols, "
                         f"fewer than its {cols} columns")
    starts = torch.cumsum(per_row, 0) - per_row
    idx = starts[:, None] + torch.arange(cols)[None, :]
    return flat[idx].to(torch.uint8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`bits`-bit codewords, little-endian bit order, into bytes (+3 bytes of padding for 24-bit reads)."""
    n = codes.numel()
    nbytes = (n * bits + 7) // 8 + 3
    bitpos = torch.arange(n, dtype=torch.int64) * bits
    out = torch.zeros(nbytes, dtype=torch.int64)
    c = codes.long()
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


def choose_bits(symbols: torch.Tensor, widths=range(6, 17), max_len: int = MAX_LEN, sample_rows: int = 4096,
                total_symbols: int | None = None) -> tuple[int, dict[int, dict]]:
    """The codeword width with the smallest codes + dictionary, measured by coding (a sample of) the rows.

    Returns (best width, {width: {"bits_per_symbol", "dictionary_bytes", "total_bits"}}), totals scaled
    to `total_symbols` (default: the whole stream)."""
    symbols = symbols.reshape(-1, symbols.shape[-1])
    probs = symbol_probs(symbols)
    g = torch.Generator().manual_seed(0)
    rows = symbols[torch.randperm(symbols.shape[0], generator=g)[:sample_rows]]
    total = total_symbols or symbols.numel()
    table = {}
    for w in sorted(widths):
        if table and 8 * 9 * (2 ** w) > min(v["total_bits"] for v in table.values()):
            break  # the dictionary alone would cost more than the best total so far
        d = build_dictionary(probs, w, max_len)
        enc = encode(rows, d)
        bps = enc.codes.numel() * w / rows.numel()
        table[w] = {"bits_per_symbol": bps, "dictionary_bytes": d.nbytes,
                    "total_bits": bps * total + 8 * d.nbytes}
    best = min(table, key=lambda w: table[w]["total_bits"])
    return best, table
