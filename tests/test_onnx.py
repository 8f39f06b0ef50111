"""ONNX vision tower: export, validation, manifest checks, onnxruntime backend end to end.

Tolerances, as max |onnx - torch| / max |torch| against the fp32 torch tower: fp32 graph 1e-5
(observed ~6e-7: summation order only), fp16 graph 1e-2 (observed ~1e-3: fp16 rounding). All
grids below differ from the export's trace and validation grids.
"""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import qvl  # noqa: E402
from qvl.export import onnx as onnx_export  # noqa: E402
from qvl.export.onnx import ExportError, export_onnx, load_vision_tower  # noqa: E402
from qvl.runtime.manifest import MANIFEST, checkpoint_fingerprint, file_digest, read_manifest  # noqa: E402
from qvl.runtime.onnx_vision import (OnnxVision, OnnxVisionError, graph_inputs, pack_frames,  # noqa: E402
                                     pick_providers)

UNSEEN = [[(1, 2, 2)], [(1, 30, 42)], [(1, 6, 50)], [(3, 8, 10)], [(1, 14, 10), (2, 4, 4), (1, 2, 36)]]
FP32_TOL, FP16_TOL = 1e-5, 1e-2


def _qvl(*args):
    return subprocess.run([sys.executable, "-m", "qvl.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def _pixels(grids, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(t * h * w for t, h, w in grids), 1176, generator=g), torch.tensor(grids)


def _rel(got, ref):
    return ((got.float() - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def art(tiny_ckpt, tmp_path_factory):
    return export_onnx(tiny_ckpt, tmp_path_factory.mktemp("onnx") / "fp32")


@pytest.fixture(scope="module")
def art16(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "fp16"
    r = _qvl("export", "onnx", tiny_ckpt, out, "--dtype", "float16")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out) and "validation 4/4" in r.stderr  # progress shown without -v
    return out


@pytest.fixture(scope="module")
def tower(tiny_ckpt):
    return load_vision_tower(tiny_ckpt)


def test_fp32_parity_on_unseen_sizes(art, tower):
    vision = OnnxVision.from_checkpoint(art, 2)
    for i, grids in enumerate(UNSEEN):
        pv, g = _pixels(grids, i)
        with torch.no_grad():
            ref = tower.encode(pv, g)
        got = vision.encode(pv, g)
        assert got.shape == ref.shape and got.dtype == torch.float32
        assert _rel(got, ref) < FP32_TOL, grids


def test_several_images_and_frames_in_one_call(art, tower):
    grids = UNSEEN[-1] + [(2, 6, 6)]
    pv, g = _pixels(grids, 7)
    feeds, cu = graph_inputs(pv, g, 2)
    one_call = torch.from_numpy(OnnxVision(art / "vision.onnx", 2).run(feeds))  # in-graph block mask
    per_frame = OnnxVision(art / "vision.onnx", 2, pack_patches=1).encode(pv, g)  # one call per frame
    with torch.no_grad():
        ref = tower.encode(pv, g)
    assert _rel(one_call, ref) < FP32_TOL and _rel(per_frame, ref) < FP32_TOL
    assert len(cu) - 1 == 6  # 1 + 2 + 1 frames, then 2 video frames


def test_pack_frames():
    cu = [0, 16, 32, 132, 140, 148]
    assert pack_frames(cu, 40) == [(0, 32), (32, 132), (132, 148)]
    assert pack_frames(cu, 1) == [(0, 16), (16, 32), (32, 132), (132, 140), (140, 148)]
    assert pack_frames(cu, 10**6) == [(0, 148)]


def test_provider_preference():
    assert pick_providers(["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider",
                           "AzureExecutionProvider"]) == \
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert pick_providers(["AzureExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_fp16_variant(art16, tower):
    sec = read_manifest(art16)["vision_onnx"]
    assert sec["dtype"] == "float16" and sec["validation"]["max_rel"] <= sec["validation"]["tolerance_max_rel"]
    vision = OnnxVision.from_checkpoint(art16, 2)
    for i, grids in enumerate(UNSEEN[1:4:2] + UNSEEN[-1:]):
        pv, g = _pixels(grids, 10 + i)
        got = vision.encode(pv, g)
        with torch.no_grad():
            ref = tower.encode(pv, g)
        assert got.dtype == torch.float16
        assert _rel(got, ref) < FP16_TOL, grids


def test_manifest_describes_the_artifact(art, tiny_ckpt):
    m = read_manifest(art)
    sec = m["vision_onnx"]
    fp = checkpoint_fingerprint(tiny_ckpt)
    assert m["checkpoint_sha256"] == sec["checkpoint_sha256"] == fp == checkpoint_fingerprint(art)
    assert m["qvl_version"] == qvl.__version__ and sec["opset"] >= 17 and sec["external_data"] is None
    assert m["files"]["vision.onnx"] == sec["files"]["vision.onnx"] == file_digest(art / "vision.onnx")
    v = sec["validation"]
    assert len(v["cases"]) >= 4 and any(len(c["grid_thw"]) > 1 for c in v["cases"])
    assert v["max_rel"] <= v["tolerance_max_rel"] == 1e-4 and v["max_abs"] > 0
    # a loadable checkpoint: every source file is there
    assert {p.name for p in tiny_ckpt.iterdir()} <= {p.name for p in art.iterdir()}


def test_greedy_identical_end_to_end(art, tiny_ckpt, tmp_path):
    from PIL import Image

    paths = []
    for i, (w, h) in enumerate([(224, 168), (84, 308)]):
        arr = (torch.rand(h, w, 3, generator=torch.Generator().manual_seed(i)) * 255).to(torch.uint8).numpy()
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(arr).save(paths[-1])
    convs = [
        [{"role": "user", "content": [{"type": "image", "image": str(paths[0])},
                                      {"type": "text", "text": "Describe this."}]}],
        [{"role": "user", "content": [{"type": "image", "image": str(p)} for p in paths]
          + [{"type": "text", "text": "Compare them."}]}],
    ]
    ref = qvl.load(tiny_ckpt, max_seq_len=512)
    eng = qvl.load(art, max_seq_len=512, vision_backend="onnx")
    assert eng.model.visual.patch_embed.weight.is_meta  # torch vision weights were never loaded
    for conv in convs:
        assert eng.generate_ids(conv, max_new_tokens=16, ignore_eos=True) == \
            ref.generate_ids(conv, max_new_tokens=16, ignore_eos=True)


def test_cli_run_with_onnx_backend(art, tmp_path):
    from PIL import Image

    pic = tmp_path / "pic.png"
    Image.new("RGB", (100, 60), "red").save(pic)
    r = _qvl("run", art, "--image", pic, "--max-new-tokens", 8, "--vision-backend", "onnx", "What is this?")
    assert r.returncode == 0, r.stderr
    expected = qvl.load(art).generate([{"role": "user", "content": [
        {"type": "image", "image": str(pic)}, {"type": "text", "text": "What is this?"}]}], max_new_tokens=8)
    assert r.stdout == expected + "\n"


def _copy(src, dst):
    return shutil.copytree(src, dst)  # real copies: tests below edit files


def test_mismatched_onnx_is_a_clear_error(tiny_ckpt, tiny_ckpt_tied, tmp_path):
    other = export_onnx(tiny_ckpt_tied, tmp_path / "tied")
    mixed = _copy(tiny_ckpt, tmp_path / "mixed")
    for name in ("vision.onnx", MANIFEST):
        shutil.copy(other / name, mixed / name)
    with pytest.raises(OnnxVisionError, match="exported from a different checkpoint"):
        qvl.load(mixed, vision_backend="onnx")


def test_missing_or_swapped_onnx_is_a_clear_error(art, tiny_ckpt, tiny_ckpt_tied, tmp_path):
    with pytest.raises(OnnxVisionError, match="no vision.onnx.*qvl export onnx"):
        qvl.load(tiny_ckpt, vision_backend="onnx")
    d = _copy(art, tmp_path / "swapped")
    (d / MANIFEST).unlink()
    with pytest.raises(OnnxVisionError, match="no qvl-manifest.json entry"):
        qvl.load(d, vision_backend="onnx")
    # another export of the same checkpoint, with this directory's manifest left in place
    again = export_onnx(tiny_ckpt, tmp_path / "again")
    shutil.copy(art / MANIFEST, d / MANIFEST)
    shutil.copy(again / "vision.onnx", d / "vision.onnx")
    with pytest.raises(OnnxVisionError, match="export id"):
        qvl.load(d, vision_backend="onnx")
    with pytest.raises(ValueError, match="vision_backend"):
        qvl.load(art, vision_backend="tensorrt")


def test_failed_validation_writes_nothing(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(onnx_export.TOLERANCE, "float32", 0.0)
    with pytest.raises(ExportError, match="nothing was written"):
        export_onnx(tiny_ckpt, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    src = _copy(tiny_ckpt, tmp_path / "src")
    before = sorted(p.name for p in src.iterdir())
    with pytest.raises(ExportError):
        export_onnx(src, onnx_only=True)
    assert sorted(p.name for p in src.iterdir()) == before
    with pytest.raises(FileExistsError):
        export_onnx(tiny_ckpt, src)


def test_onnx_only_with_external_data(art, tiny_ckpt, tmp_path, monkeypatch):
    src = _copy(tiny_ckpt, tmp_path / "src")
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)  # as the fp32 2B tower (2.4 GB) does
    assert export_onnx(src, onnx_only=True) == src
    sec = read_manifest(src)["vision_onnx"]
    assert sec["external_data"] == "vision.onnx.data" and set(sec["files"]) == {"vision.onnx", "vision.onnx.data"}
    assert (src / "vision.onnx").stat().st_size < 100_000 < (src / "vision.onnx.data").stat().st_size
    pv, g = _pixels(UNSEEN[-1], 3)
    got = OnnxVision.from_checkpoint(src, 2).encode(pv, g)
    np.testing.assert_allclose(got.numpy(), OnnxVision.from_checkpoint(art, 2).encode(pv, g).numpy(), atol=1e-6)
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1 << 30)
    export_onnx(src, onnx_only=True)  # re-export in one file: the stale data file goes
    assert not (src / "vision.onnx.data").exists() and not any(p.name.startswith(".") for p in src.iterdir())
    OnnxVision.from_checkpoint(src, 2)
