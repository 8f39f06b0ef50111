"""Interop with the maintained AutoGPTQ/AutoAWQ successor, GPTQModel (opt-in: skipped unless
``gptqmodel`` is importable). It needs torch 2.14.1 and a CPU build of GPTQModel, so it runs in
its own venv, e.g.::

    python3 -m venv /tmp/gq && . /tmp/gq/bin/activate && pip install torch==2.14.1 torchvision==0.29.1
    BUILD_CUDA_EXT=0 pip install --no-build-isolation gptqmodel==7.7.0 optimum
    pip install -e ".[dev]" && GPTQMODEL_CPU_WORKERS=2 python -m pytest -q tests/test_interop_gptqmodel.py

(torchvision: GPTQModel loads Qwen2-VL with its processor, whose video processor needs it.)

Both directions, for a tiny Qwen2-VL and a tiny Qwen2.5-VL (windowed tower; GPTQModel knows
both model types): our GPTQ / AWQ artifacts loaded by transformers + GPTQModel give the logits
qvl gives; a checkpoint GPTQModel quantized loads in qvl and gives the logits transformers +
GPTQModel give. Tolerance: GPTQModel's CPU kernels compute in fp16 / bf16 activations while qvl
runs fp32 here, so logits agree to 3% of their range and the argmax on >= 90% of positions.
"""

import json

import pytest
import torch

gptqmodel = pytest.importorskip("gptqmodel")

from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration  # noqa: E402

from qvl.export.quantize import export_quantized  # noqa: E402
from qvl.model.rope import rope_index  # noqa: E402
from qvl.export.layerwise import QuantSpec  # noqa: E402
from qvl.runtime.loader import load_model  # noqa: E402
from qvl.scripts.tiny import write_tiny_checkpoint  # noqa: E402

REL = 0.03
HF_CLASS = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def ckpt(request, tiny_ckpt, tmp_path_factory):
    if request.param == "qwen2_vl":
        return tiny_ckpt
    return write_tiny_checkpoint(tmp_path_factory.mktemp("interop_q25"), weights="transformers",
                                 model_type="qwen2_5_vl", mrope_section=(3, 2, 3))


def _inputs(path):
    cfg = json.loads((path / "config.json").read_text())
    img = cfg["image_token_id"]
    g = torch.Generator().manual_seed(0)
    grid = torch.tensor([[1, 4, 6]])
    ids = torch.cat([torch.randint(10, 200, (5,), generator=g), torch.tensor([cfg["vision_start_token_id"]]),
                     torch.full((6,), img), torch.tensor([cfg["vision_end_token_id"]]),
                     torch.randint(10, 200, (6,), generator=g)])[None]
    return ids, torch.randn(24, 1176, generator=g), grid, img, cfg["video_token_id"]


def _qvl_logits(path):
    ids, pv, grid, img, vid = _inputs(path)
    m = load_model(path, dtype="float32")
    m.setup_caches(1, 64, torch.float32)
    with torch.no_grad():
        emb = m.embed_tokens(ids)
        emb[ids == img] = m.visual.encode(pv, grid)
        pos, _ = rope_index(ids, [tuple(grid[0].tolist())], (img, vid), 2)
        return m.logits(m(emb, pos, torch.arange(ids.shape[1]), None, ids.shape[1]))[0]


def _hf_logits(path, dtype):
    ids, pv, grid, img, _ = _inputs(path)
    model_type = json.loads((path / "config.json").read_text())["model_type"]
    hf = HF_CLASS[model_type].from_pretrained(path, dtype=dtype, device_map="cpu").eval()
    with torch.no_grad():
        return hf(input_ids=ids, pixel_values=pv.to(dtype), image_grid_thw=grid,
                  mm_token_type_ids=(ids == img).int()).logits[0].float()


def _close(a, b):
    span = float(b.abs().max())
    assert float((a - b).abs().max()) <= REL * span, float((a - b).abs().max()) / span
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) >= 0.9


@pytest.mark.parametrize("spec", [QuantSpec("gptq", "gptq", 4, 32), QuantSpec("gptq", "gptq", 8, 32),
                                  QuantSpec("awq", "awq", 4, 32, sym=False)], ids=["gptq4", "gptq8", "awq"])
def test_our_artifacts_load_in_transformers_gptqmodel(ckpt, tmp_path, spec):
    out = export_quantized(ckpt, tmp_path / "q", spec, calib_samples=8, quality_samples=0)
    _close(_hf_logits(out, torch.float16), _qvl_logits(out))


def test_gptqmodel_checkpoint_loads_in_qvl(ckpt, tmp_path):
    from gptqmodel import GPTQModel, QuantizeConfig

    model = GPTQModel.load(str(ckpt), QuantizeConfig(bits=4, group_size=32))
    calib = ["The quick brown fox jumps over the lazy dog. " * 4, "Pictures of shapes and colours. " * 4] * 8
    model.quantize(calib, batch_size=1)
    out = tmp_path / "gptqmodel-int4"
    model.save(str(out))
    _close(_qvl_logits(out), _hf_logits(out, torch.float16))
