"""Video sampling, sizing and pixel values against the real reference libraries, via fixtures.

tests/data/video_parity.npz holds what qwen-vl-utils 0.0.14 ``fetch_video`` (decord,
torchvision) + transformers 5.24 ``Qwen2VLVideoProcessor`` produced for synthetic videos; see
scripts/make_video_fixtures.py, which regenerates it in a throwaway environment that has
torchvision and decord. Inputs are regenerated here from the same pure-numpy function.
"""

import hashlib
import json
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

import qvl.runtime.video as video_mod
from qvl.runtime.video import fetch_video
from qvl.runtime.video_processor import VideoProcessor, VideoProcessorConfig
from qvl.scripts.sample_videos import moving_squares, write_video
from qvl.scripts.tiny import PREPROCESSOR_CONFIG

DATA = np.load(pathlib.Path(__file__).parent / "data" / "video_parity.npz")
META = json.loads(DATA["meta"].tobytes())
CASES = {c["name"]: c for c in META["cases"]}
FRAME_CASES = [n for n, c in CASES.items() if c["kind"] == "frames"]
FILE_CASES = [n for n, c in CASES.items() if c["kind"] == "file"]


def _sha(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


class _MemReader:
    """Stand-in for a file reader, like the fixture script's stand-in decord."""

    name = "mem"

    def __init__(self, frames, fps):
        self.total_frames, self.fps, self._frames = len(frames), fps, frames

    def frames(self, indices):
        return iter(self._frames[indices])


def _processor(case) -> VideoProcessor:
    kw = case["processor"]
    return VideoProcessor(VideoProcessorConfig.from_dict(PREPROCESSOR_CONFIG if kw is None else kw))


def test_tiny_checkpoint_video_limits_like_transformers(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG))
    cfg = VideoProcessorConfig.from_dir(tmp_path)
    assert [cfg.min_pixels, cfg.max_pixels] == DATA["tiny_video_size"].tolist()
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 1, "longest_edge": 2}}))
    assert (VideoProcessorConfig.from_dir(tmp_path).min_pixels, VideoProcessorConfig.from_dir(tmp_path).max_pixels) == (1, 2)
    (tmp_path / "processor_config.json").write_text(json.dumps({"video_processor": {"max_pixels": 99}}))
    cfg = VideoProcessorConfig.from_dir(tmp_path)
    assert (cfg.min_pixels, cfg.max_pixels) == (VideoProcessorConfig.min_pixels, 99)


@pytest.mark.parametrize("name", FRAME_CASES)
def test_frames_match_qwen_vl_utils_and_transformers(name, monkeypatch):
    case = CASES[name]
    spec = case["spec"]
    frames = moving_squares(spec["n"], spec["w"], spec["h"])
    if spec.get("list"):
        item = {"type": "video", "video": [Image.fromarray(f) for f in frames], **case["item"]}
    else:
        monkeypatch.setattr(video_mod, "open_video", lambda path, backend=None: _MemReader(frames, float(spec["fps"])))
        item = {"type": "video", "video": f"mem://{name}", **case["item"]}
    video = fetch_video(item)
    assert video.indices == DATA[f"{name}/indices"].tolist()
    got = video.frames.numpy()
    assert list(got.shape) == case["frames_shape"]
    if f"{name}/frames" in DATA:
        np.testing.assert_array_equal(got, DATA[f"{name}/frames"])
    assert _sha(got) == case["frames_sha256"]
    pv, grid = _processor(case)([video.frames])
    assert grid.tolist() == DATA[f"{name}/grid"].tolist()
    assert list(pv.shape) == case["pv_shape"] and pv.dtype == torch.float32
    assert _sha(pv.numpy()) == case["pv_sha256"]


def test_lazy_rows_equal_materialized():
    vp = VideoProcessor(VideoProcessorConfig.from_dict(PREPROCESSOR_CONFIG))
    frames = torch.from_numpy(moving_squares(7, 56, 84)).permute(0, 3, 1, 2)  # odd: last frame repeated
    full, grid = vp([frames])
    prepared = vp.prepare(frames)
    assert prepared.grid == tuple(grid[0].tolist()) == (4, 6, 4) and len(prepared) == full.shape[0]
    parts = torch.cat([prepared.rows(t, t + 1) for t in range(4)])
    assert torch.equal(parts, full)
    padded = torch.cat([frames, frames[-1:]])
    assert torch.equal(vp([padded])[0], full)


@pytest.mark.parametrize("name", FILE_CASES)
def test_pyav_reader_matches_decord(name, tmp_path):
    """Frame count, fps and chosen indices exactly as decord read them; pixels as decoded there
    (equal when this PyAV bundles the same FFmpeg as the fixture run, near otherwise)."""
    case = CASES[name]
    spec = case["spec"]
    path = write_video(tmp_path / f"v.{spec['ext']}", moving_squares(spec["n"], spec["w"], spec["h"]),
                       fps=spec["fps"], codec=spec["codec"])
    video = fetch_video({"video": str(path), **case["item"]}, backend="pyav")
    assert (video.total_frames, video.fps) == (case["total_frames"], case["fps"])
    assert video.indices == DATA[f"{name}/indices"].tolist()
    ref = DATA[f"{name}/frames"]
    assert video.frames.shape == ref.shape
    diff = np.abs(video.frames.numpy().astype(int) - ref.astype(int))
    assert diff.mean() < 1.0, diff.max()
