"""Regenerate tests/data/video_parity.npz: reference video preprocessing from the real libraries.

The reference is qwen-vl-utils 0.0.14 ``fetch_video`` followed by transformers'
``Qwen2VLVideoProcessor``, which need torchvision (and decord for files), none of which qvl
installs. Run this in a throwaway environment outside the repo, e.g.::

    python -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==5.24.0 \\
        qwen-vl-utils==0.0.14 decord av
    /tmp/refvenv/bin/python scripts/make_video_fixtures.py

Two kinds of case:
- ``frames``: videos given as uint8 arrays from ``moving_squares`` (pure numpy, reproducible
  anywhere). A stand-in ``decord`` module serves them, so qwen-vl-utils' own
  ``_read_video_decord`` (frame range, ``smart_nframes``, linspace indices) and its torchvision
  resize run unchanged; frame lists go through its list path. Stored: indices, the resized
  frames, ``video_grid_thw`` and the sha256 of ``pixel_values_videos`` (float32 bytes).
- ``file``: small videos encoded with PyAV, read by the real decord. Stored: frame count, fps,
  indices and the resized frames, to check the PyAV reader against decord.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import sys
import tempfile
import types

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "data" / "video_parity.npz"

# (name, video spec, item keys, video processor kwargs or None for the tiny checkpoint's config)
FRAME_CASES = [
    ("defaults", dict(n=16, w=56, h=56, fps=4), {}, None),
    ("nframes", dict(n=16, w=90, h=60, fps=4), {"nframes": 6, "min_pixels": 784 * 4, "max_pixels": 784 * 12}, None),
    ("fps_total_pixels", dict(n=30, w=64, h=48, fps=10),
     {"fps": 1.0, "min_frames": 4, "max_frames": 8, "min_pixels": 3136, "total_pixels": 20000}, None),
    ("start_end", dict(n=40, w=60, h=40, fps=8),
     {"video_start": 1.0, "video_end": 4.0, "min_pixels": 3136, "max_pixels": 6000}, None),
    ("resized_hw", dict(n=12, w=80, h=50, fps=6), {"resized_height": 70, "resized_width": 100}, None),
    ("long_fps_cap", dict(n=600, w=32, h=24, fps=30), {"min_pixels": 784, "max_pixels": 784 * 2}, None),
    ("processor_resizes", dict(n=8, w=56, h=56, fps=4), {"min_pixels": 784, "max_pixels": 3136},
     {"min_pixels": 112 * 112, "max_pixels": 168 * 168}),
    ("frame_list", dict(n=5, w=100, h=60, list=True), {"min_pixels": 784 * 4, "max_pixels": 784 * 16}, None),
    ("frame_list_defaults", dict(n=4, w=70, h=70, list=True), {}, None),
]
FILE_CASES = [
    ("mp4_h264", dict(n=16, w=56, h=56, fps=4, codec="libx264", ext="mp4"), {"min_pixels": 3136, "max_pixels": 6272}),
    ("mkv_h264", dict(n=13, w=56, h=42, fps=7, codec="libx264", ext="mkv"), {"fps": 3.0, "min_pixels": 3136,
                                                                           "max_pixels": 6272}),
    ("webm_vp8", dict(n=11, w=64, h=48, fps=3, codec="libvpx", ext="webm"), {"nframes": 4, "min_pixels": 3136,
                                                                            "max_pixels": 6272}),
]


def _import_qvl():
    try:
        import qvl  # noqa: F401
    except ImportError:
        # the repo root is the `qvl` package; expose it under that name without installing
        shim = pathlib.Path(tempfile.mkdtemp(prefix="qvl-shim-"))
        (shim / "qvl").symlink_to(REPO)
        sys.path.insert(0, str(shim))


class _FakeReader:
    """decord.VideoReader over in-memory frames registered by path."""

    videos: dict = {}

    def __init__(self, path, *a, **k):
        self.frames, self.fps = self.videos[path]

    def __len__(self):
        return len(self.frames)

    def get_avg_fps(self):
        return self.fps

    def get_batch(self, idx):
        return types.SimpleNamespace(asnumpy=lambda: self.frames[list(idx)])


def main():
    _import_qvl()
    import torch
    from PIL import Image
    from transformers import AutoVideoProcessor, Qwen2VLVideoProcessor

    from qvl.scripts.sample_videos import moving_squares, write_video
    from qvl.scripts.tiny import PREPROCESSOR_CONFIG

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="qvl-video-fixtures-"))
    (tmp / "ckpt").mkdir()
    (tmp / "ckpt" / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG))
    # encode before decord decodes anything: its bundled FFmpeg libraries, once loaded, break
    # PyAV's libvpx encoder in the same process
    paths = {name: write_video(tmp / f"{name}.{spec['ext']}", moving_squares(spec["n"], spec["w"], spec["h"]),
                               fps=spec["fps"], codec=spec["codec"]) for name, spec, _ in FILE_CASES}
    tiny_vp = AutoVideoProcessor.from_pretrained(tmp / "ckpt")
    out = {"tiny_video_size": np.array([tiny_vp.size["shortest_edge"], tiny_vp.size["longest_edge"]])}
    meta = {"versions": {}}

    import decord as real_decord
    import qwen_vl_utils
    import torchvision
    import transformers
    from qwen_vl_utils import vision_process as vp

    meta["versions"] = {"qwen_vl_utils": "0.0.14", "torch": torch.__version__, "torchvision": torchvision.__version__,
                        "transformers": transformers.__version__, "decord": real_decord.__version__}
    del qwen_vl_utils

    def reference(item, proc_kwargs):
        video, vmeta = vp.fetch_video(dict(item), return_video_metadata=True)
        proc = tiny_vp if proc_kwargs is None else Qwen2VLVideoProcessor(**proc_kwargs)
        res = proc(videos=[video], do_sample_frames=False, return_tensors="pt")
        pv = res["pixel_values_videos"].numpy()
        return video, vmeta, pv, res["video_grid_thw"].numpy()

    fake = types.ModuleType("decord")
    fake.VideoReader = _FakeReader
    fake.__version__ = "fake"
    vp.get_video_reader_backend.cache_clear()
    vp.FORCE_QWENVL_VIDEO_READER = "decord"
    cases = []
    for name, spec, item, proc_kwargs in FRAME_CASES:
        frames = moving_squares(spec["n"], spec["w"], spec["h"])
        if spec.get("list"):
            full = {"type": "video", "video": [Image.fromarray(f) for f in frames], **item}
            sys.modules["decord"] = real_decord
        else:
            key = f"mem://{name}"
            _FakeReader.videos[key] = (frames, float(spec["fps"]))
            sys.modules["decord"] = fake
            full = {"type": "video", "video": key, **item}
        video, vmeta, pv, grid = reference(full, proc_kwargs)
        frames_u8 = video.numpy().astype(np.uint8)
        assert np.array_equal(frames_u8.astype(np.float32), video.numpy()), "frames not integral"
        if frames_u8.nbytes <= 200_000:  # keeps the file small; big cases keep only hashes
            out[f"{name}/frames"] = frames_u8
        out[f"{name}/indices"] = np.asarray(vmeta["frames_indices"], dtype=np.int64)
        out[f"{name}/grid"] = grid
        cases.append({"name": name, "kind": "frames", "spec": spec, "item": item, "processor": proc_kwargs,
                      "frames_shape": list(frames_u8.shape),
                      "frames_sha256": hashlib.sha256(frames_u8.tobytes()).hexdigest(),
                      "pv_shape": list(pv.shape), "pv_sha256": hashlib.sha256(pv.tobytes()).hexdigest()})
        print(name, video.shape, grid.tolist(), pv.shape)

    sys.modules["decord"] = real_decord
    from qvl.runtime.video import fetch_video as qvl_fetch_video

    for name, spec, item in FILE_CASES:
        path = paths[name]
        video, vmeta, pv, grid = reference({"type": "video", "video": str(path), **item}, None)
        assert vmeta["video_backend"] == "decord", vmeta
        ref = video.numpy().astype(np.uint8)
        ours = qvl_fetch_video({"video": str(path), **item}, backend="pyav")
        diff = np.abs(ours.frames.numpy().astype(int) - ref.astype(int))
        out[f"{name}/frames"] = ref
        out[f"{name}/indices"] = np.asarray(vmeta["frames_indices"], dtype=np.int64)
        out[f"{name}/grid"] = grid
        cases.append({"name": name, "kind": "file", "spec": spec, "item": item,
                      "total_frames": int(vmeta["total_num_frames"]), "fps": float(vmeta["fps"]),
                      "pyav_vs_decord_max_abs_diff": int(diff.max()), "pyav_indices_equal":
                      ours.indices == list(vmeta["frames_indices"])})
        print(name, cases[-1])
    meta["cases"] = cases
    out["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
