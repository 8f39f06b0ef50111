"""``qvl export gptq|awq``: artifacts in the official layouts, read back by the independent
format readers of tests/quant_ref.py, loaded by qvl, resumable, atomic, with a manifest."""

import json
import re

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import qvl
import quant_ref as ref
from qvl.export import quantize as xq
from qvl.export.calib import default_samples, load_samples
from qvl.export.layerwise import LINEARS, LayerwiseModel, QuantSpec, first_layer_inputs
from qvl.cli import main as cli_main
from qvl.runtime.manifest import file_digest, read_manifest

SPECS = {
    "gptq4": QuantSpec("gptq", "gptq", 4, 32, sym=True),
    "gptq8": QuantSpec("gptq", "gptq", 8, 32, sym=True),
    "gptq4-actorder-asym": QuantSpec("gptq", "gptq", 4, 32, sym=False, desc_act=True),
    "rtn4": QuantSpec("rtn", "gptq", 4, 32, sym=True),
    "awq": QuantSpec("awq", "awq", 4, 32, sym=False),
    "rtn-awq": QuantSpec("rtn", "awq", 4, 32, sym=False),
}
LINEAR_FILE = re.compile(r"^model\.layers\.(\d+)\.((self_attn|mlp)\.\w+_proj)\.(\w+)$")


@pytest.fixture(scope="module")
def exports(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {name: xq.export_quantized(tiny_ckpt, root / name, spec, calib_samples=16, quality_samples=3)
            for name, spec in SPECS.items()}


def _layer_errors(path):
    return [layer["output_rel_mse"] for layer in read_manifest(path)["quantization"]["layers"]]


def test_config_and_files(exports, tiny_ckpt):
    src_cfg = json.loads((tiny_ckpt / "config.json").read_text())
    for name, out in exports.items():
        cfg = json.loads((out / "config.json").read_text())
        qc = cfg.pop("quantization_config")
        assert qc == xq.quantization_config(SPECS[name])
        assert cfg["torch_dtype"] == "float16"
        assert {k: v for k, v in cfg.items() if k != "torch_dtype"} == \
            {k: v for k, v in src_cfg.items() if k != "torch_dtype"}
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.json", "preprocessor_config.json",
                  "generation_config.json"):
            assert (out / f).read_bytes() == (tiny_ckpt / f).read_bytes()
        assert not list(out.parent.glob(f".{out.name}*")), "work directory left behind"
    awq_cfg = json.loads((exports["awq"] / "config.json").read_text())["quantization_config"]
    assert awq_cfg == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 32, "zero_point": True,
                       "modules_to_not_convert": ["visual", "model.visual"]}


def test_tensors_read_by_independent_reader(exports, tiny_ckpt):
    """Every packed linear decodes, with the loop-based readers written from the format
    descriptions, to the weight the qvl runtime computes with, and that weight is close to the
    source's; everything else is the source tensor in fp16."""
    src = load_file(tiny_ckpt / "model.safetensors")
    for name, out in exports.items():
        spec = SPECS[name]
        t = load_file(out / "model.safetensors")
        model = qvl.load(out, dtype="float32", max_seq_len=64).model
        seen = set()
        for key, v in t.items():
            m = LINEAR_FILE.match(key)
            if not m or m.group(4) == "bias":
                assert key in src, key
                if spec.method == "awq" and "layernorm" in key:  # AWQ folds its scales into the norms
                    continue
                assert v.dtype == torch.float16 and torch.equal(v, src[key].half()), key
                continue
            prefix = key.rsplit(".", 1)[0]
            if prefix in seen:
                continue
            seen.add(prefix)
            if spec.fmt == "awq":
                q, z = ref.awq_read(t[prefix + ".qweight"]), ref.awq_read(t[prefix + ".qzeros"])
                g_idx = torch.arange(q.shape[0]) // spec.group_size
            else:
                q = ref.gptq_read_rows(t[prefix + ".qweight"], spec.bits)
                z = ref.gptq_read_zeros(t[prefix + ".qzeros"], spec.bits)
                g_idx = t[prefix + ".g_idx"]
            w = ref.dequant(q, z, t[prefix + ".scales"], g_idx)
            ours = model.get_submodule(f"layers.{m.group(1)}.{m.group(2)}")
            torch.testing.assert_close(ours.dequantize(torch.float32), w, rtol=0, atol=1e-6)
            w_src = src[prefix + ".weight"].float()
            rel = float((w - w_src).norm() / w_src.norm())
            limit = 0.02 if spec.bits == 8 else 0.25  # AWQ's rescaling moves weight between layers
            assert rel < limit, (name, prefix, rel)
            assert prefix + ".weight" not in t
        assert len(seen) == 2 * len(LINEARS)


def test_search_beats_rtn(exports):
    """On every layer, GPTQ's and AWQ's output error is below RTN's with the same grid."""
    for algo, base in (("gptq4", "rtn4"), ("awq", "rtn-awq")):
        for e, r in zip(_layer_errors(exports[algo]), _layer_errors(exports[base])):
            assert e < 0.7 * r, (algo, e, r)


def test_manifest(exports, tiny_ckpt):
    m = read_manifest(exports["gptq8"])
    assert m["source"]["checkpoint_sha256"] == qvl.runtime.manifest.checkpoint_fingerprint(tiny_ckpt)
    for f, d in m["files"].items():
        assert file_digest(exports["gptq8"] / f) == d
    sec = m["quantization"]
    assert sec["settings"]["bits"] == 8 and sec["calibration"]["used"] == 16 and sec["calibration"]["tokens"] > 16 * 20
    assert len(sec["layers"]) == 2 and set(sec["layers"][0]["linears"]) == set(LINEARS)
    q = sec["quality"]
    assert q["samples"] == 3 and q["answer_tokens"] > 0
    # 8-bit is float for practical purposes; 4-bit visibly is not
    assert q["kl_mean"] < 1e-3 and q["top1_agreement"] >= 0.95
    assert read_manifest(exports["rtn4"])["quantization"]["quality"]["kl_mean"] > q["kl_mean"]


def test_artifact_answers(exports):
    img = Image.new("RGB", (84, 56), (200, 30, 30))
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What?"}]}]
    for out in exports.values():
        eng = qvl.load(out, dtype="bfloat16", max_seq_len=256)
        assert len(eng.generate_ids(msgs, max_new_tokens=4, ignore_eos=True)) == 4


def test_resume_after_interruption(tiny_ckpt, tmp_path, monkeypatch, exports):
    calls = []
    real = xq.quantize_layer

    def flaky(layer, inputs, rope, spec):
        calls.append(len(calls))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(layer, inputs, rope, spec)

    monkeypatch.setattr(xq, "quantize_layer", flaky)
    out = tmp_path / "gptq4"
    with pytest.raises(KeyboardInterrupt):
        xq.export_quantized(tiny_ckpt, out, SPECS["gptq4"], calib_samples=16, quality_samples=0)
    assert not out.exists()
    state = json.loads((tmp_path / ".gptq4.partial" / "state.json").read_text())
    assert state["done"] == 1
    calls.clear()
    xq.export_quantized(tiny_ckpt, out, SPECS["gptq4"], calib_samples=16, quality_samples=0)
    assert calls == [0], "resumed at the second layer"
    a, b = load_file(out / "model.safetensors"), load_file(exports["gptq4"] / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / ".gptq4.partial").exists()


def test_errors_write_nothing(tiny_ckpt, tmp_path, exports):
    with pytest.raises(xq.ExportError, match="not divisible by group_size=48"):
        xq.export_quantized(tiny_ckpt, tmp_path / "x", QuantSpec("gptq", "gptq", 4, 48), quality_samples=0)
    with pytest.raises(ValueError, match="already quantized"):
        xq.export_quantized(exports["gptq4"], tmp_path / "y", SPECS["gptq4"], quality_samples=0)
    with pytest.raises(FileExistsError):
        xq.export_quantized(tiny_ckpt, exports["awq"], SPECS["awq"], quality_samples=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="4-bit weights with zero points"):
        QuantSpec("awq", "awq", 4, 32, sym=True)


def test_cli(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "a"
    assert cli_main(["export", "awq", str(tiny_ckpt), str(out), "--group-size", "32", "--calib-samples", "4",
                     "--quality-samples", "0"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    assert cli_main(["export", "gptq", str(tiny_ckpt), str(tmp_path / "b"), "--group-size", "128"]) == 2
    assert "not divisible" in capsys.readouterr().err


def test_calibration_sets(tiny_ckpt, tmp_path):
    chats = default_samples(16)
    kinds = {item["type"] for c in chats for m in c for item in m["content"]}
    assert kinds == {"image", "video", "text"}
    assert any(all(i["type"] == "text" for i in c[0]["content"]) for c in chats)
    assert all(c[-1]["role"] == "assistant" for c in chats)  # answers are calibrated on too
    Image.new("RGB", (60, 40), (1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / "b.txt").write_text("A sentence to calibrate on.")
    d_chats, info = load_samples(str(tmp_path), 10)
    assert len(d_chats) == 2 and info["samples"] == 2
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"image": "a.png", "question": "What colour?", "answer": "black"}) + "\n")
    j_chats, _ = load_samples(str(jl), 10)
    assert j_chats[0][0]["content"][0]["image"] == str(tmp_path / "a.png")
    assert j_chats[0][1]["content"][0]["text"] == "black"
    # the decoder sees vision tokens: image chats get 3-D (t, h, w) rope ids that differ per axis
    lw = LayerwiseModel(tiny_ckpt)
    inputs = first_layer_inputs(lw, chats[:3] + d_chats)
    assert len(inputs) == 5
    assert all(bool((x.positions[0] != x.positions[1]).any()) for x in inputs[:3])
    with pytest.raises(FileNotFoundError):
        load_samples(str(tmp_path / "missing"), 4)


def test_quantized_decoder_with_onnx_vision(tiny_ckpt, tmp_path):
    """The edge setup: GPTQ decoder + ONNX vision tower in one artifact, `--onnx-vision`."""
    pytest.importorskip("onnxruntime")
    out = tmp_path / "edge"
    assert cli_main(["export", "gptq", str(tiny_ckpt), str(out), "--group-size", "32", "--calib-samples", "4",
                     "--quality-samples", "0", "--onnx-vision"]) == 0
    assert (out / "vision.onnx").exists() and "vision_onnx" in read_manifest(out)
    assert "quantization" in read_manifest(out)  # the ONNX export kept the quantization section
    img = Image.new("RGB", (112, 84), (30, 200, 30))
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Colour?"}]}]
    ref = qvl.load(out, max_seq_len=256).generate_ids(msgs, max_new_tokens=8, ignore_eos=True)
    eng = qvl.load(out, max_seq_len=256, vision_backend="onnx")
    assert eng.vision is not None and not any(p.device.type != "meta" for p in eng.model.visual.parameters())
    assert eng.generate_ids(msgs, max_new_tokens=8, ignore_eos=True) == ref
