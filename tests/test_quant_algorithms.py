"""GPTQ, AWQ and round-to-nearest on single weights: agreement with the loop-based reference
quantizers of tests/quant_ref.py, and the property each algorithm exists for (lower output error
than RTN with the same grid on inputs that make the difference)."""

import pytest
import torch

import quant_ref as ref
from qvl.model.decoder import RMSNorm
from qvl.quant import awq
from qvl.quant.gptq import Hessian, gptq
from qvl.quant.rtn import Grid, rtn


def _w(n=64, k=128, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def _correlated_inputs(k=128, tokens=2048, seed=1):
    """Inputs whose channels are correlated and of unequal scale, as real activations are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    scale = torch.rand(k, generator=g) * 3 + 0.2
    return (torch.randn(tokens, k, generator=g) @ mix) * scale


def _out_err(x, w, qw):
    return float((x @ (qw.dequantize() - w).t()).pow(2).sum() / (x @ w.t()).pow(2).sum())


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 32, False), (8, 64, True), (4, -1, False)])
def test_rtn_equals_reference_gptq_grid(bits, group, sym):
    w = _w()
    qw = rtn(w, Grid(bits, group, sym, include_zero=True, min_zero=1))
    q, zeros, scales, _ = ref.rtn_gptq(w, group, bits, sym)
    assert torch.equal(qw.q.t().long(), q)
    assert torch.equal(qw.zeros.long(), zeros)
    assert torch.equal(qw.scales, scales)


def test_rtn_equals_reference_awq_grid():
    w = _w()
    qw = rtn(w, Grid(4, 32, sym=False, include_zero=False))
    q, zeros, scales = ref.rtn_awq(w, 32)
    assert torch.equal(qw.q.t().long(), q) and torch.equal(qw.zeros.long(), zeros)
    assert torch.equal(qw.scales, scales)


def test_hessian_accumulates_in_batches():
    x = _correlated_inputs(tokens=300)
    h = Hessian(x.shape[1])
    for chunk in x.split(70):
        h.add(chunk[None])
    torch.testing.assert_close(h.h, 2 / x.shape[0] * x.t() @ x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits,group,sym,desc_act", [(4, 32, True, False), (4, 32, False, True),
                                                     (8, 64, True, False), (4, -1, True, True)])
def test_gptq_beats_rtn_on_layer_output(bits, group, sym, desc_act):
    w, x = _w(), _correlated_inputs()
    grid = Grid(bits, group, sym, min_zero=1)
    h = Hessian(x.shape[1])
    h.add(x)
    qw, stats = gptq(w, h.h, grid, damp_percent=0.01, desc_act=desc_act)
    assert qw.q.max() <= grid.maxq and int(qw.zeros.min()) >= 1
    e_gptq, e_rtn = _out_err(x, w, qw), _out_err(x, w, rtn(w, grid))
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


def test_gptq_act_order_groups():
    w, x = _w(), _correlated_inputs()
    h = Hessian(x.shape[1])
    h.add(x)
    qw, _ = gptq(w, h.h, Grid(4, 32, True), desc_act=True)
    assert qw.g_idx is not None and torch.bincount(qw.g_idx.long()).tolist() == [32] * 4
    # columns in one group were quantized together: in order of decreasing H diagonal
    order = torch.argsort(h.h.diagonal(), descending=True)
    assert torch.equal(qw.g_idx.long()[order], torch.arange(128) // 32)
    perm, ok = qw.contiguous_groups()
    assert ok and perm is not None


def test_gptq_dead_inputs():
    w, x = _w(), _correlated_inputs()
    x[:, 5] = 0
    h = Hessian(x.shape[1])
    h.add(x)
    qw, _ = gptq(w, h.h, Grid(4, 32, True))
    assert torch.all(qw.dequantize()[:, 5] == 0)


def test_awq_scales_keep_the_float_function():
    g = torch.Generator().manual_seed(3)
    norm = RMSNorm(128, 1e-6)
    norm.weight.data = torch.rand(128, generator=g) + 0.5
    lins = [torch.nn.Linear(128, 64, bias=False) for _ in range(2)]
    x = _correlated_inputs(tokens=64)
    before = [lin(norm(x)) for lin in lins]
    awq.apply_scale(norm, lins, torch.rand(128, generator=g) * 4 + 0.1)
    for b, lin in zip(before, lins):
        torch.testing.assert_close(lin(norm(x)), b, rtol=1e-4, atol=1e-5)
    up, down = torch.nn.Linear(128, 96), torch.nn.Linear(96, 128)
    y = down(up(x))
    awq.apply_scale(up, [down], torch.rand(96, generator=g) * 4 + 0.1)
    torch.testing.assert_close(down(up(x)), y, rtol=1e-4, atol=1e-4)


def test_awq_beats_rtn_with_outlier_channels():
    """A few input channels 30x larger than the rest (the activation outliers AWQ targets)."""
    w, x = _w(seed=4), _correlated_inputs(seed=5)
    x[:, :4] *= 30
    grid = Grid(4, 32, sym=False, include_zero=False)
    lin = torch.nn.Linear(128, 64, bias=False)
    lin.weight.data = w.clone()
    s, _ = awq.search_scale([lin], x, lambda: lin(x), grid)
    scaled = w * s
    clip = awq.search_clip(scaled, x / s, grid)
    lin.weight.data = scaled
    awq.apply_clip(lin, clip, grid)
    q = rtn(lin.weight.data, grid).dequantize() / s  # the effective weight on the original input
    e_awq = float((x @ (q - w).t()).pow(2).sum() / (x @ w.t()).pow(2).sum())
    e_rtn = _out_err(x, w, rtn(w, grid))
    assert e_awq < 0.7 * e_rtn, (e_awq, e_rtn)


def test_grid_rejects_indivisible_groups():
    with pytest.raises(ValueError, match="not divisible"):
        rtn(_w(k=96), Grid(4, 64))
