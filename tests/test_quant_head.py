"""The quantized output head (``head="int8"`` / ``"int4"``): logits within the rounding's own bound.

References, float64: the dequantized head s * (q - z) (the grid's own description: the kernel
must match it to fp32 rounding, 1e-5 of the largest logit) and the checkpoint's float head (each
weight moves by at most half its scale, so a logit moves by at most sum_g s_ng / 2 * ||h_g||_1).
"""

import pytest
import torch

import qvl
from qvl.quant.linear import QuantLinear
from qvl.runtime import head as qhead


def _hidden(engine, n=5):
    return torch.randn(n, engine.model.cfg.text.hidden_size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("tied", [False, True])
def test_head_logits_within_the_rounding_bound(kind, tied, tiny_ckpt, tiny_ckpt_tied):
    ckpt = tiny_ckpt_tied if tied else tiny_ckpt
    ref = qvl.load(ckpt, max_seq_len=128)
    eng = qvl.load(ckpt, max_seq_len=128, head=kind)
    assert isinstance(eng.model.lm_head, QuantLinear) and eng.model.lm_head.bits == int(kind[3:])
    w = ref.model.lm_head.weight.detach().double()
    assert torch.equal(eng.model.embed_tokens.weight, ref.model.embed_tokens.weight)  # lookups stay exact
    h = _hidden(eng)
    with torch.inference_mode():
        got = eng.model.logits(h).double()
    qw = qhead.quantized_head_weight(ref.model.lm_head.weight.detach(), kind)
    deq = qw.dequantize(torch.float64)
    want = h.double() @ deq.t()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    g = qw.group_size
    scales = qw.scales.double().t()  # [V, G]
    bound = (h.double().abs().reshape(len(h), -1, g).sum(-1) @ scales.t()) / 2  # [n, V]
    assert ((h.double() @ w.t() - want).abs() <= bound * (1 + 1e-9) + 1e-12).all()
    assert ((got - h.double() @ w.t()).abs() <= bound + 1e-5 * want.abs().max()).all()


def test_blockwise_quantization_equals_the_whole(monkeypatch):
    w = torch.randn(40, 256, generator=torch.Generator().manual_seed(1))
    whole = {k: qhead.quantized_head_weight(w, k) for k in qhead.HEADS}
    monkeypatch.setattr(qhead, "_ROWS_AT_ONCE", 12)
    for k, a in whole.items():
        b = qhead.quantized_head_weight(w, k)
        assert torch.equal(a.q, b.q) and torch.equal(a.zeros, b.zeros) and torch.equal(a.scales, b.scales)


def test_a_quantized_head_generates_and_bad_names_are_refused(tiny_ckpt):
    eng = qvl.load(tiny_ckpt, max_seq_len=128, head="int8")
    conv = [{"role": "user", "content": "Say something."}]
    assert len(eng.generate_ids(conv, max_new_tokens=5)) >= 1
    with pytest.raises(ValueError, match="head 'int3'"):
        qvl.load(tiny_ckpt, max_seq_len=128, head="int3")
