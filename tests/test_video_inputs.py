"""qvl.runtime.video: qwen-vl-utils 0.0.14 fetch_video semantics, readers, sources and errors.

Reference parity of pixels is in test_video_processor.py; here: the sampling/sizing formulas,
which frames the readers return, every source form, backend selection and error messages.
"""

import dataclasses
import importlib.machinery
import importlib.util
import math
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import qvl.runtime.video as video_mod
from qvl.runtime.fetch import FetchPolicy
from qvl.runtime.video import (
    VideoBackendMissing, fetch_video, open_video, reader_backend, smart_nframes, video_frame_size,
)
from qvl.scripts.sample_videos import band_index, moving_squares, write_video

SMALL = {"min_pixels": 3136, "max_pixels": 3136}  # keep frames at 56x56


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """40 frames of 56x56 at 8 fps, h264 in mp4."""
    path = tmp_path_factory.mktemp("vid") / "clip.mp4"
    return write_video(path, moving_squares(40, 56, 56), fps=8)


def _source_indices(video):
    # resized frames are 56x56 here, the source size, so the bands read back directly
    return [band_index(f) for f in video.frames.permute(0, 2, 3, 1).numpy()]


@pytest.mark.parametrize("item,total,fps,want", [
    ({}, 40, 8, 10),  # 5 s at 2 fps
    ({"fps": 1}, 40, 8, 4),  # 5 frames -> floored to the frame factor
    ({"fps": 0.1}, 40, 8, 4),  # min_frames
    ({"fps": 30}, 40, 8, 40),  # never more than the video
    ({"max_frames": 7}, 400, 8, 6),
    ({"min_frames": 5}, 40, 40, 6),
    ({"nframes": 5}, 40, 8, 4),  # round(2.5) is 2 in Python: 4, not 6
    ({"nframes": 7}, 40, 8, 8),
    ({}, 36000, 30, 768),  # 20 minutes: FPS_MAX_FRAMES
])
def test_smart_nframes(item, total, fps, want):
    assert smart_nframes(item, total, fps) == want


def test_smart_nframes_errors():
    with pytest.raises(ValueError, match="either 'fps' or 'nframes'"):
        smart_nframes({"fps": 1, "nframes": 4}, 40, 8)
    with pytest.raises(ValueError, match="nframes should be in"):
        smart_nframes({"nframes": 50}, 40, 8)
    with pytest.raises(ValueError, match="nframes should be in"):
        smart_nframes({}, 1, 8)


def test_frame_size_budget():
    # restated from qwen-vl-utils: max_pixels = max(min(768*784, total/n*2), int(1.05*min_pixels))
    for n in (4, 64, 768):
        for total in (None, 20000, 5e6):
            item = {} if total is None else {"total_pixels": total}
            budget = 128000 * 784 * 0.9 if total is None else total
            cap = max(min(768 * 784, budget / n * 2), int(128 * 784 * 1.05))
            h, w = video_frame_size(720, 1280, n, item)
            assert h * w <= cap and h % 28 == 0 and w % 28 == 0
            # the largest 16:9-ish size under the cap: one more factor step would exceed it
            beta = math.sqrt(720 * 1280 / cap)
            assert (h, w) == (math.floor(720 / beta / 28) * 28, math.floor(1280 / beta / 28) * 28)
    assert video_frame_size(720, 1280, 4, {"resized_height": 100, "resized_width": 200}) == (112, 196)


def test_pyav_decodes_only_up_to_the_last_index(clip):
    reader = open_video(str(clip), "pyav")
    assert (reader.total_frames, reader.fps) == (40, 8.0)
    got = [band_index(f) for f in reader.frames([0, 3, 3, 9])]  # duplicates are served twice
    assert got == [0, 3, 3, 9]


def test_fetch_file_sources_agree(clip):
    want = np.linspace(0, 39, 10, dtype=np.float32).round().astype(int).tolist()
    for src in (str(clip), clip, f"file://{clip}"):
        video = fetch_video({"type": "video", "video": src, **SMALL})
        assert video.indices == want and _source_indices(video) == want
        assert video.frames.shape == (10, 3, 56, 56) and video.frames.dtype == torch.uint8
        assert video.sample_fps == pytest.approx(2.0) and video.backend in ("pyav", "decord")


def test_video_start_end(clip):
    video = fetch_video({"video": str(clip), "video_start": 1.0, "video_end": 3.0, **SMALL})
    # frames 8..24 (17 frames, 2.125 s at 8 fps) at 2 fps -> 4 frames
    assert video.indices == [8, 13, 19, 24] == _source_indices(video)
    with pytest.raises(ValueError, match="invalid time range"):
        fetch_video({"video": str(clip), "video_start": 4.0, "video_end": 2.0})


def test_decord_chosen_when_installed(clip, monkeypatch):
    """A decord stand-in (over PyAV) is preferred when importable and gets the same indices."""
    import av

    calls = []

    class VideoReader:
        def __init__(self, path):
            with av.open(path) as c:
                self.frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])

        def __len__(self):
            return len(self.frames)

        def get_avg_fps(self):
            return 8.0

        def get_batch(self, idx):
            calls.append(list(idx))
            return types.SimpleNamespace(asnumpy=lambda: self.frames[list(idx)])

    fake = types.ModuleType("decord")
    fake.VideoReader = VideoReader
    fake.__spec__ = importlib.machinery.ModuleSpec("decord", None)
    monkeypatch.setitem(sys.modules, "decord", fake)
    monkeypatch.delenv("QVL_VIDEO_READER", raising=False)
    assert reader_backend() == "decord"
    via_decord = fetch_video({"video": str(clip), **SMALL})
    via_pyav = fetch_video({"video": str(clip), **SMALL}, backend="pyav")
    assert via_decord.backend == "decord" and via_pyav.backend == "pyav"
    assert via_decord.indices == via_pyav.indices == sum(calls, [])
    assert torch.equal(via_decord.frames, via_pyav.frames)
    monkeypatch.setenv("QVL_VIDEO_READER", "pyav")
    assert reader_backend() == "pyav"


def test_real_decord_matches_pyav(clip):
    pytest.importorskip("decord")
    a = fetch_video({"video": str(clip), **SMALL}, backend="decord")
    b = fetch_video({"video": str(clip), **SMALL}, backend="pyav")
    assert a.indices == b.indices and (a.total_frames, a.fps) == (b.total_frames, b.fps)
    assert np.abs(a.frames.numpy().astype(int) - b.frames.numpy().astype(int)).max() <= 2


def test_no_backend_names_the_extra(clip, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("decord", "av") else real(n, *a))
    monkeypatch.delenv("QVL_VIDEO_READER", raising=False)
    with pytest.raises(VideoBackendMissing, match=r"pip install 'qvl\[video\]'"):
        fetch_video({"video": str(clip)})
    monkeypatch.setenv("QVL_VIDEO_READER", "opencv")
    with pytest.raises(ValueError, match="QVL_VIDEO_READER='opencv'"):
        reader_backend()


def test_frame_list_and_array_forms(tmp_path):
    frames = moving_squares(5, 100, 60)
    paths = []
    for i, f in enumerate(frames):
        paths.append(tmp_path / f"f{i}.png")
        Image.fromarray(f).save(paths[-1])
    item = {"min_pixels": 784 * 4, "max_pixels": 784 * 16}
    forms = [
        [Image.fromarray(f) for f in frames],
        [str(p) for p in paths],
        [f"file://{p}" for p in paths],
        frames,  # uint8 [T, H, W, 3]
        torch.from_numpy(frames).permute(0, 3, 1, 2),  # uint8 TCHW, as torchvision / qwen-vl-utils
        list(frames),
    ]
    ref = fetch_video({"video": forms[0], **item})
    # qwen-vl-utils sizes list frames to multiples of 56 first (100x60 -> 112x56), pads 5 -> 6
    assert ref.frames.shape == (6, 3, 56, 112) and torch.equal(ref.frames[5], ref.frames[4])
    for form in forms[1:]:
        assert torch.equal(fetch_video({"type": "video", "video": form, **item}).frames, ref.frames)


def test_frame_errors(tmp_path):
    with pytest.raises(ValueError, match="at least one frame"):
        fetch_video({"video": []})
    with pytest.raises(ValueError, match="change size"):
        fetch_video({"video": [np.zeros((56, 56, 3), np.uint8), np.zeros((112, 56, 3), np.uint8)]})
    with pytest.raises(ValueError, match="uint8"):
        fetch_video({"video": np.zeros((2, 56, 56, 3), np.float32)})
    with pytest.raises(ValueError, match="uint8 \\[T, C, H, W\\]"):
        fetch_video({"video": torch.zeros(2, 56, 56, 3, dtype=torch.uint8)})
    with pytest.raises(ValueError, match="unsupported video source type int"):
        fetch_video({"video": 3})
    with pytest.raises(ValueError, match="data: URIs are not supported for videos"):
        fetch_video({"video": "data:video/mp4;base64,AAAA"})
    with pytest.raises(ValueError, match="image file not found"):
        fetch_video({"video": [str(tmp_path / "nope.png")]})


def test_corrupt_and_truncated_files(clip, tmp_path):
    cases = {
        "missing.mp4": None,
        "junk.mp4": bytes(range(256)) * 20,
        "text.mp4": b"hello, not a video",
        "half.mp4": clip.read_bytes()[: clip.stat().st_size // 2],  # mp4 index (moov) is at the end
        "empty.mp4": b"",
    }
    for name, data in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(ValueError, match=r"(not found|cannot read video|no video stream|no frames).*" + name):
            fetch_video({"video": str(path)}, backend="pyav")


def test_truncated_mkv_reads_what_is_there(tmp_path, caplog):
    """Streamable containers cut short stay readable (as with decord), with a warning."""
    path = write_video(tmp_path / "v.mkv", moving_squares(40, 56, 56), fps=8)
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level("WARNING", logger="qvl.runtime.video"):
        video = fetch_video({"video": str(cut), "nframes": 4, **SMALL}, backend="pyav")
    assert 4 <= video.total_frames < 40 and video.indices[-1] == video.total_frames - 1
    # a cut through a B-frame group can drop a frame inside the kept range: bands say which
    got = _source_indices(video)
    assert got[:2] == video.indices[:2] and got == sorted(got) and got[-1] < 40
    assert "truncated" in caplog.text


def test_decoder_ending_early_is_an_error(clip, monkeypatch):
    reader = open_video(str(clip), "pyav")
    reader.total_frames = 60  # as if the index promised frames the stream does not hold
    with pytest.raises(ValueError, match="ended after 40 of 60 frames"):
        list(reader.frames([0, 59]))


def test_http_video(clip, http_server):
    root, base = http_server
    (root / "clip.mp4").write_bytes(clip.read_bytes())
    on = FetchPolicy(allow_remote=True, allow_private_addresses=True)  # the test server is on loopback
    video = fetch_video({"video": f"{base}/clip.mp4", **SMALL}, policy=on)
    assert video.indices == fetch_video({"video": str(clip), **SMALL}).indices
    with pytest.raises(ValueError, match="remote video fetching is disabled"):
        fetch_video({"video": f"{base}/clip.mp4"})
    with pytest.raises(ValueError, match="byte limit"):
        fetch_video({"video": f"{base}/clip.mp4"}, policy=dataclasses.replace(on, max_video_bytes=1000))


def test_resize_chunks_do_not_change_pixels(clip, monkeypatch):
    a = fetch_video({"video": str(clip), "min_pixels": 784 * 30, "max_pixels": 784 * 40})
    monkeypatch.setattr(video_mod, "_RESIZE_CHUNK", 3)
    b = fetch_video({"video": str(clip), "min_pixels": 784 * 30, "max_pixels": 784 * 40})
    assert a.frames.shape[-2:] != (56, 56) and torch.equal(a.frames, b.frames)
