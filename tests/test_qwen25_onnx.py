"""Qwen2.5-VL's tower as ONNX: window attention inside the graph, dynamic shapes, against
transformers' tower and qvl's torch tower, and the onnxruntime backend end to end.

Tolerances, fp32: 1e-4 absolute against transformers (as tests/test_qwen25.py's torch tower;
observed ~2e-7), 1e-5 relative (max |onnx - torch| / max |torch|) against qvl's torch tower, as
tests/test_onnx.py. Grids differ from the export's trace and validation grids, cut windows at
their edges (56-pixel windows: 2x2 merged tokens) and mix images with multi-frame videos.
"""

import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import qvl  # noqa: E402
from qvl.export.onnx import export_onnx, load_vision_tower  # noqa: E402
from qvl.runtime.manifest import read_manifest  # noqa: E402
from qvl.runtime.onnx_vision import WINDOW_INPUTS, OnnxVision, graph_inputs  # noqa: E402
from qvl.scripts.sample_videos import moving_squares  # noqa: E402
from qvl.scripts.tiny import write_tiny_checkpoint  # noqa: E402

UNSEEN = [[(1, 2, 2)], [(1, 30, 42)], [(1, 6, 50)], [(3, 8, 10)], [(1, 14, 10), (2, 4, 4), (1, 2, 36)]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("q25o"), weights="transformers", model_type="qwen2_5_vl",
                                 mrope_section=(3, 2, 3))


@pytest.fixture(scope="module")
def art(ckpt, tmp_path_factory):
    return export_onnx(ckpt, tmp_path_factory.mktemp("q25o_art") / "fp32")


def _pixels(grids, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(t * h * w for t, h, w in grids), 1176, generator=g), torch.tensor(grids)


def test_graph_takes_the_window_order(art):
    vision = OnnxVision.from_checkpoint(art, 2)
    assert vision.window == 2 and all(k in vision.inputs for k in WINDOW_INPUTS)
    sec = read_manifest(art)["vision_onnx"]
    assert sec["window"] == 2 and set(WINDOW_INPUTS) <= set(sec["inputs"])
    assert sec["validation"]["max_rel"] < 1e-5


@pytest.fixture(scope="module")
def towers(art, ckpt):
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    return hf.model.visual, load_vision_tower(ckpt), OnnxVision.from_checkpoint(art, 2)


@pytest.mark.parametrize("grids", UNSEEN)
def test_matches_transformers_and_torch(towers, grids):
    hf_tower, tower, vision = towers
    pv, g = _pixels(grids, len(grids))
    got = vision.encode(pv, g)
    with torch.no_grad():
        ref = hf_tower(pv, grid_thw=g).pooler_output
        ours = tower.encode(pv, g)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert ((got - ours).abs().max() / ours.abs().max()).item() < 1e-5


def test_packed_calls_equal_one_call(art):
    """The same patches in one session call (all masks in the graph) and in calls of whole frames
    (each call's window order counted from its own start)."""
    grids = [(1, 14, 10), (3, 8, 12), (1, 6, 6)]
    pv, g = _pixels(grids, 5)
    vision = OnnxVision(art / "vision.onnx", 2)
    one = torch.from_numpy(vision.run(graph_inputs(pv, g, 2, 2)[0]))
    for budget in (1, 100, 400):
        packed = OnnxVision(art / "vision.onnx", 2, pack_patches=budget).encode(pv, g)
        torch.testing.assert_close(packed, one, atol=1e-5, rtol=0)


def test_greedy_identical_end_to_end(art, ckpt):
    g = torch.Generator().manual_seed(1)
    img = Image.fromarray((torch.rand(168, 224, 3, generator=g) * 255).to(torch.uint8).numpy())
    frames = [Image.fromarray(f) for f in moving_squares(4, 112, 84)]
    conv = [{"role": "user", "content": [
        {"type": "image", "image": img},
        {"type": "video", "video": frames, "sample_fps": 1.0, "min_pixels": 784 * 4, "max_pixels": 784 * 12},
        {"type": "text", "text": "Describe them."}]}]
    ref = qvl.load(ckpt, max_seq_len=512).generate_ids(conv, max_new_tokens=16, ignore_eos=True)
    eng = qvl.load(art, max_seq_len=512, vision_backend="onnx")
    assert eng.model.visual.patch_embed.weight.is_meta  # torch vision weights were never loaded
    assert eng.generate_ids(conv, max_new_tokens=16, ignore_eos=True) == ref
