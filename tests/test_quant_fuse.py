"""Fused quantized linears (q/k/v, gate/up as one kernel call): the same bits as the parts."""

import pytest
import torch

from qvl.quant import cpu
from qvl.quant.linear import FusedQuantLinear, Int4Linear, Int8Linear
from qvl.quant.weight import QuantizedWeight

pytestmark = pytest.mark.skipif(cpu.unavailable() is not None, reason=f"no qvl CPU kernel: {cpu.unavailable()}")


def random_weight(n, k, bits, group, seed):
    """A QuantizedWeight [n, k]: random codes, zero points and fp16 scales (test_quant_dense_blocks uses it too)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 2**bits, (k // group, n), generator=g).to(torch.int16)
    scales = (torch.rand(k // group, n, generator=g) * 0.02 + 0.002).half()
    return QuantizedWeight(q, zeros, scales, bits, group)


@pytest.mark.parametrize("cls", [Int4Linear, Int8Linear])
@pytest.mark.parametrize("kernel,dtype", [("qvl", torch.bfloat16), ("qvl", torch.float32), ("qvl-a8", torch.bfloat16)])
def test_fused_equals_parts(cls, kernel, dtype):
    k, sizes = 256, (128, 64, 64)
    parts = [cls.from_weight(random_weight(n, k, cls.bits, 128, i), torch.randn(n), dtype, kernel)
             for i, n in enumerate(sizes)]
    xs = [torch.randn(m, k).to(dtype) for m in (1, 4, 9, 80)]  # 9 / 80: past the GEMV / a8 row limits
    want = [torch.cat([p(x) for p in parts], -1) for x in xs]
    held = sum(p.nbytes() for p in parts)
    fused = cls.fuse(parts)
    assert isinstance(fused, FusedQuantLinear) and fused.out_features == sum(sizes)
    assert sum(p.nbytes() for p in parts) == held  # the parts' buffers are views of the joint ones
    assert parts[1].weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
    for x, w in zip(xs, want):
        assert torch.equal(fused(x), w)
        assert torch.equal(torch.cat([p(x) for p in parts], -1), w)


def test_fuse_declines_what_it_cannot_join():
    a8 = [Int4Linear.from_weight(random_weight(n, 256, 4, 128, n), None, torch.bfloat16, "qvl-a8") for n in (64, 32)]
    assert Int4Linear.fuse(a8) is None  # 32 outputs: part of a 64-row tile
    mixed = [Int4Linear.from_weight(random_weight(64, 256, 4, 128, 0), None, torch.bfloat16, kern)
             for kern in ("qvl", "qvl-a8")]
    assert Int4Linear.fuse(mixed) is None
    dq = [Int4Linear.from_weight(random_weight(64, 256, 4, 128, i), None, torch.bfloat16, "dequant") for i in range(2)]
    assert Int4Linear.fuse(dq) is None

