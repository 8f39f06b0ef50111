"""End to end: quantized checkpoints in the official AWQ / GPTQ layouts load with qvl.load and
generate exactly what a float checkpoint holding their dequantized weights generates.

The checkpoints are built here from the tiny fixture: decoder linears RTN-quantized by the
reference quantizers and packed by the loop-based writers of tests/quant_ref.py (not by
qvl.quant), config.json's quantization_config as in Qwen's Qwen2-VL-*-AWQ / -GPTQ-Int4 /
-GPTQ-Int8 releases (group size 32 instead of 128 to fit the toy dims).
"""

import json
import re
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import qvl
import quant_ref as ref
from qvl.model.config import ConfigError
from qvl.quant.linear import QuantLinear
from qvl.runtime.loader import load_model
from qvl.runtime.weights import Checkpoint, CheckpointError

LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
N_NEW = 12

AWQ_CONFIG = {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 32, "zero_point": True,
              "modules_to_not_convert": ["visual"]}


def gptq_config(bits, group=32, sym=True, desc_act=False):
    return {"bits": bits, "group_size": group, "damp_percent": 0.1, "desc_act": desc_act, "sym": sym,
            "true_sequential": True, "dataset": None, "modules_in_block_to_quantize": None,
            "quant_method": "gptq", "checkpoint_format": "gptq"}


VARIANTS = {
    "awq": AWQ_CONFIG,
    "gptq-int4": gptq_config(4),
    "gptq-int8": gptq_config(8),
    "gptq-int4-actorder-asym": gptq_config(4, sym=False, desc_act=True),
    "gptq-int8-asym-rowwise": gptq_config(8, group=-1, sym=False),
}


def write_pair(src, root, name, qcfg, keep_float=()):
    """(quantized dir, float dir of the dequantized weights), both complete checkpoints."""
    sd = load_file(src / "model.safetensors")
    quant, dense = {}, {}
    g = torch.Generator().manual_seed(len(name))
    half = qcfg["quant_method"] == "awq"  # like the official AWQ release: float tensors in fp16
    for key, t in sd.items():
        if half:
            t = t.half()
        if not LINEAR.match(key) or key[:-len(".weight")] in keep_float:
            quant[key] = dense[key] = t
            continue
        prefix, w = key[:-len(".weight")], sd[key].float()
        bits, group = qcfg["bits"], qcfg["group_size"]
        if qcfg["quant_method"] == "awq":
            q, zeros, scales = ref.rtn_awq(w, group)
            g_idx = torch.arange(w.shape[1]) // group
            quant |= {f"{prefix}.qweight": ref.awq_write(q), f"{prefix}.qzeros": ref.awq_write(zeros),
                      f"{prefix}.scales": scales}
        else:
            order = torch.randperm(w.shape[1], generator=g) if qcfg["desc_act"] else None
            q, zeros, scales, g_idx = ref.rtn_gptq(w, group, bits, qcfg["sym"], order)
            quant |= {f"{prefix}.qweight": ref.gptq_write_rows(q, bits),
                      f"{prefix}.qzeros": ref.gptq_write_zeros(zeros, bits), f"{prefix}.scales": scales,
                      f"{prefix}.g_idx": g_idx}
        dense[key] = ref.dequant(q, zeros, scales, g_idx)
        if f"{prefix}.bias" in sd:  # quantizers keep biases in fp16
            quant[f"{prefix}.bias"] = sd[f"{prefix}.bias"].half()
            dense[f"{prefix}.bias"] = quant[f"{prefix}.bias"].float()
    for sub, tensors in (("quant", quant), ("float", dense)):
        d = root / name / sub
        shutil.copytree(src, d)
        save_file({k: v.contiguous() for k, v in tensors.items()
                   if not (sub == "float" and k.endswith(".bias") and k not in dense)},
                  d / "model.safetensors", metadata={"format": "pt"})
        if sub == "quant":
            cfg = json.loads((d / "config.json").read_text())
            cfg["quantization_config"] = qcfg
            if half:
                cfg["torch_dtype"] = "float16"
            (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return root / name / "quant", root / name / "float"


@pytest.fixture(scope="module")
def pairs(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    return {name: write_pair(tiny_ckpt, root, name, qcfg) for name, qcfg in VARIANTS.items()}


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    g = torch.Generator().manual_seed(7)
    p = tmp_path_factory.mktemp("img") / "a.png"
    Image.fromarray((torch.rand(112, 168, 3, generator=g) * 255).to(torch.uint8).numpy()).save(p)
    return p


def _messages(image):
    return [{"role": "user", "content": [{"type": "image", "image": str(image)},
                                         {"type": "text", "text": "Describe this picture."}]}]


def _tokens(path, dtype, image):
    eng = qvl.load(path, dtype=dtype, max_seq_len=256)
    return eng, eng.generate_ids(_messages(image), max_new_tokens=N_NEW, ignore_eos=True)


def _decoder_linears(model):
    return {n: m for n, m in model.named_modules() if re.fullmatch(r"layers\.\d+\.(self_attn|mlp)\.\w+_proj", n)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_greedy_tokens_as_dequantized_float(pairs, image, variant):
    """fp32: W is exact in fp32 on every path and only the order of the sums differs (qvl's
    kernel sums q * x per group, then scales), so tokens (image + text) match exactly."""
    qdir, fdir = pairs[variant]
    qeng, qtok = _tokens(qdir, "float32", image)
    assert qtok == _tokens(fdir, "float32", image)[1]
    linears = _decoder_linears(qeng.model)
    assert len(linears) == 14 and all(isinstance(m, QuantLinear) for m in linears.values())
    assert {m.bits for m in linears.values()} == {VARIANTS[variant]["bits"]}
    vision = [m for m in qeng.model.visual.modules() if isinstance(m, (nn.Linear, QuantLinear))]
    assert vision and all(type(m) is nn.Linear for m in vision)
    assert isinstance(qeng.model.lm_head, nn.Linear) and not isinstance(qeng.model.lm_head, QuantLinear)


def _logits(path, ids):
    m = load_model(path, dtype="bfloat16")
    m.setup_caches(1, ids.shape[1], torch.bfloat16)
    n = ids.shape[1]
    with torch.no_grad():
        out = m.logits(m(m.embed_tokens(ids), torch.arange(n).expand(3, 1, -1), torch.arange(n), None, n))
    return m, out[0].float()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bf16_kernel_matches_dequantized_float(pairs, variant):
    """bf16 runs a kernel (qvl's, or torch's int4). The toy model's logits are small and close
    together, so bf16 rounding (in either model) flips near-ties: compare logits over 32
    teacher-forced positions (2% of their range), and the argmax wherever the float model's
    top-2 gap exceeds that noise (as vLLM's check_logprobs_close does at divergences)."""
    qdir, fdir = pairs[variant]
    ids = torch.randint(3, 400, (1, 32), generator=torch.Generator().manual_seed(0))
    qm, got = _logits(qdir, ids)
    _, want = _logits(fdir, ids)
    # a kernel (qvl's where it builds and takes the group, else torch's int4), never dequantize
    assert {m.kernel for m in _decoder_linears(qm).values()} <= {"qvl", "int4pack"}
    tol = 0.02 * want.abs().max().item()
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    top2 = want.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 2 * tol
    assert decisive.sum() >= 8
    assert torch.equal(got.argmax(-1)[decisive], want.argmax(-1)[decisive])


def test_resident_weight_bytes(pairs):
    for variant, bits in (("gptq-int4", 4), ("gptq-int8", 8)):
        model = load_model(pairs[variant][0], dtype="bfloat16")
        linears = _decoder_linears(model).values()
        fp16 = sum(2 * m.in_features * m.out_features for m in linears)
        packed = sum(m.nbytes() for m in linears)
        # bits/16 of fp16, plus bf16 scale+zero pairs every 32 weights (4 bytes / 32) and biases
        assert bits / 16 < packed / fp16 < bits / 16 + 4 / 32 / 2 * (2 if bits == 8 else 1) + 0.01


def test_transformers5_key_names(pairs, image, tmp_path):
    qdir, _ = pairs["awq"]
    d = shutil.copytree(qdir, tmp_path / "v5")
    sd = load_file(d / "model.safetensors")
    renamed = {("model." + k if k.startswith("visual.") else re.sub(r"^model\.", "model.language_model.", k)): v
               for k, v in sd.items()}
    save_file(renamed, d / "model.safetensors", metadata={"format": "pt"})
    assert "model.language_model.layers.0.mlp.up_proj.qweight" in renamed and "lm_head.weight" in renamed
    assert any(k.startswith("model.visual.blocks.") for k in renamed)
    assert _tokens(d, "bfloat16", image)[1] == _tokens(qdir, "bfloat16", image)[1]


def test_modules_to_not_convert(tiny_ckpt, image, tmp_path):
    keep = ("model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj")
    qcfg = {**gptq_config(4), "modules_to_not_convert": list(keep)}
    qdir, fdir = write_pair(tiny_ckpt, tmp_path, "skip", qcfg, keep_float=keep)
    qeng, qtok = _tokens(qdir, "float32", image)
    linears = _decoder_linears(qeng.model)
    assert not isinstance(linears["layers.1.mlp.down_proj"], QuantLinear)
    assert not isinstance(linears["layers.0.self_attn.k_proj"], QuantLinear)
    assert sum(isinstance(m, QuantLinear) for m in linears.values()) == 12
    assert qtok == _tokens(fdir, "float32", image)[1]


def _edit(qdir, tmp_path, fn=None, cfg_fn=None):
    d = shutil.copytree(qdir, tmp_path / "edited")
    if fn:
        sd = load_file(d / "model.safetensors")
        fn(sd)
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    if cfg_fn:
        cfg = json.loads((d / "config.json").read_text())
        cfg_fn(cfg["quantization_config"])
        (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_missing_quant_tensor_is_named(pairs, tmp_path):
    d = _edit(pairs["gptq-int4"][0], tmp_path, lambda sd: sd.pop("model.layers.0.self_attn.q_proj.qzeros"))
    with pytest.raises(CheckpointError, match=r"lacks tensors \['layers.0.self_attn.q_proj.qzeros'\]"):
        load_model(d)


def test_float_weight_where_quantized_expected(pairs, tmp_path):
    d = _edit(pairs["gptq-int4"][0], tmp_path,
              lambda sd: sd.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(128, 64)))
    with pytest.raises(CheckpointError, match=r"layers.0.mlp.up_proj a gptq 4-bit linear, which has no 'weight'"):
        load_model(d)


def test_group_size_mismatch_is_named(pairs, tmp_path):
    d = _edit(pairs["awq"][0], tmp_path, cfg_fn=lambda q: q.__setitem__("group_size", 64))
    with pytest.raises(CheckpointError, match=r"qzeros.*shape \[2, 8\].*group_size 64 needs \[1, 8\]"):
        load_model(d)


@pytest.mark.parametrize("change,match", [
    ({"version": "gemv"}, "AWQ version 'gemv'"),
    ({"quant_method": "gptq", "bits": 3}, "GPTQ bits=3"),
    ({"quant_method": "gptq", "checkpoint_format": "gptq_v2"}, "gptq_v2"),
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes'"),
])
def test_unsupported_configs_are_named(pairs, tmp_path, change, match):
    d = _edit(pairs["awq"][0], tmp_path, cfg_fn=lambda q: q.update(change))
    with pytest.raises(ConfigError, match=match):
        load_model(d)


def test_released_pages_read_back(pairs, monkeypatch):
    # the loader drops the packed tensors' pages after repacking; the file still backs them
    from qvl.runtime import weights

    monkeypatch.setattr(weights, "COPY_BELOW", 0)  # every tensor a view of the mapping
    ckpt = Checkpoint(pairs["gptq-int4"][0])
    name = "model.embed_tokens.weight"  # large enough to span whole pages
    view = ckpt.get(name)
    assert weights._file_mapping(view.data_ptr(), view.data_ptr() + view.numel() * view.element_size())
    before = view.clone()
    ckpt.release(name)
    assert torch.equal(view, before) and torch.equal(ckpt.get(name), before)


def test_small_tensors_are_read_not_mapped(pairs, monkeypatch):
    """Under COPY_BELOW bytes a tensor is read into memory of its own (a view's first touch maps
    the page-cache folio around it, up to 2 MiB); its values are the mapped view's, writes stay
    in the copy, and the larger ones are still views."""
    from qvl.runtime import weights

    path = pairs["gptq-int4"][0]
    names = list(Checkpoint(path).keys())
    monkeypatch.setattr(weights, "COPY_BELOW", 0)
    mapped = Checkpoint(path)
    views = {n: mapped.get(n) for n in names}
    monkeypatch.setattr(weights, "COPY_BELOW", 4096)
    ckpt = Checkpoint(path)
    small = 0
    for n in names:
        t, v = ckpt.get(n), views[n]
        nbytes = t.numel() * t.element_size()
        assert t.dtype == v.dtype and t.shape == v.shape and torch.equal(t, v), n
        in_file = weights._file_mapping(t.data_ptr(), t.data_ptr() + max(nbytes, 1))
        assert in_file == (nbytes >= 4096), n
        small += nbytes < 4096
        if 0 < nbytes < 4096:
            t.view(-1)[0] = t.view(-1)[0] + 1 if t.dtype != torch.bool else ~t.view(-1)[0]
            assert not torch.equal(ckpt.get(n), t), n  # the next read is the file's bytes again
    assert small > 10
    # a matrix (a linear's weight) of MATRIX_MAPPED_FROM bytes and more stays mapped below COPY_BELOW
    monkeypatch.setattr(weights, "COPY_BELOW", 1 << 30)
    monkeypatch.setattr(weights, "MATRIX_MAPPED_FROM", 4096)
    ckpt = Checkpoint(path)
    kinds = set()
    for n in names:
        t = ckpt.get(n)
        nbytes = t.numel() * t.element_size()
        if nbytes == 0:
            continue
        in_file = weights._file_mapping(t.data_ptr(), t.data_ptr() + nbytes)
        assert in_file == (t.dim() == 2 and nbytes >= 4096), n
        kinds.add((t.dim() == 2, in_file))
    assert {(True, True), (False, False)} <= kinds


@pytest.mark.parametrize("kernel", ["int4pack", "dequant"])
def test_static_decode_step_traces_as_one_graph(pairs, kernel):
    """The decode step in the form CUDA graphs capture (fixed shapes; the whole static cache read
    under a mask; cache slot and positions as tensors) traces into one graph with the quantized
    linears' GPU code paths (torch's int4 kernel, dequantize per call): dynamo with
    fullgraph=True fails on any graph break or host sync. Traced here on the CPU (no GPU in
    CI); two slots reuse the one graph, and it computes what eager does. qvl's CPU kernel is
    a ctypes call, outside this (CPU-only) contract."""
    from torch._dynamo.testing import CompileCounter

    qdir, _ = pairs["gptq-int4"]
    m = load_model(qdir, dtype="bfloat16", quant_kernel=kernel)
    assert {x.kernel for x in _decoder_linears(m).values()} == {kernel}
    seq, prompt = 16, 4
    m.setup_caches(1, seq, torch.bfloat16)
    ids = torch.tensor([[5, 17, 42, 9]])
    pos = torch.arange(prompt)
    with torch.no_grad():
        m(m.embed_tokens(ids), pos.expand(3, 1, -1), pos, None, prompt)

    def step(tok, positions, slot, mask):
        return m.logits(m(m.embed_tokens(tok), positions, slot, mask, None)[:, -1])

    counter = CompileCounter()
    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for slot in (prompt, prompt + 1):
            args = (torch.tensor([[7 + slot]]), torch.full((3, 1, 1), slot), torch.tensor([slot]),
                    (torch.arange(seq) <= slot)[None, None, None])
            want = step(*args)  # both write the same keys / values into the slot
            assert torch.equal(compiled(*args), want)
    assert counter.frame_count == 1
    torch._dynamo.reset()
