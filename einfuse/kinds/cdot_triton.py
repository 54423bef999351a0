"""The fused decompress-and-multiply Triton kernel (einfuse.kinds.cdot launches it; self-contained so the
sm_80/sm_90a AOT check compiles this file's text as is)."""
import triton
import triton.language as tl


@triton.jit
def cdot_kernel(x_ptr, y_ptr, seg_ptr, expert_ptr,
                codes_ptr, counts_ptr, bases_ptr, scales_ptr, dict_len_ptr, dict_nz_ptr, dict_neg_ptr,
                N, K, G, stride_x, stride_y,
                BITS: tl.constexpr, MAX_LEN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
                DICT: tl.constexpr, DICT_IN_REGS: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr):
    """y[t, n] = sum_k x[t, k] * W_e[n, k] for the tokens t of one active expert e, W_e decoded on the fly.

    program (a, p): active expert a (expert_ptr[a], its tokens seg_ptr[a]:seg_ptr[a+1] of x, sorted by
    expert) and rows p*ROWS_PER_PROGRAM .. +ROWS_PER_PROGRAM of its matrix, BLOCK_R (one offset group) at a
    time: the dictionary is loaded once per program, not once per group. Each row walks its own codewords:
    a codeword is read from the packed stream (a 24-bit window at bit position index*BITS), expanded through
    the dictionary (length, nonzero mask, negative mask; held in registers when DICT_IN_REGS, where
    tl.gather reads it through shared memory), and its up to MAX_LEN symbols are multiplied with the
    tokens' activations at the row's current column."""
    a = tl.program_id(0)
    p = tl.program_id(1)
    e = tl.load(expert_ptr + a)
    t_start = tl.load(seg_ptr + a)
    t_stop = tl.load(seg_ptr + a + 1)
    r = tl.arange(0, BLOCK_R)
    j = tl.arange(0, MAX_LEN)
    if DICT_IN_REGS:
        d_all = tl.arange(0, DICT)
        d_len = tl.load(dict_len_ptr + d_all).to(tl.int32)
        d_nz = tl.load(dict_nz_ptr + d_all)
        d_neg = tl.load(dict_neg_ptr + d_all)
    for gi in range(ROWS_PER_PROGRAM // BLOCK_R):
        g = p * (ROWS_PER_PROGRAM // BLOCK_R) + gi
        g_in = (r * 0 + g) < G  # a group past the matrix's last (the last program's tail): nothing to read
        rows = g * BLOCK_R + r
        row_ok = rows < N
        # per-row offsets: the group's base plus the counts of the rows before it in the group
        count = tl.load(counts_ptr + (e * G + g) * BLOCK_R + r, mask=g_in, other=0).to(tl.int32)
        base = tl.sum(tl.load(bases_ptr + e * G + g + r * 0, mask=(r == 0) & g_in, other=0), 0)  # one lane reads it
        start = base.to(tl.int64) + (tl.cumsum(count, 0) - count).to(tl.int64)
        lo = tl.load(scales_ptr + (e * N + rows) * 2, mask=row_ok, other=0.0).to(tl.float32)
        hi = tl.load(scales_ptr + (e * N + rows) * 2 + 1, mask=row_ok, other=0.0).to(tl.float32)
        steps = tl.max(count, 0)
        for t0 in range(t_start, t_stop, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_ok = t < t_stop
            acc = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
            pos = tl.zeros([BLOCK_R], dtype=tl.int32)
            for s in range(steps):
                live = s < count
                bitpos = (start + s) * BITS
                byte = bitpos // 8
                b0 = tl.load(codes_ptr + byte, mask=live, other=0).to(tl.int32)
                b1 = tl.load(codes_ptr + byte + 1, mask=live, other=0).to(tl.int32)
                b2 = tl.load(codes_ptr + byte + 2, mask=live, other=0).to(tl.int32)
                code = ((b0 | (b1 << 8) | (b2 << 16)) >> (bitpos % 8).to(tl.int32)) & ((1 << BITS) - 1)
                if DICT_IN_REGS:
                    n_sym = tl.where(live, tl.gather(d_len, code, 0), 0)
                    nz = tl.gather(d_nz, code, 0)
                    neg = tl.gather(d_neg, code, 0)
                else:
                    n_sym = tl.load(dict_len_ptr + code, mask=live, other=0).to(tl.int32)
                    nz = tl.load(dict_nz_ptr + code, mask=live, other=0)
                    neg = tl.load(dict_neg_ptr + code, mask=live, other=0)
                col = pos[:, None] + j[None, :]
                ok = (j[None, :] < n_sym[:, None]) & (col < K)
                is_nz = ((nz[:, None] >> j[None, :]) & 1) != 0
                is_neg = ((neg[:, None] >> j[None, :]) & 1) != 0
                w = tl.where(ok & is_nz, tl.where(is_neg, lo[:, None], hi[:, None]), 0.0)
                xv = tl.load(x_ptr + t[:, None, None] * stride_x + col[None, :, :],
                             mask=t_ok[:, None, None] & (ok & is_nz)[None, :, :], other=0.0).to(tl.float32)
                acc += tl.sum(xv * w[None, :, :], axis=2)
                pos += n_sym
            tl.store(y_ptr + t[:, None] * stride_y + rows[None, :], acc, mask=t_ok[:, None] & row_ok[None, :])
