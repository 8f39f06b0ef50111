"""The decode step's fused C operations (qvl.quant.decode_ops, ops.c) against the torch code they
replace in qvl.model.decoder, which test_model_parity.py and test_generate.py hold to transformers.

Stated tolerances:
- RMSNorm with its residual add: bf16 bit for bit; fp32 within 1e-6 relative (only the order of the
  sum of squares differs).
- SiLU x up: bf16 within one bf16 rounding and identical for >= 99.9% of values; fp32 within 1e-6
  relative (the exp approximation is within 2 ulp of expf).
- One-token attention: the cache rows it writes bit for bit (bf16, fp32, int8 codes and scales);
  its output within 2e-6 of SDPA's in fp32 and within 2^-7 of the largest output in bf16 (SDPA
  rounds its probabilities to bf16 before the product with V; ops.c keeps them in fp32).
- A loaded model answers with the same greedy tokens through either code, alone and batched.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import qvl
from qvl.model.decoder import Attention, RMSNorm
from qvl.model.kv_cache import KVCache
from qvl.model.rope import MRope
from qvl.quant import cpu, decode_ops

pytestmark = pytest.mark.skipif(cpu.library() is None, reason=f"qvl's CPU library: {cpu.unavailable()}")

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def ops():
    return decode_ops.CpuDecodeOps()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_equals_the_module(ops, dtype, with_residual):
    g = torch.Generator().manual_seed(0)
    d = 1536 + 8  # a tail past the 16-lane sums
    x = (torch.randn(3, 1, d, generator=g) * 4).to(dtype)
    r = torch.randn(3, 1, d, generator=g).to(dtype) if with_residual else None
    norm = RMSNorm(d, 1e-6).to(dtype)
    norm.weight.data.copy_(torch.rand(d, generator=g) + 0.5)
    y, s = ops.rms_norm(x, norm.weight, norm.eps, r)
    ref_s = x + r if with_residual else x
    assert torch.equal(s, ref_s)
    ref = norm(ref_s)
    if dtype == torch.bfloat16:
        assert torch.equal(y, ref)
    else:
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_equals_torch(ops, dtype):
    g = torch.Generator().manual_seed(1)
    n = 8960 + 3
    gate_up = (torch.randn(2, 1, 2 * n, generator=g) * 4).to(dtype)
    gate_up[0, 0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # past exp's range both ways, and zeros
    gate, up = gate_up[..., :n], gate_up[..., n:]
    y = ops.silu_mul(gate, up)
    assert torch.equal(ops.silu_mul(gate_up), y)  # one gate/up product: its halves
    ref = F.silu(gate) * up
    if dtype == torch.bfloat16:
        torch.testing.assert_close(y, ref, rtol=2**-8, atol=0)
        assert (y == ref).float().mean() >= 0.999
    else:
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-7)


def _attention(dtype, seed=0):
    cfg = SimpleNamespace(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    attn = Attention(cfg).to(dtype)
    g = torch.Generator().manual_seed(seed)
    for p in attn.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
    attn.o_proj = torch.nn.Identity()  # compare the attention itself, before its output product
    return attn, g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cache", ["model", "int8"])
def test_attention_equals_sdpa_and_writes_the_same_cache(ops, dtype, cache):
    attn, g = _attention(dtype)
    slots, seq, length = 5, 64, 48
    kv = KVCache(slots, 2, seq, 64, torch.int8 if cache == "int8" else dtype)
    for t in kv.tensors():  # earlier tokens: whatever a prefill left there
        if t.dtype == torch.int8:
            t.copy_(torch.randint(-127, 128, t.shape, generator=g))
        elif t.dtype == torch.float16:
            t.copy_(torch.rand(t.shape, generator=g) * 0.02 + 1e-3)
        else:
            t.copy_(torch.randn(t.shape, generator=g))
    row, write = 1, torch.tensor([[10], [0], [37], [47]])
    bsz = write.shape[0]
    live = torch.tensor([True, True, False, True])  # row 2 is a bucket's idle row: it attends key 0
    keys = torch.arange(length)[None, :]
    mask = torch.where(live[:, None], keys <= write, keys == 0)[:, None, None]
    pos = (write[:, 0] + torch.tensor([3, 0, 7, 1])).view(1, bsz, 1).expand(3, bsz, 1)
    cos, sin = MRope(64, 1e6, (8, 12, 12))(pos, dtype)
    x = torch.randn(bsz, 1, 256, generator=g).to(dtype)

    outs, caches = {}, {}
    for name in ("torch", "ops"):
        attn.kv_cache = KVCache(slots, 2, seq, 64, kv.k.dtype)
        for mine, src in zip(attn.kv_cache.tensors(), kv.tensors()):
            mine.copy_(src)
        with torch.inference_mode():
            if name == "torch":
                outs[name] = attn(x, cos, sin, mask, write, length, row)
            else:
                outs[name] = attn.decode(x, cos, sin, mask, write, row, ops)
        caches[name] = [t.clone() for t in attn.kv_cache.tensors()]
    for got, ref in zip(caches["ops"], caches["torch"]):
        assert torch.equal(got, ref)
    ref = outs["torch"].float()
    if dtype == torch.bfloat16:
        assert (outs["ops"].float() - ref).abs().max() <= 2**-7 * ref.abs().max()
    else:
        torch.testing.assert_close(outs["ops"], outs["torch"], rtol=0, atol=2e-6)


def test_attention_refuses_rows_outside_the_cache(ops):
    attn, _ = _attention(torch.float32)
    attn.kv_cache = KVCache(2, 2, 16, 64, torch.float32)
    x = torch.zeros(2, 1, 256)
    cos, sin = MRope(64, 1e6, (8, 12, 12))(torch.zeros(3, 2, 1, dtype=torch.int64), torch.float32)
    mask = torch.ones(2, 1, 1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="outside the cache"):
        attn.decode(x, cos, sin, mask, torch.zeros(2, 1, dtype=torch.int64), 1, ops)
    with pytest.raises(RuntimeError, match="qvl_decode_attention failed"):  # a write position past the cache
        attn.decode(x, cos, sin, mask, torch.tensor([[0], [16]]), 0, ops)


def test_the_avx2_build_gives_the_same_bits(ops):
    """Sums run in 16 fixed lanes, so the build's vector width cannot change the result."""
    try:
        avx2 = decode_ops.CpuDecodeOps(cpu.open_variant("avx2"))
    except RuntimeError as e:
        pytest.skip(str(e))
    g = torch.Generator().manual_seed(3)
    x, r = torch.randn(2, 1, 1536, generator=g), torch.randn(2, 1, 1536, generator=g)
    w = torch.rand(1536, generator=g)
    for a, b in zip(ops.rms_norm(x, w, 1e-6, r), avx2.rms_norm(x, w, 1e-6, r)):
        assert torch.equal(a, b)
    gate, up = torch.randn(2, 1, 999, generator=g) * 5, torch.randn(2, 1, 999, generator=g)
    assert torch.equal(ops.silu_mul(gate, up), avx2.silu_mul(gate, up))
    attn, _ = _attention(torch.float32)
    cos, sin = MRope(64, 1e6, (8, 12, 12))(torch.full((3, 2, 1), 5, dtype=torch.int64), torch.float32)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    xs = torch.randn(2, 1, 256, generator=g)
    out = []
    for o in (ops, avx2):
        attn.kv_cache = KVCache(2, 2, 8, 64, torch.float32)
        attn.kv_cache.k.copy_(torch.linspace(-1, 1, attn.kv_cache.k.numel()).view_as(attn.kv_cache.k))
        out.append(attn.decode(xs, cos, sin, mask, torch.tensor([[5], [5]]), 0, o))
    assert torch.equal(*out)


def _engines(ckpt, monkeypatch, **kw):
    monkeypatch.setenv(decode_ops.ENV, "torch")
    plain = qvl.load(ckpt, **kw)
    monkeypatch.setenv(decode_ops.ENV, "auto")
    fused = qvl.load(ckpt, **kw)
    assert plain._core.runner.model.decode_ops is None
    assert isinstance(fused._core.runner.model.decode_ops, decode_ops.CpuDecodeOps)
    return plain, fused


@pytest.mark.parametrize("opts", [dict(dtype="float32"), dict(dtype="bfloat16"),
                                  dict(dtype="bfloat16", kv_cache_dtype="int8")], ids=["fp32", "bf16", "bf16-kv8"])
def test_a_loaded_model_answers_the_same_through_either_code(tiny_ckpt, monkeypatch, opts):
    plain, fused = _engines(tiny_ckpt, monkeypatch, max_seq_len=256, max_batch=3, **opts)
    calls = []
    real = fused._core.runner.model.decode_ops.attention
    fused._core.runner.model.decode_ops.attention = lambda *a, **k: calls.append(1) or real(*a, **k)
    convs = [[{"role": "user", "content": text}] for text in ("Hi.", "Count robots: one, two,", "Tell me more " * 5)]
    answers = {}
    for name, eng in (("torch", plain), ("ops", fused)):
        # one by one, then the three at once (one decode step carries every live row)
        alone = [eng.generate_ids(c, max_new_tokens=10, ignore_eos=True) for c in convs]
        handles = [eng.submit(c, max_new_tokens=10, ignore_eos=True) for c in convs]
        answers[name] = alone, [h.result() for h in handles]
    assert answers["ops"] == answers["torch"]
    assert answers["torch"][0] == answers["torch"][1]
    assert len(calls) >= 2 * len(convs) * 9  # every decode step of every layer went through the C code


def test_the_env_var_is_checked(monkeypatch):
    monkeypatch.setenv(decode_ops.ENV, "fast")
    with pytest.raises(ValueError, match="QVL_DECODE_OPS"):
        decode_ops.for_device("cpu")
    monkeypatch.setenv(decode_ops.ENV, "torch")
    assert decode_ops.for_device("cpu") is None
    monkeypatch.setenv(decode_ops.ENV, "auto")
    assert decode_ops.for_device("meta") is None and decode_ops.for_device("cpu") is not None


def test_bf16_decode_rows_are_as_close_to_fp32_as_torchs(tiny_ckpt, monkeypatch):
    """Teacher-forced through decode steps: KL(fp32 || bf16) per row, the C ops against torch's
    bf16 code. They round differently, so neither is the other's bits; the C code must not be
    further from the fp32 model (it keeps attention's probabilities in fp32)."""
    monkeypatch.setenv(decode_ops.ENV, "torch")
    ref_eng = qvl.load(tiny_ckpt, dtype="float32", max_seq_len=256)
    plain, fused = _engines(tiny_ckpt, monkeypatch, dtype="bfloat16", max_seq_len=256)
    kl = {"torch": [], "ops": []}
    for text in ("Hi.", "Count robots: one, two,", "Tell me more " * 5):
        msgs = [{"role": "user", "content": text}]
        answer = ref_eng.generate_ids(msgs, max_new_tokens=16, ignore_eos=True)
        ref = ref_eng.score(msgs, answer)[1:]  # row 0 comes from the prefill, the same code in both
        for name, eng in (("torch", plain), ("ops", fused)):
            got = eng.score(msgs, answer)[1:]
            kl[name].append((ref.exp() * (ref - got)).sum(-1))
    k_torch, k_ops = torch.cat(kl["torch"]).mean(), torch.cat(kl["ops"]).mean()
    assert k_torch > 0  # bf16 rounding shows: the comparison can tell the codes apart
    assert k_ops <= 1.5 * k_torch, (k_ops, k_torch)
