"""The fused decompress-and-multiply Triton kernel (einfuse.kinds.cdot launches it; self-contained so the
sm_80/sm_90a AOT check compiles this file's text as is). Format: einfuse-ternary-dict/2 (one int64
dictionary entry per codeword, codewords running across the rows of a 16-row group, 12-bit row scales)."""
import triton
import triton.language as tl


@triton.jit
def cdot_kernel(x_ptr, y_ptr, seg_ptr, expert_ptr,
                codes_ptr, bases_ptr, scales_ptr, sbase_ptr, dict_ptr,
                N, K, G, NCODES, CHUNKS, stride_x, stride_y,
                BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr,
                NZ: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr):
    """y[t, n] = sum_k x[t, k] * W_e[n, k] for the tokens t of one active expert e, W_e decoded on the fly.

    program (a, p): active expert a (expert_ptr[a], its tokens seg_ptr[a]:seg_ptr[a+1] of x, sorted by
    expert, BLOCK_T at a time) and rows p*ROWS_PER_PROGRAM .. +ROWS_PER_PROGRAM of its matrix, one group
    of BLOCK_R (16) rows at a time. A group's codewords start at bases[e, g] and parse the group's rows as
    one symbol stream, so its rows are decoded in sequence, carrying (c, P): c the index of the first
    codeword touching the row, P the group position where it starts. A row looks at codeword lanes c, c+1,
    ... BLOCK_W at a time (CHUNKS times at most: enough for the most codewords any row touches): each is
    read from the packed stream (a 24-bit window at bit index*BITS) and looked up in the int64 dictionary
    in global memory (length in bits 0..6, nonzero count k in bits 7..9, then k (offset, neg) fields of 7
    bits); its start is P + the exclusive cumsum of the lengths, and its nonzeros that fall in the row's
    range [r*K, (r+1)*K) gather x at their columns times the row's w_max (w_min where neg). The lanes
    that end inside the row are consumed (c, P move past them); once a chunk leaves a lane unconsumed (it
    straddles into the next row, or starts there) the row is complete and later chunks count nothing.
    Row scales: a 12-bit code per row (q_lo | q_hi << 6), magnitude sbase[e] * 2^(-q/8), q == 63 -> 0."""
    a = tl.program_id(0)
    p = tl.program_id(1)
    e = tl.load(expert_ptr + a)
    t_start = tl.load(seg_ptr + a)
    t_stop = tl.load(seg_ptr + a + 1)
    sbase = tl.load(sbase_ptr + e)
    w = tl.arange(0, BLOCK_W)
    i = tl.arange(0, NZ)
    shift = (10 + 7 * i).to(tl.int64)  # the i-th (offset, neg) field of an entry
    GROUPS: tl.constexpr = ROWS_PER_PROGRAM // BLOCK_R
    for gi in range(GROUPS):
        g = p * GROUPS + gi
        row0 = g * BLOCK_R
        nrows = tl.minimum(N - row0, BLOCK_R)  # <= 0 for a group past the matrix (the last program's tail)
        base = tl.load(bases_ptr + e * G + g, mask=g < G, other=0).to(tl.int64)
        for t0 in range(t_start, t_stop, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_ok = t < t_stop
            c = base  # first codeword touching the row
            P = (base * 0).to(tl.int32)  # its start within the group's symbol stream
            for r in range(nrows):
                row = row0 + r
                sbit = (e * N + row) * 12  # the row's 12-bit scale code (bit offset 0 or 4: two bytes hold it)
                s0 = tl.load(scales_ptr + sbit // 8).to(tl.int32)
                s1 = tl.load(scales_ptr + sbit // 8 + 1).to(tl.int32)
                sc = ((s0 | (s1 << 8)) >> (sbit % 8)) & 4095
                q_lo = sc & 63
                q_hi = sc >> 6
                w_min = -tl.where(q_lo == 63, 0.0, sbase * tl.exp2(q_lo.to(tl.float32) * -0.125))
                w_max = tl.where(q_hi == 63, 0.0, sbase * tl.exp2(q_hi.to(tl.float32) * -0.125))
                lo_pos = r * K
                hi_pos = lo_pos + K
                acc = tl.zeros([BLOCK_T], dtype=tl.float32)
                stop = base * 0 + NCODES  # lanes at or past it are not read: 0 once the row is done
                for _ in range(CHUNKS):
                    idx = c + w
                    live = idx < stop
                    bitpos = idx * BITS
                    byte = bitpos // 8
                    b0 = tl.load(codes_ptr + byte, mask=live, other=0).to(tl.int32)
                    b1 = tl.load(codes_ptr + byte + 1, mask=live, other=0).to(tl.int32)
                    b2 = tl.load(codes_ptr + byte + 2, mask=live, other=0).to(tl.int32)
                    code = ((b0 | (b1 << 8) | (b2 << 16)) >> (bitpos % 8).to(tl.int32)) & ((1 << BITS) - 1)
                    ent = tl.load(dict_ptr + code, mask=live, other=0)
                    L = (ent & 127).to(tl.int32)
                    start = P + tl.cumsum(L, 0) - L
                    consumed = live & (start + L <= hi_pos)
                    k = ((ent >> 7) & 7).to(tl.int32)
                    f = ((ent[:, None] >> shift[None, :]) & 127).to(tl.int32)  # [BLOCK_W, NZ]
                    pos = start[:, None] + (f & 63)
                    nz = live[:, None] & (i[None, :] < k[:, None]) & (pos >= lo_pos) & (pos < hi_pos)
                    wv = tl.where((f >> 6) != 0, w_min, w_max)
                    xv = tl.load(x_ptr + t[:, None, None] * stride_x + (pos - lo_pos)[None, :, :],
                                 mask=t_ok[:, None, None] & nz[None, :, :], other=0.0).to(tl.float32)
                    acc += tl.sum(tl.sum(xv * wv[None, :, :], axis=2), axis=1)
                    n_used = tl.sum(consumed.to(tl.int32), 0)
                    c += n_used
                    P += tl.sum(tl.where(consumed, L, 0), 0)
                    stop = tl.where(n_used == BLOCK_W, stop, 0)  # a lane left unconsumed: the row is complete
                tl.store(y_ptr + t * stride_y + row, acc, mask=t_ok)
