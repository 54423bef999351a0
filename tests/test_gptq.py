"""einfuse.quant.gptq: against the textbook (OBQ-order, explicit inverse) GPTQ, RTN, batching, groups."""
import pytest
import torch

from einfuse.quant import Hessian, UniformGrid, gptq, rtn


def _layer(rows=24, cols=64, n=512, seed=0, batch=()):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs, so error feedback has something to exploit
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    X = torch.randn(*batch, n, cols, generator=g, dtype=torch.float64) @ mix.double()
    W = torch.randn(*batch, rows, cols, generator=g, dtype=torch.float64)
    return W, X


def _hessian(X):
    return 2.0 / X.shape[-2] * X.transpose(-1, -2) @ X


def _textbook(W, H, grid, damp):
    """GPTQ as derived: quantize columns in order, update the rest with the explicit inverse Hessian,
    then eliminate the quantized column from the inverse (no blocks, no Cholesky)."""
    W = W.clone()
    H = H.clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    Hinv = torch.linalg.inv(H)
    params = grid.fit(W)
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        q, _ = grid.quantize(W[:, j], params)
        Q[:, j] = q
        err = (W[:, j] - q) / Hinv[j, j]
        W[:, j + 1:] -= err[:, None] * Hinv[j, j + 1:][None, :]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return Q


@pytest.mark.parametrize("block", [1, 7, 128])
def test_matches_textbook_gptq(block):
    W, X = _layer()
    H = _hessian(X)
    grid = UniformGrid(bits=3)
    got = gptq(W, H, grid, damp=0.01, block=block)
    want = _textbook(W, H, grid, 0.01)
    assert torch.allclose(got.weight, want, atol=1e-9), (got.weight - want).abs().max()


def test_beats_rtn_on_layer_output():
    W, X = _layer(seed=1)
    H = _hessian(X)
    for bits in (2, 3, 4):
        grid = UniformGrid(bits=bits)
        e_g = (X @ (gptq(W, H, grid).weight - W).T).pow(2).mean()
        e_r = (X @ (rtn(W, grid).weight - W).T).pow(2).mean()
        assert e_g < 0.8 * e_r, (bits, float(e_g), float(e_r))


def test_identity_hessian_is_rtn():
    W, _ = _layer(seed=2)
    grid = UniformGrid(bits=4, group_size=16)
    got = gptq(W, torch.eye(W.shape[1], dtype=torch.float64), grid)
    ref = rtn(W, grid)
    assert torch.equal(got.codes, ref.codes)
    assert torch.allclose(got.weight, ref.weight)


def test_batched_over_experts_equals_one_by_one():
    W, X = _layer(rows=8, cols=32, n=200, seed=3, batch=(3,))
    H = _hessian(X)
    grid = UniformGrid(bits=2, group_size=8)
    both = gptq(W, H, grid, block=16)
    for e in range(3):
        one = gptq(W[e], H[e], grid, block=16)
        assert torch.allclose(both.weight[e], one.weight, atol=1e-10)
        assert torch.equal(both.codes[e], one.codes)
    assert len(both.params) == 4  # one per group of 8 columns
    assert both.loss.shape == (3, 8)


def test_groups_codes_and_values_agree():
    W, X = _layer(seed=4)
    grid = UniformGrid(bits=4, group_size=16)
    res = gptq(W, _hessian(X), grid)
    assert res.codes.min() >= 0 and res.codes.max() <= 15
    for g, (scale, zero) in enumerate(res.params):
        cols = slice(16 * g, 16 * g + 16)
        deq = scale[:, None] * (res.codes[:, cols].double() - zero[:, None])
        assert torch.allclose(deq, res.weight[:, cols])


def test_hessian_accumulator_and_dead_columns():
    W, X = _layer(rows=6, cols=16, n=64, seed=5)
    X[:, 3] = 0  # a feature no calibration token uses
    acc = Hessian(16, batch=(2,))
    acc.add(X[:40], 0)
    acc.add(X[40:], 0)
    acc.add(X[:0], 1)  # nothing routed to expert 1
    assert torch.allclose(acc.H[0], _hessian(X))
    assert acc.count.tolist() == [64, 0]
    res = gptq(W, acc.H[0], UniformGrid(bits=3))
    assert res.dead.tolist() == [i == 3 for i in range(16)]
    assert torch.isfinite(res.weight).all()
    # an all-zero Hessian (an expert without tokens) degrades to round-to-nearest, never to NaN or zeros
    res1 = gptq(W, acc.H[1], UniformGrid(bits=3))
    assert torch.equal(res1.codes, rtn(W, UniformGrid(bits=3)).codes)


def test_act_order_static_groups():
    W, X = _layer(seed=6)
    H = _hessian(X)
    grid = UniformGrid(bits=3, group_size=16)
    res = gptq(W, H, grid, act_order=True)
    e_g = (X @ (res.weight - W).T).pow(2).mean()
    e_r = (X @ (rtn(W, grid).weight - W).T).pow(2).mean()
    assert e_g < e_r
    for g, (scale, zero) in enumerate(res.params):
        cols = slice(16 * g, 16 * g + 16)
        assert torch.allclose(scale[:, None] * (res.codes[:, cols].double() - zero[:, None]), res.weight[:, cols])


def test_shape_errors():
    with pytest.raises(ValueError, match="einfuse.quant.gptq"):
        gptq(torch.zeros(4, 8), torch.eye(6), UniformGrid())
