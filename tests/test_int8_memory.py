"""8-bit vision tower and 8-bit KV cache: each against its float original, at stated tolerances.

References: the rounding formulas written out in plain torch (codes and scales must be equal,
every value within half a step of the input), the float tower's features and the float cache's
attention output (relative error ||got - ref|| / ||ref|| and cosine per row; bounds are ~2-3x
what was measured: tiny 8.7e-3 rel / 0.99994 cos, qvl-toy 3.4e-3 / 0.99998, attention 1.6e-2),
and qvl-toy's answers with float everything (teacher-forced KL 4e-5 per token with the int8
cache, 2e-6 with the int8 tower, top-1 100%, greedy answers equal). With the int8 cache every
read of a position sees the same dequantized values, so the decode step modes, chunked prefill,
prefix-cache hits and batching must agree with each other as tightly as they do in float.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import qvl
from qvl.model.kv_cache import KVCache, dequantize_rows, quantize_rows
from qvl.model.vision import VisionTower
from qvl.quant.linear import Int8Linear
from qvl.runtime import vision_quant as vq
from qvl.scripts.default_model import TOY_MODEL

N_NEW = 10


def _rel(got, ref):
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def _image(seed, w=84, h=56):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _chat(seed, text="Describe this picture in detail."):
    return [{"role": "system", "content": "You look at pictures for a robot. Answer briefly. " * 4},
            {"role": "user", "content": [{"type": "image", "image": _image(seed)}, {"type": "text", "text": text}]}]


# --- the roundings, against plain formulas --------------------------------------------------

def test_kv_rows_round_as_the_plain_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 17, 64, generator=g) * torch.logspace(-3, 2, 17)[None, None, :, None]
    x[0, 0, 0] = 0  # an all-zero row
    q, s = quantize_rows(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (2, 3, 17, 1)
    want_s = (x.abs().amax(-1, keepdim=True) / 127).clamp(2.0**-24, 65504.0).half()
    want_q = torch.clamp(torch.round(x / want_s.float()), -127, 127).to(torch.int8)
    assert torch.equal(s, want_s) and torch.equal(q, want_q)
    back = dequantize_rows(q, s, torch.float32)
    assert torch.equal(back, q.float() * s.float())
    assert ((back - x).abs() <= s.float() / 2 * (1 + 1e-6)).all()
    assert not back[0, 0, 0].any()
    assert dequantize_rows(q, s, torch.bfloat16).dtype == torch.bfloat16


def test_vision_weights_round_as_the_plain_formula():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 96, generator=g) * torch.rand(40, 1, generator=g)
    w[3] = 0  # an all-zero row
    qw = vq.quantize_weight(w)
    s = (w.abs().amax(1) / 127).clamp(min=2.0**-14).half().float()  # [N]: fp16 values
    q = (w / s[:, None]).round() + 128
    assert q.min() >= 1 and q.max() <= 255
    assert qw.bits == 8 and qw.group_size == 96
    assert torch.equal(qw.scales[0].float(), s) and torch.equal(qw.q.float(), q)
    assert torch.equal(qw.zeros, torch.full((1, 40), 128, dtype=torch.int16))
    deq = s[:, None] * (q - 128)
    assert torch.equal(qw.dequantize(), deq)
    assert ((deq - w).abs() <= s[:, None] / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [3, 200])  # the int8 GEMV, and dequantize + dense GEMM
def test_int8_linear_computes_with_its_dequantized_weight(dtype, rows):
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(64, 96, generator=g), torch.randn(64, generator=g)
    lin = vq.int8_linear(w.to(dtype), b.to(dtype), dtype)
    x = torch.randn(rows, 96, generator=g).to(dtype)
    want = x.double() @ vq.quantize_weight(w.to(dtype)).dequantize(torch.float64).t() + b.to(dtype).double()
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the product rounded to 8 bits
    assert (lin(x).double() - want).abs().max() <= tol * want.abs().max()


def _close_to_whole(got, whole, dtype):
    """Blocked against whole-weight (or whole-batch) GEMMs: fp32 bit for bit where only the output
    columns are split, else within one bf16 (2^-8) / fp32 (1e-6) rounding of the largest output:
    oneDNN's bf16 GEMM and MKL's fp32 GEMM sum K in an order that depends on N and M (measured
    2.1e-3 and 1.9e-7 on [1024, 5120] x [5120, 1280])."""
    tol = 2.0**-8 if dtype == torch.bfloat16 else 1e-6
    assert (got.double() - whole.double()).abs().max() <= tol * whole.double().abs().max()


@pytest.mark.parametrize("kernel", ["auto", "dequant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, k, bias", [(5120, 5120, True), (1280, 5120, False), (3840, 1280, True)])
def test_int8_linear_dequantizes_a_block_of_outputs_at_a_time(kernel, dtype, n, k, bias):
    g = torch.Generator().manual_seed(3)
    w = (0.02 * torch.randn(n, k, generator=g)).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    lin = vq.int8_linear(w, b, dtype, kernel)
    whole = Int8Linear.from_weight(vq.quantize_weight(w), b, dtype, kernel)  # the layer's weight at once
    assert isinstance(lin, vq.VisionInt8Linear)
    rows = vq.block_rows(n, k, w.element_size())
    assert rows < n and rows % 4 == 0 and rows * k * w.element_size() <= vq.DEQUANT_BLOCK_BYTES
    x = torch.randn(200, k, generator=g).to(dtype)
    with torch.inference_mode():
        got, want = lin(x), whole(x)
        few = torch.equal(lin(x[:3]), whole(x[:3]))  # the GEMV rows: the parent's path
    assert few
    if dtype == torch.float32:
        assert torch.equal(got, want)
    else:
        _close_to_whole(got, want, dtype)


@pytest.mark.parametrize("windowed", [False, True], ids=["qwen2", "qwen25"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_mlp_over_chunks_of_patches_equals_the_whole_batch(windowed, dtype, monkeypatch):
    from qvl.model import vision
    from qvl.model.config import VisionConfig

    cfg = VisionConfig(depth=1, embed_dim=64, num_heads=4, hidden_size=96, intermediate_size=160,
                       variant="qwen2_5_vl" if windowed else "qwen2_vl")
    torch.manual_seed(0)
    blk = vision.VisionBlock(cfg).to(dtype).requires_grad_(False)
    x = torch.randn(600, 64).to(dtype)
    cos, sin = torch.randn(600, 16), torch.randn(600, 16)
    with torch.inference_mode():
        whole = blk(x, cos, sin, [0, 600])
        monkeypatch.setattr(vision, "MLP_CHUNK_BYTES", 64 * blk.hidden * x.element_size())
        assert vision.mlp_chunk_rows(blk.hidden, x.element_size()) == 64  # 10 chunks, the last one short
        got = blk(x, cos, sin, [0, 600])
        _close_to_whole(got, whole, dtype)
        # a traced block (the ONNX exporter's tracer) takes the plain path, so its graph runs any N
        mask = torch.ones(600, 600, dtype=torch.bool)
        traced = torch.jit.trace(lambda x, c, s, m: blk(x, c, s, None, m), (x, cos, sin, mask), check_trace=False)
        # more patches than traced: a loop fixed at 600 rows would leave the last 100 unwritten
        few = torch.cat([x, x[:100]]), torch.cat([cos, cos[:100]]), torch.cat([sin, sin[:100]]), torch.ones(700, 700, dtype=torch.bool)
        _close_to_whole(traced(*few), blk(*few[:3], None, few[3]), dtype)  # eager: chunked, traced: whole


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vision_rotary_over_chunks_of_patches_is_the_one_pass(dtype, monkeypatch):
    """Elementwise per patch, so chunks give the one pass's bits exactly (q as the attention has it:
    a strided view of qkv)."""
    from qvl.model import vision
    from qvl.model.rope import rotate_half

    g = torch.Generator().manual_seed(0)
    n, heads, dh = 600, 4, 16
    q = torch.randn(n, 3 * heads * dh, generator=g).to(dtype).view(n, 3, heads, dh).unbind(1)[0]
    c, s = torch.randn(n, 1, dh, generator=g), torch.randn(n, 1, dh, generator=g)
    want = (q.float() * c + rotate_half(q.float()) * s).to(dtype)
    monkeypatch.setattr(vision, "ROTARY_CHUNK_BYTES", 64 * heads * dh * 4)  # 10 chunks, the last one short
    calls = []
    real = vision.rotate_half
    monkeypatch.setattr(vision, "rotate_half", lambda t: calls.append(len(t)) or real(t))
    got = vision.vision_rotary(q, c, s)
    assert calls == [64] * 9 + [24]
    assert got.dtype == dtype and torch.equal(got, want)


# --- the int8 tower -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny25_ckpt(tmp_path_factory):
    from qvl.scripts.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny25"), weights="transformers", model_type="qwen2_5_vl")


# Qwen2.5-VL's tower (gated MLP, window attention) measured 9.2e-3 / 0.99993
@pytest.mark.parametrize("which, rel_max, cos_min", [("tiny", 2e-2, 0.9997), ("tiny25", 2e-2, 0.9997),
                                                     ("toy", 1e-2, 0.9999)])
def test_int8_tower_features_are_close_to_the_float_tower(which, rel_max, cos_min, request):
    ckpt = TOY_MODEL if which == "toy" else request.getfixturevalue(f"{which}_ckpt")
    ref = qvl.load(ckpt, prefix_cache_mb=0, max_seq_len=64)
    eng = qvl.load(ckpt, prefix_cache_mb=0, max_seq_len=64, vision_quant="int8")
    linears = [m for m in eng.model.visual.modules() if isinstance(m, Int8Linear)]
    assert linears and not any(type(m) is torch.nn.Linear for m in eng.model.visual.modules())
    patch = ref.model.cfg.vision.patch_dim
    for grids in ([(1, 8, 8)], [(1, 12, 20), (2, 8, 6)]):
        g = torch.tensor(grids)
        pv = torch.randn(int(g.prod(-1).sum()), patch, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            a, b = ref.model.visual.encode(pv, g), eng.model.visual.encode(pv, g)
        assert _rel(b, a) < rel_max
        assert F.cosine_similarity(a, b, dim=-1).min() > cos_min
    # the decoder is untouched
    assert torch.equal(eng.model.layers[0].mlp.up_proj.weight, ref.model.layers[0].mlp.up_proj.weight)


def test_tower_bytes_count_what_loading_holds(tiny_ckpt):
    for scheme in ("none", "int8"):
        eng = qvl.load(tiny_ckpt, prefix_cache_mb=0, max_seq_len=64, vision_quant=scheme)
        tower = eng.model.visual
        held = sum(p.numel() * p.element_size() for p in tower.parameters())
        held += sum(m.nbytes() for m in tower.modules() if isinstance(m, Int8Linear))
        with torch.device("meta"):
            meta = VisionTower(eng.model.cfg.vision)
        assert vq.tower_bytes(meta, torch.float32, scheme) == held
    with pytest.raises(ValueError, match="vision_quant 'int4'"):
        qvl.load(tiny_ckpt, max_seq_len=64, vision_quant="int4")


def test_quantize_vision_in_memory_equals_quantizing_at_load(tiny_ckpt):
    ref = qvl.load(tiny_ckpt, prefix_cache_mb=0, max_seq_len=64)
    eng = qvl.load(tiny_ckpt, prefix_cache_mb=0, max_seq_len=64, vision_quant="int8")
    vq.quantize_vision(ref.model.visual)
    g = torch.tensor([[1, 8, 12]])
    pv = torch.randn(96, ref.model.cfg.vision.patch_dim, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert torch.equal(ref.model.visual.encode(pv, g), eng.model.visual.encode(pv, g))


# --- the int8 KV cache ----------------------------------------------------------------------

def test_kv_bytes_for_counts_the_buffers():
    for dtype in (torch.float32, torch.bfloat16, torch.int8):
        c = KVCache(3, 2, 40, 64, dtype)
        held = sum(t.numel() * t.element_size() for t in c.tensors())
        assert KVCache.bytes_for(3, 2, 40, 64, 1, dtype) == held
    assert KVCache.bytes_for(3, 2, 40, 64, 5, "int8") == 5 * KVCache.bytes_for(3, 2, 40, 64, 1, torch.int8)
    # a 2B cache: 28 layers, 2 kv heads of 128, 4096 positions, one slot
    assert KVCache.bytes_for(1, 2, 4096, 128, 28, "int8") / KVCache.bytes_for(1, 2, 4096, 128, 28, torch.bfloat16) \
        == pytest.approx(130 / 256)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_cache_attention_is_close_to_the_float_cache(dtype):
    g = torch.Generator().manual_seed(4)
    b, h, d, s = 2, 2, 64, 48
    caches = {k: KVCache(b, h, s, d, dtype if k == "float" else torch.int8) for k in ("float", "int8")}
    k = (torch.randn(b, h, 40, d, generator=g) * 3 + torch.randn(1, h, 1, d, generator=g) * 5).to(dtype)
    v = torch.randn(b, h, 40, d, generator=g).to(dtype)
    q = torch.randn(b, 2 * h, 1, d, generator=g).to(dtype)
    out = {}
    for name, c in caches.items():
        c.update(torch.arange(0, 32), k[:, :, :32], v[:, :, :32])  # a prefill chunk
        for t in range(32, 40):  # decode steps, one position per row
            kk, vv = c.update(torch.full((b, 1), t), k[:, :, t : t + 1], v[:, :, t : t + 1], kv_len=t + 1)
        assert kk.dtype == dtype and kk.shape == (b, h, 40, d)
        if name == "float":
            assert torch.equal(kk, k) and torch.equal(vv, v)
        else:  # what was read is the plain formula's dequantization of what was written
            (kq, ks), (vq_, vs) = quantize_rows(k), quantize_rows(v)
            assert torch.equal(kk, dequantize_rows(kq, ks, dtype)) and torch.equal(vv, dequantize_rows(vq_, vs, dtype))
        out[name] = F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)
    # keys with a per-head offset (as Qwen2's k bias gives) make the softmax peaked: measured 1.6e-2
    assert _rel(out["int8"], out["float"]) < 3e-2
    assert caches["int8"].k.dtype == torch.int8 and caches["int8"].k_scale.dtype == torch.float16


@pytest.fixture(scope="module")
def convs():
    return {"image": _chat(0), "other": _chat(1, "What colour is it?"), "text": [
        {"role": "user", "content": "Tell me a long story about robots that learn to count. " * 5}]}


@pytest.mark.parametrize("decode_kv", ["full", "live"])
def test_int8_cache_decode_modes_and_chunks_agree(tiny_ckpt, convs, decode_kv):
    ref = qvl.load(tiny_ckpt, max_seq_len=512, kv_cache_dtype="int8", decode_kv="live", prefix_cache_mb=0)
    eng = qvl.load(tiny_ckpt, max_seq_len=512, kv_cache_dtype="int8", decode_kv=decode_kv, prefill_chunk=7,
                   prefix_cache_mb=0)
    assert eng.model.layers[0].self_attn.kv_cache.k.dtype == torch.int8
    for conv in convs.values():
        answer = ref.generate_ids(conv, max_new_tokens=N_NEW, ignore_eos=True)
        assert eng.generate_ids(conv, max_new_tokens=N_NEW, ignore_eos=True) == answer
        torch.testing.assert_close(eng.score(conv, answer), ref.score(conv, answer), atol=1e-5, rtol=1e-5)


def test_int8_cache_prefix_hits_equal_misses_and_batches_equal_one_by_one(tiny_ckpt, convs):
    on = qvl.load(tiny_ckpt, max_seq_len=1024, max_batch=4, kv_cache_dtype="int8", prefix_cache_mb=64)
    off = qvl.load(tiny_ckpt, max_seq_len=1024, max_batch=1, kv_cache_dtype="int8", prefix_cache_mb=0)
    order = ["image", "other", "image", "text", "other"]
    alone = [off.generate_ids(convs[n], max_new_tokens=N_NEW, ignore_eos=True) for n in order]
    for _ in range(2):  # the second round starts from the rows the first left in the prefix cache
        assert [on.generate_ids(convs[n], max_new_tokens=N_NEW, ignore_eos=True) for n in order] == alone
    assert on._core.runner.prefix.hits > 0
    assert on.generate_ids([convs[n] for n in order], max_new_tokens=N_NEW, ignore_eos=True) == alone  # batched
    held = on._core.runner.prefix._entries
    assert all(len(e.rows[0]) == 4 for e in held.values())  # codes and scales of k and v
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp8'"):
        qvl.load(tiny_ckpt, max_seq_len=64, kv_cache_dtype="fp8")


def test_toy_answers_with_the_int8_cache_and_tower_stay_within_kl():
    from qvl.export.synth import TASKS, make_sample

    ref = qvl.load(TOY_MODEL, max_seq_len=1024, prefix_cache_mb=0)
    engines = {"kv": qvl.load(TOY_MODEL, max_seq_len=1024, prefix_cache_mb=0, kv_cache_dtype="int8"),
               "tower": qvl.load(TOY_MODEL, max_seq_len=1024, prefix_cache_mb=0, vision_quant="int8")}
    samples = [make_sample(TASKS[i % len(TASKS)], i, seed=7) for i in range(6)]
    for name, eng in engines.items():
        kl = top1 = n = same = 0
        for s in samples:
            answer = ref.tokenizer.encode(s.answer)
            a, t = ref.text_logprobs(s.messages(), answer)
            b, _ = eng.text_logprobs(s.messages(), answer)
            kl += float((a.exp() * (a - b)).sum())
            top1 += int((a.argmax(-1) == b.argmax(-1)).sum())
            n += len(t)
            same += ref.generate_ids(s.messages(), max_new_tokens=16) == eng.generate_ids(s.messages(), max_new_tokens=16)
        assert kl / n < 5e-4, name  # measured 4e-5 (cache), 2e-6 (tower)
        assert top1 / n >= 0.99, name
        assert same >= len(samples) - 1, name  # measured: all equal


# --- the ONNX 8-bit tower -------------------------------------------------------------------

def test_onnx_int8_tower_is_close_to_the_float_tower(tiny_ckpt, tmp_path):
    pytest.importorskip("onnxruntime")
    from qvl.export.onnx import export_onnx
    from qvl.runtime.manifest import read_manifest
    from qvl.runtime.onnx_vision import OnnxVision

    out = export_onnx(tiny_ckpt, tmp_path / "art", vision_quant="int8")
    sec = read_manifest(out)["vision_onnx"]
    assert sec["vision_quant"] == "int8" and sec["validation"]["max_rel"] < 2e-2
    onnx_tower = qvl.load(out, vision_backend="onnx", max_seq_len=64).vision
    assert isinstance(onnx_tower, OnnxVision)
    ref = qvl.load(tiny_ckpt, prefix_cache_mb=0, max_seq_len=64)
    q8 = qvl.load(tiny_ckpt, prefix_cache_mb=0, max_seq_len=64, vision_quant="int8")
    g = torch.tensor([[1, 12, 20], [2, 8, 6]])
    pv = torch.randn(int(g.prod(-1).sum()), ref.model.cfg.vision.patch_dim, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        a, b = ref.model.visual.encode(pv, g), q8.model.visual.encode(pv, g)
    got = onnx_tower.encode(pv, g)
    assert _rel(got, a) < 2e-2 and F.cosine_similarity(a, got, dim=-1).min() > 0.9997  # vs the float tower
    assert _rel(got, b) < 1e-5  # the same codes as the torch int8 tower: fp32 summation order only
    import onnx

    graph = onnx.load(str(out / "vision.onnx")).graph
    inits = {t.name: t.data_type for t in graph.initializer}
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    assert gemms and not any(n.input[1] in inits for n in gemms)  # no float weight left on a Gemm
    n_dq = sum(n.op_type == "DequantizeLinear" for n in graph.node)
    assert n_dq == len(gemms) == sum(isinstance(m, Int8Linear) for m in q8.model.visual.modules())
    assert sum(t == onnx.TensorProto.UINT8 for t in inits.values()) == 2 * n_dq  # codes and zero points
    with pytest.raises(ValueError, match="vision_quant applies to the torch tower"):
        qvl.load(out, vision_backend="onnx", vision_quant="int8", max_seq_len=64)
