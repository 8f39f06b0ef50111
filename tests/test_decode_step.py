"""The decode step's layers as one C call (qvl.quant.decode_step, step.c) against the
per-operation path it replaces (the layers' ``decode`` through qvl.quant.decode_ops, which
test_decode_ops.py holds to the torch code, and that to transformers).

Stated tolerance: none. Both paths call the same C functions with the same arguments in the same
order, so the final hidden states and every KV-cache row written are equal bit for bit, for both
CPU kernels (qvl-a8, qvl), 4- and 8-bit weights, fp32 and bf16 activations, a float or an int8
cache, q/k/v and gate/up joined or as parts, several rows at their own lengths and cache rows.
"""

import pathlib

import pytest
import torch

import qvl
from qvl.quant import cpu, decode_ops, decode_step
from qvl.runtime.loader import load_model

pytestmark = pytest.mark.skipif(cpu.library() is None, reason=f"qvl's CPU library: {cpu.unavailable()}")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_ckpt):
    from qvl.bench.quant import _write_quantized

    out = {}
    for kind in ("gptq-int4", "gptq-int8"):
        d = tmp_path_factory.mktemp(f"tiny_{kind}")
        _write_quantized(pathlib.Path(tiny_ckpt), d, kind, 64)
        out[kind] = d
    return out


def _model(path, kernel, dtype, kv, slots=4, seq=40):
    m = load_model(path, dtype=dtype, quant_kernel=kernel)
    m.setup_caches(slots, seq, torch.int8 if kv == "int8" else getattr(torch, dtype))
    g = torch.Generator().manual_seed(3)
    for layer in m.layers:  # cached keys and values from earlier steps
        for t in layer.self_attn.kv_cache.tensors():
            if t.dtype == torch.int8:
                t.copy_(torch.randint(-127, 128, t.shape, generator=g, dtype=torch.int8))
            elif t.dtype == torch.float16:  # int8 rows' scales
                t.copy_((torch.rand(t.shape, generator=g) * 0.02 + 0.001).half())
            else:
                t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
    return m


def _inputs(m, lengths, dtype):
    """One token a row at its own length: embeds, M-RoPE ids, write positions, mask."""
    b, length = len(lengths), max(lengths) + 1
    write = torch.tensor(lengths)[:, None]
    tokens = torch.arange(b) * 7 + 5
    positions = (write + torch.tensor([0, 3, 1, 2])[:b, None]).view(1, b, 1).expand(3, b, 1)  # + rope deltas
    mask = (torch.arange(length)[None] <= write)[:, None, None]
    return m.embed_tokens(tokens[:, None]).to(getattr(torch, dtype)), positions, write, mask, length


def _both(m, inputs, row):
    """The step through the one-call loop and through the per-operation calls, from the same caches."""
    caches = [[t.clone() for t in layer.self_attn.kv_cache.tensors()] for layer in m.layers]
    out = {}
    for whole in (True, False):
        for layer, saved in zip(m.layers, caches):
            for t, s in zip(layer.self_attn.kv_cache.tensors(), saved):
                t.copy_(s)
        m.decode_ops = decode_ops.CpuDecodeOps(whole_step=whole)
        hidden = m(*inputs, row=row)
        assert (m.decode_ops._plan is not None) == whole
        out[whole] = hidden, [t.clone() for layer in m.layers for t in layer.self_attn.kv_cache.tensors()]
    before = [t for saved in caches for t in saved]
    assert all(any(not torch.equal(a, b) for a, b in zip(o[1], before)) for o in out.values())  # rows written
    return out[True], out[False]


@pytest.mark.parametrize("kind", ["gptq-int4", "gptq-int8"])
@pytest.mark.parametrize("kernel", ["qvl-a8", "qvl"])
@pytest.mark.parametrize("dtype,kv", [("float32", "model"), ("bfloat16", "model"), ("bfloat16", "int8")])
def test_one_call_equals_the_per_operation_calls(quantized, kind, kernel, dtype, kv):
    m = _model(quantized[kind], kernel, dtype, kv)
    with torch.no_grad():
        for lengths, row in (([17], 0), ([5, 30, 12], 1)):
            (h_one, c_one), (h_ops, c_ops) = _both(m, _inputs(m, lengths, dtype), row)
            assert h_one.dtype == getattr(torch, dtype) and h_one.shape == (len(lengths), 1, 64)
            assert torch.equal(h_one, h_ops)
            assert all(torch.equal(a, b) for a, b in zip(c_one, c_ops))


@pytest.mark.parametrize("kernel", ["qvl-a8", "qvl"])
def test_linears_as_parts_give_the_same_bits(quantized, kernel):
    """q/k/v and gate/up unjoined (the layout a model gets where its parts cannot be concatenated)."""
    m = _model(quantized["gptq-int4"], kernel, "bfloat16", "model")
    for layer in m.layers:
        layer.self_attn.wqkv = layer.mlp.w_gate_up = None
    inputs = _inputs(m, [9, 21], "bfloat16")
    with torch.no_grad():
        (h_one, c_one), (h_ops, c_ops) = _both(m, inputs, 2)
        assert torch.equal(h_one, h_ops) and all(torch.equal(a, b) for a, b in zip(c_one, c_ops))
        ops = m.decode_ops = decode_ops.CpuDecodeOps()
        m(*inputs, row=2)
    assert (ops._plan.layers[0].n_qkv, ops._plan.layers[0].n_gate_up) == (3, 2)


def test_the_plan_follows_the_model(quantized):
    m = _model(quantized["gptq-int4"], "qvl-a8", "bfloat16", "model")
    ops = m.decode_ops = decode_ops.CpuDecodeOps()
    inputs = _inputs(m, [4], "bfloat16")
    with torch.no_grad():
        m(*inputs)
        first = ops._plan
        m(*inputs)
        assert ops._plan is first  # made once
        m.setup_caches(4, 40, torch.bfloat16)  # new cache buffers: the old addresses are gone
        m(*inputs)
        assert ops._plan is not first and ops._plan.layers[0].k_cache == m.layers[0].self_attn.kv_cache.k.data_ptr()


def test_models_it_cannot_run_keep_the_per_operation_calls(tiny_ckpt, quantized):
    m = load_model(tiny_ckpt, dtype="bfloat16")  # float linears
    m.setup_caches(2, 16, torch.bfloat16)
    ops = m.decode_ops = decode_ops.CpuDecodeOps()
    with torch.no_grad():
        hidden = m(*_inputs(m, [3], "bfloat16"))
    assert ops._plan is None and "not quantized" in ops.refused_reason and hidden.shape == (1, 1, 64)
    q = _model(quantized["gptq-int4"], "qvl", "bfloat16", "model")
    assert decode_step.unsupported_reason(q, torch.float32) == "a torch.bfloat16 final norm"
    q.layers[1].mlp.down_proj.perm = torch.arange(128)
    assert decode_step.unsupported_reason(q, torch.bfloat16) == "layer 1: an act-order linear (its columns permuted)"
    q.layers[1].mlp.down_proj.perm = None
    plan = decode_step.LayerPlan(q, torch.bfloat16, cpu.library())
    assert plan.max_rows == cpu.GEMV_MAX_M and plan.supports(8) and not plan.supports(9)
    emb, positions, write, mask, _ = _inputs(q, [3], "bfloat16")
    cos, sin = q.rope(positions, emb.dtype)
    with pytest.raises(ValueError, match="cache rows 4..4 outside"):
        plan(emb, cos, sin, mask, write, 4)


def test_an_engine_answers_the_same_and_runs_the_one_call(quantized, monkeypatch):
    calls = []
    real = decode_step.LayerPlan.__call__
    monkeypatch.setattr(decode_step.LayerPlan, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    answers = {}
    convs = [[{"role": "user", "content": text}] for text in ("Hi.", "Count robots: one, two,", "Tell me more " * 5)]
    for choice in ("ops", "auto"):
        monkeypatch.setenv(decode_ops.ENV, choice)
        eng = qvl.load(quantized["gptq-int4"], dtype="bfloat16", quant_kernel="qvl-a8", max_seq_len=128, max_batch=3)
        alone = [eng.generate_ids(c, max_new_tokens=8, ignore_eos=True) for c in convs]
        handles = [eng.submit(c, max_new_tokens=8, ignore_eos=True) for c in convs]
        answers[choice] = alone, [h.result() for h in handles]
        eng.close()
        if choice == "ops":
            assert not calls
    assert answers["auto"] == answers["ops"]
    assert len(calls) >= 2 * 7  # the decode steps alone, then batched
