"""The fused decode-and-multiply kernel (einfuse.kinds.cdot) on the einfuse-ternary-dict/2 format: codewords
running across the rows of a 16-row group, one int64 dictionary entry per codeword, 12-bit row scales."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import einfuse  # noqa: F401  (selects Triton's interpreter on CPU)
from einfuse.compress.codec import build_dictionary, symbol_probs
from einfuse.compress.format import CompressedTensor
from einfuse.kinds import cdot as cdot_mod
from einfuse.kinds.cdot import cdot, padded_dictionary, reference


def _stream(rows, cols, zero, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.tensor([zero, (1 - zero) / 2, (1 - zero) / 2])
    return torch.multinomial(p, rows * cols, replacement=True, generator=g).view(rows, cols).to(torch.uint8)


def _compressed(E, N, K, zero, bits, seed):
    s = _stream(E * N, K, zero, seed).view(E, N, K)
    g = torch.Generator().manual_seed(seed)
    d = build_dictionary(symbol_probs(s), bits)
    ct = CompressedTensor.encode(s, -torch.rand(E, N, generator=g), torch.rand(E, N, generator=g), d)
    return ct, d, g


def _routing(tokens):
    """Expert ids and token offsets for `tokens[e]` tokens per expert (0: the expert is not active)."""
    experts = torch.tensor([e for e, t in enumerate(tokens) if t], dtype=torch.int32)
    seg = torch.tensor([0] + [t for t in tokens if t], dtype=torch.int32).cumsum(0).to(torch.int32)
    return seg, experts


def _assert_matches(x, ct, d, seg, experts, got):
    W = ct.dequantize(d)
    want = reference(x, W, seg, experts)
    scale = (x.abs() @ W.abs().amax(0).T).clamp(min=1e-6) if x.numel() else 1
    assert torch.all((got - want).abs() <= 1e-5 * scale), (got - want).abs().max()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(E=st.integers(1, 3), N=st.integers(1, 35), K=st.integers(1, 70), zero=st.floats(0.3, 0.95),
       bits=st.sampled_from([6, 13]), data=st.data())
def test_fused_kernel_equals_dequantize_then_matmul(E, N, K, zero, bits, data):
    """Short rows (K < 64, any K): codewords run across row boundaries, some across several rows."""
    ct, d, g = _compressed(E, N, K, zero, bits, data.draw(st.integers(0, 1000)))
    seg, experts = _routing([data.draw(st.integers(0, 16)) for _ in range(E)])
    x = torch.randn(int(seg[-1]), K, generator=g)
    _assert_matches(x, ct, d, seg, experts, cdot(x, ct, d, seg, experts))


def test_fused_kernel_long_rows_16_bit_codes():
    """K = 600, 16-bit codewords: rows of several BLOCK_W chunks; a caller's padded dictionary; `out`."""
    ct, d, g = _compressed(2, 20, 600, 0.6, 16, 5)
    assert cdot_mod.chunks(ct) >= 2
    seg, experts = _routing([3, 1])
    x = torch.randn(4, 600, generator=g)
    dt = padded_dictionary(d)
    assert dt.dtype == torch.int64 and dt.numel() == 2 ** 16 and not dt[d.size:].any()
    out = torch.full((4, 20), float("nan"))
    got = cdot(x, ct, d, seg, experts, out=out, dict_table=dt)
    assert got is out
    _assert_matches(x, ct, d, seg, experts, got)


@pytest.mark.parametrize("block_w", [2, 4])
def test_fused_kernel_several_chunks_per_row(monkeypatch, block_w):
    """A narrow chunk makes every row take several (the straddle test at chunk boundaries): the same result."""
    ct, d, g = _compressed(2, 19, 45, 0.5, 6, 3)
    monkeypatch.setattr(cdot_mod, "BLOCK_W", block_w)
    assert cdot_mod.chunks(ct) >= 2
    seg, experts = _routing([5, 2])
    x = torch.randn(7, 45, generator=g)
    _assert_matches(x, ct, d, seg, experts, cdot(x, ct, d, seg, experts))


@pytest.mark.parametrize("rows", [32, 48, 128])
def test_fused_kernel_programs_of_several_row_groups(monkeypatch, rows):
    """ROWS_PER_PROGRAM rows per program, the last program's groups past the matrix skipped: the same result,
    and only the per-program reads (expert id, token range, sbase) change with the program count."""
    from einfuse.runtime.traffic import Traffic, counting
    E, N, K = 3, 70, 40  # 5 groups of 16 rows, the last ragged
    ct, d, g = _compressed(E, N, K, 0.8, 6, 9)
    seg, experts = torch.tensor([0, 3, 4], dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32)
    x = torch.randn(4, K, generator=g)
    loaded = {}
    for r in (16, rows):
        monkeypatch.setattr(cdot_mod, "ROWS_PER_PROGRAM", r)
        assert cdot_mod.rows_per_program(2, 5) == r
        t = Traffic()
        with counting(t):
            got = cdot(x, ct, d, seg, experts)
        _assert_matches(x, ct, d, seg, experts, got)
        loaded[r] = t.bytes_loaded
    programs = lambda r: 2 * -(-5 // (r // 16))
    assert loaded[16] - loaded[rows] == (programs(16) - programs(rows)) * (3 * 4 + 4)


def test_rows_per_program_keeps_the_gpu_busy():
    from einfuse.kinds.cdot import rows_per_program
    assert rows_per_program(2, 64) == 16  # a small decode step: 128 programs of 16 rows
    assert rows_per_program(2, 1792) == 128  # Mixtral-sized experts: 8 groups per program, 448 programs
    assert rows_per_program(8, 200) == 64


def test_rows_per_program_override_must_be_a_multiple_of_16(monkeypatch):
    monkeypatch.setattr(cdot_mod, "ROWS_PER_PROGRAM", 24)
    with pytest.raises(ValueError, match="multiple of 16"):
        cdot_mod.rows_per_program(2, 5)


def test_no_active_expert_or_token():
    ct, d, _ = _compressed(2, 5, 9, 0.8, 6, 1)
    y = cdot(torch.zeros(0, 9), ct, d, torch.zeros(1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32))
    assert y.shape == (0, 5)
    with pytest.raises(ValueError, match="features"):
        cdot(torch.zeros(1, 8), ct, d, torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32))


@pytest.mark.slow
def test_fused_kernel_compiles_for_sm80_sm90a_without_spills(tmp_path):
    """The decode-and-multiply kernel at 1 and 16 tokens per expert (16-bit codewords, the 2^16-entry int64
    dictionary read from global memory) for A100 and H100: no errors, no spills."""
    from einfuse.codegen.aot import check_gpu
    from einfuse.kinds.cdot import spec
    ct, d, _ = _compressed(2, 16, 600, 0.85, 16, 5)
    specs = [spec(ct, d, bt, name=f"cdot_t{bt}") for bt in (1, 16)]
    assert specs[1].mapping.num_warps == 8 and specs[0].mapping.num_warps == 4
    checks = check_gpu(specs, cache_dir=str(tmp_path), progress=False)
    assert len(checks) == 4
    for c in checks:
        assert c.ok and c.spills == 0 and c.registers <= 255, c
