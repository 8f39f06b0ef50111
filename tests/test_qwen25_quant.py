"""Qwen2.5-VL quantized: an AWQ checkpoint in the official Qwen2.5-VL-*-AWQ layout, and
``qvl export gptq|awq`` of a Qwen2.5-VL checkpoint.

The AWQ pair is built as in test_quant_load.py (decoder linears RTN-quantized and packed by the
loop-based writers of tests/quant_ref.py, everything in fp16 as the release ships it, group 32
for the toy dims) from a tiny Qwen2.5-VL checkpoint; its float twin holds the dequantized
weights. fp32: the weights are exact on both sides and only the order of sums differs, so greedy
tokens for an image and a video must be identical.
"""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

import qvl
import quant_ref as ref
from qvl.export import quantize as xq
from qvl.export.layerwise import LayerwiseModel, QuantSpec, first_layer_inputs
from qvl.model.rope import rope_index
from qvl.quant.linear import QuantLinear
from qvl.runtime.manifest import read_manifest
from qvl.runtime.prompt import build_request
from qvl.scripts.sample_videos import moving_squares
from qvl.scripts.tiny import write_tiny_checkpoint
from test_quant_load import AWQ_CONFIG, _decoder_linears, write_pair

N_NEW = 12
FRAMES = [Image.fromarray(f) for f in moving_squares(6, 84, 56)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("q25q"), weights="transformers", model_type="qwen2_5_vl",
                                 mrope_section=(3, 2, 3))


def _chat():
    g = torch.Generator().manual_seed(3)
    img = Image.fromarray((torch.rand(112, 168, 3, generator=g) * 255).to(torch.uint8).numpy())
    return [{"role": "user", "content": [
        {"type": "image", "image": img},
        {"type": "video", "video": FRAMES, "sample_fps": 1.0, "min_pixels": 784 * 4, "max_pixels": 784 * 6},
        {"type": "text", "text": "What changes between them?"}]}]


def _tokens(path, dtype="float32"):
    eng = qvl.load(path, dtype=dtype, max_seq_len=256)
    return eng, eng.generate_ids(_chat(), max_new_tokens=N_NEW, ignore_eos=True)


# the release spells the float tower "visual"; AutoAWQ writes null when told nothing, and the
# tower's tensors stay float either way, since only decoder layers are ever quantized
@pytest.mark.parametrize("not_convert", [["visual"], None])
def test_awq_release_layout_answers_as_dequantized_float(ckpt, tmp_path, not_convert):
    qdir, fdir = write_pair(ckpt, tmp_path, "awq", {**AWQ_CONFIG, "modules_to_not_convert": not_convert})
    cfg = json.loads((qdir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_vl" and cfg["quantization_config"]["modules_to_not_convert"] == not_convert
    qeng, qtok = _tokens(qdir)
    assert qtok == _tokens(fdir)[1]
    linears = _decoder_linears(qeng.model)
    assert len(linears) == 14 and all(isinstance(m, QuantLinear) for m in linears.values())
    # the tower stays float: plain nn.Linear projections, gated MLP included
    vision = {n: m for n, m in qeng.model.visual.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}
    assert "blocks.0.mlp.gate_proj" in vision and all(type(m) is nn.Linear for m in vision.values())


@pytest.fixture(scope="module")
def exports(ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("q25x")
    specs = {"gptq8": QuantSpec("gptq", "gptq", 8, 32, sym=True), "awq": QuantSpec("awq", "awq", 4, 32, sym=False)}
    return {name: (spec, xq.export_quantized(ckpt, root / name, spec, calib_samples=8, quality_samples=2))
            for name, spec in specs.items()}


def test_export_keeps_the_qwen25_config_and_tower(ckpt, exports):
    src_cfg = json.loads((ckpt / "config.json").read_text())
    src = load_file(ckpt / "model.safetensors")
    for name, (spec, out) in exports.items():
        cfg = json.loads((out / "config.json").read_text())
        assert cfg.pop("quantization_config") == xq.quantization_config(spec)
        assert {k: v for k, v in cfg.items() if k != "torch_dtype"} == \
            {k: v for k, v in src_cfg.items() if k != "torch_dtype"}
        t = load_file(out / "model.safetensors")
        tower = [k for k in src if "visual." in k]
        assert tower and all(torch.equal(t[k], src[k].half()) for k in tower), name
        # one packed linear, read by the independent reader, is what qvl computes with
        model = qvl.load(out, dtype="float32", max_seq_len=64).model
        p = "model.layers.1.mlp.gate_proj"
        if spec.fmt == "awq":
            q, z = ref.awq_read(t[p + ".qweight"]), ref.awq_read(t[p + ".qzeros"])
            g_idx = torch.arange(q.shape[0]) // spec.group_size
        else:
            q, z = ref.gptq_read_rows(t[p + ".qweight"], spec.bits), ref.gptq_read_zeros(t[p + ".qzeros"], spec.bits)
            g_idx = t[p + ".g_idx"]
        w = ref.dequant(q, z, t[p + ".scales"], g_idx)
        torch.testing.assert_close(model.get_submodule("layers.1.mlp.gate_proj").dequantize(torch.float32), w,
                                   rtol=0, atol=1e-6)


def test_export_quality_and_answers(exports):
    q = read_manifest(exports["gptq8"][1])["quantization"]["quality"]
    # 8-bit is float for practical purposes
    assert q["samples"] == 2 and q["answer_tokens"] > 0 and q["kl_mean"] < 1e-3 and q["top1_agreement"] >= 0.95
    for _, out in exports.values():
        eng, tok = _tokens(out, "bfloat16")
        assert len(tok) == N_NEW and eng.model.cfg.model_type == "qwen2_5_vl"


def test_calibration_positions_follow_video_time(ckpt):
    """GPTQ/AWQ calibrate the decoder on the rope ids it will see: video time ids in seconds."""
    lw = LayerwiseModel(ckpt)
    (x,) = first_layer_inputs(lw, [_chat()])
    eng = qvl.load(ckpt, max_seq_len=256)
    req = build_request(_chat(), eng.tokenizer, eng.processor, 2, video_processor=eng.video_processor)
    assert req.vision_seconds == [None, 2.0]
    ids = torch.tensor([req.ids])
    want, _ = rope_index(ids, req.vision_grids, (eng.model.cfg.image_token_id, eng.model.cfg.video_token_id), 2,
                         seconds=req.vision_seconds, tokens_per_second=2)
    assert torch.equal(x.positions.cpu(), want)
    t_ids = want[0, 0][ids[0] == eng.model.cfg.video_token_id].unique()
    assert t_ids.diff().tolist() == [4, 4]  # 3 frame pairs, 2 s each at 2 tokens per second
