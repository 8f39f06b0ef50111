"""The CPU kernels' many-row (prefill) path: W dequantized a block of output channels at a time.

* blocks against the whole weight: the same product within one rounding of the activation dtype
  at the largest output (torch's GEMM sums K in an order that depends on N, so a narrower block
  can round differently): bf16 within 2**-7 of max |y| (one bf16 ulp there), fp32 within 1e-6;
* no block holds more than ``DEQUANT_BLOCK_BYTES`` of float weight, and every output column is
  written once (a block off by a row would differ by whole outputs, far past the tolerance);
* fused q/k/v (gate/up) past the row limits: the parts' blocks into one output, bit for bit the
  parts run alone and put side by side.
"""

import pytest
import torch
import torch.nn.functional as F

from qvl.quant import cpu
from qvl.quant import linear as L
from qvl.quant.linear import FusedQuantLinear, Int4Linear, Int8Linear, dense_block_rows
from test_quant_fuse import random_weight

pytestmark = pytest.mark.skipif(cpu.unavailable() is not None, reason=f"no qvl CPU kernel: {cpu.unavailable()}")

TOL = {torch.bfloat16: 2**-7, torch.float32: 1e-6}


def _whole(m, x):
    """The product through the whole dequantized weight: the one-block case of the same path."""
    if m.kernel == "qvl-a8":
        y = torch.mm(x, cpu.a8_dequantize_t(m.weight, m.kscales, m.kzeros, m.bits, m.out_features, m.in_features,
                                            m.group_size, x.dtype))
        return y if m.bias is None else y + m.bias.to(x.dtype)
    w = cpu.dequantize(m.weight, m.kscales, m.kzeros, m.bits, m.in_features, m.group_size, x.dtype)
    return F.linear(x, w, None if m.bias is None else m.bias.to(x.dtype))


def _spy(monkeypatch):
    """Record the bytes of every block the forward dequantizes."""
    made = []
    for name in ("dequantize", "a8_dequantize_t"):
        real = getattr(cpu, name)

        def spy(*a, _real=real, **k):
            out = _real(*a, **k)
            made.append(out.numel() * out.element_size())
            return out
        monkeypatch.setattr(cpu, name, spy)
    return made


@pytest.mark.parametrize("cls", [Int4Linear, Int8Linear], ids=["int4", "int8"])
@pytest.mark.parametrize("kernel,dtype", [("qvl", torch.bfloat16), ("qvl", torch.float32),
                                          ("qvl-a8", torch.bfloat16), ("qvl-a8", torch.float32)])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_blocks_equal_the_whole_weight(cls, kernel, dtype, bias, monkeypatch):
    n, k, group = 704, 256, 128  # 704 rows in blocks of at most 128: six, the last short
    m = cls.from_weight(random_weight(n, k, cls.bits, group, 1), torch.randn(n) if bias else None, dtype, kernel)
    x = torch.randn(80, k).to(dtype)  # 80 rows: past the GEMV (8) and a8 (64) row limits
    want = _whole(m, x)
    monkeypatch.setattr(L, "DEQUANT_BLOCK_BYTES", 128 * k * x.element_size())
    assert dense_block_rows(kernel, n, k, x.element_size()) == (128 if kernel == "qvl-a8" else 120)
    made = _spy(monkeypatch)
    got = m(x)
    assert len(made) == 6 and max(made) <= L.DEQUANT_BLOCK_BYTES
    scale = want.float().abs().max().item()
    assert (got.float() - want.float()).abs().max().item() <= TOL[dtype] * scale
    # the product itself, not a rounding of it: x @ W.T + b in float64 from the decoded weight
    ref = x.double() @ m.dequantize(torch.float32).double().t()
    if bias:
        ref = ref + m.bias.double()
    assert (got.double() - ref).abs().max().item() <= (2**-6 if dtype == torch.bfloat16 else 1e-5) * scale


def test_block_rows_follow_the_layouts():
    # at most 4 MB of bf16 rows (1364, a multiple of cpu.ROWS; 1344 of cpu.A8_NT): 7 even blocks
    assert dense_block_rows("qvl", 8960, 1536, 2) == dense_block_rows("qvl-a8", 8960, 1536, 2) == 1280
    assert dense_block_rows("qvl", 1536, 8960, 2) == 220  # at most 232: 7 blocks, 6 x 220 + 216
    assert dense_block_rows("qvl", 1536, 1536, 2) == 768  # at most 1364: 2 blocks
    assert dense_block_rows("qvl-a8", 1536, 8960, 4) == 64  # at least one tile
    assert dense_block_rows("qvl", 256, 1536, 2) == 256  # a small layer: all of it at once
    for kernel, tile in (("qvl", cpu.ROWS), ("qvl-a8", cpu.A8_NT)):
        for n, k, s in ((8960, 1536, 2), (1536, 8960, 2), (2048, 1536, 4), (151936, 1536, 2), (700, 64, 4)):
            rows = dense_block_rows(kernel, n, k, s)
            assert rows == n or (rows % tile == 0 and (rows * k * s <= L.DEQUANT_BLOCK_BYTES or rows == tile))


@pytest.mark.parametrize("kernel", ["qvl", "qvl-a8"])
def test_fused_blocks_equal_the_parts(kernel, monkeypatch):
    k, sizes = 256, (192, 128, 128)
    parts = [Int4Linear.from_weight(random_weight(n, k, 4, 128, i), torch.randn(n), torch.bfloat16, kernel)
             for i, n in enumerate(sizes)]
    monkeypatch.setattr(L, "DEQUANT_BLOCK_BYTES", 64 * k * 2)  # several blocks a part
    x = torch.randn(2, 40, k).to(torch.bfloat16)  # 80 rows
    want = torch.cat([p(x) for p in parts], -1)
    fused = Int4Linear.fuse(parts)
    assert isinstance(fused, FusedQuantLinear)
    got = fused(x)
    assert got.shape == (2, 40, sum(sizes)) and torch.equal(got, want)


def test_the_2b_gate_projection_in_blocks(monkeypatch):
    """The 2B decoder's gate (8960 x 1536, int4 g128) on a 256-token bf16 prefill chunk: seven
    blocks of 3.9 MB instead of 27.5 MB, within one bf16 rounding of the whole product."""
    m = Int4Linear.from_weight(random_weight(8960, 1536, 4, 128, 3), None, torch.bfloat16, "qvl")
    x = torch.randn(256, 1536).to(torch.bfloat16)
    want = _whole(m, x)
    made = _spy(monkeypatch)
    got = m(x)
    assert len(made) == 7 and max(made) <= 4 << 20
    assert (got.float() - want.float()).abs().max().item() <= 2**-7 * want.float().abs().max().item()
