"""The quantized output head (``head="int8"`` / ``"int4"``): logits within the rounding's own bound.

References, float64: the dequantized head s * (q - z) (the grid's own description: the kernel
must match it to fp32 rounding, 1e-5 of the largest logit) and the checkpoint's float head (each
weight moves by at most half its scale, so a logit moves by at most sum_g s_ng / 2 * ||h_g||_1).
"""

import pytest
import torch

import qvl
from qvl.quant import cpu
from qvl.quant.linear import QuantLinear, quant_linear_class
from qvl.runtime import head as qhead

needs_kernel = pytest.mark.skipif(cpu.isa() is None, reason=f"qvl's CPU kernel does not run here: {cpu.unavailable()}")


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
    if not tied:  # the untied table is the checkpoint's; a tied one is test_tied_lookup_reads_the_head_rows'
        assert torch.equal(eng.model.embed_tokens.weight, ref.model.embed_tokens.weight)
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


@needs_kernel
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tied_lookup_reads_the_head_rows(kind, dtype, tiny_ckpt_tied):
    """With tied embeddings one tensor is held: the lookup is the dequantized head's rows, bit for bit."""
    ref = qvl.load(tiny_ckpt_tied, max_seq_len=128, dtype=dtype)
    eng = qvl.load(tiny_ckpt_tied, max_seq_len=128, dtype=dtype, head=kind)
    emb = eng.model.embed_tokens
    assert isinstance(emb, qhead.TiedLookup) and emb.head is eng.model.lm_head
    assert emb.weight.dtype == ref.model.embed_tokens.weight.dtype and emb.weight.device.type == "meta"
    deq = qhead.quantized_head_weight(ref.model.embed_tokens.weight.detach(), kind).dequantize(emb.weight.dtype)
    ids = torch.randint(0, deq.shape[0], (2, 37), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        got = emb(ids)
    assert got.dtype == deq.dtype and torch.equal(got, deq[ids])
    assert torch.equal(eng.model.lm_head.dequantize(deq.dtype)[ids], got)
    assert not any(t.shape == deq.shape for t in eng.model.parameters())  # no float table is held


@needs_kernel
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("kernel", ["qvl", "qvl-a8"])
def test_head_built_in_blocks_equals_the_whole(kind, kernel, monkeypatch):
    w = torch.randn(300, 256, generator=torch.Generator().manual_seed(3)).bfloat16()
    qw = qhead.quantized_head_weight(w, kind)
    whole = quant_linear_class(qw.bits).from_weight(qw, dtype=w.dtype, kernel=kernel)
    monkeypatch.setattr(qhead, "_ROWS_AT_ONCE", 64)  # 5 blocks, the last of 44 rows
    blocks = qhead.quantized_head(w, kind, kernel)
    assert (blocks.kernel, blocks.out_features) == (whole.kernel, whole.out_features)
    a, b = dict(blocks.named_buffers()), dict(whole.named_buffers())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([0, 3, 4, 63, 64, 255, 256, 299])
    monkeypatch.setattr(qhead, "_IDS_AT_ONCE", 3)
    assert torch.equal(qhead.head_rows(blocks, ids, torch.bfloat16), qw.dequantize(torch.bfloat16)[ids])


@needs_kernel
def test_tied_int8_head_answers_as_transformers_on_the_dequantized_rows(tiny_ckpt_tied, hf_processor):
    """The reference: transformers' model with its (tied) embedding and head replaced by the
    dequantized int8 rows, greedy tokens equal over 24 steps, text and picture."""
    from PIL import Image
    from transformers import Qwen2VLForConditionalGeneration

    hf = Qwen2VLForConditionalGeneration.from_pretrained(tiny_ckpt_tied, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    emb = hf.model.language_model.embed_tokens.weight
    assert hf.lm_head.weight.data_ptr() == emb.data_ptr()
    with torch.no_grad():
        emb.copy_(qhead.quantized_head_weight(emb.detach(), "int8").dequantize(torch.float32))
    proc = hf_processor(tiny_ckpt_tied)
    eng = qvl.load(tiny_ckpt_tied, max_seq_len=512, head="int8")
    assert isinstance(eng.model.embed_tokens, qhead.TiedLookup)
    g = torch.Generator().manual_seed(4)
    image = Image.fromarray((torch.rand(168, 224, 3, generator=g) * 255).to(torch.uint8).numpy())
    for content in ([{"type": "text", "text": "Tell me a story about cats."}],
                    [{"type": "image", "image": image}, {"type": "text", "text": "Describe this."}]):
        conv = [{"role": "user", "content": content}]
        text = proc.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        inputs = proc(text=[text], images=[image] if len(content) > 1 else None, return_tensors="pt")
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == hf.config.image_token_id).int()
        with torch.no_grad():
            want = hf.generate(**inputs, max_new_tokens=24, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
        assert eng.generate_ids(conv, max_new_tokens=24, ignore_eos=True) == want
