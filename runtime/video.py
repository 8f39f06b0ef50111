"""Video loading for chat messages, with qwen-vl-utils 0.0.14 ``fetch_video`` semantics.

Sources: a file (path, ``file://``, or ``http(s)://`` when remote fetching is allowed), a list
of frame images (anything ``load_image`` takes), or a uint8 frames array. File videos are read
with decord when it is installed, else PyAV (``pip install 'qvl[video]'``); ``QVL_VIDEO_READER``
= ``decord`` | ``pyav`` forces one. Both count frames the way decord does and choose the same
indices (qwen-vl-utils' ``smart_nframes`` + ``linspace``).

Memory stays bounded by the sampled frames, not the video's length: only the sampled indices are
converted to RGB, and they are resized to the model size a few at a time as they arrive, so a
20-minute video costs its ~768 small output frames plus one chunk of source frames.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from qvl.runtime.fetch import FetchPolicy, download, is_url
from qvl.runtime.inputs import (IMAGE_SETTINGS, SPATIAL_MERGE_SIZE, _describe, check_item, fetch_image,
                                smart_resize_vl_utils)

logger = logging.getLogger(__name__)

# qwen-vl-utils 0.0.14 constants (vision_process.py)
VIDEO_MIN_TOKEN_NUM = 128
VIDEO_MAX_TOKEN_NUM = 768
FPS = 2.0
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
DEFAULT_MODEL_SEQ_LEN = 128000

_RESIZE_CHUNK = 8  # source frames held at once while resizing
INSTALL_HINT = "pip install 'qvl[video]'  (PyAV; or install decord)"


class VideoBackendMissing(ImportError):
    pass


@dataclass
class Video:
    """Sampled, resized frames of one video item, ready for the video processor."""

    frames: torch.Tensor  # uint8 [T, 3, H, W], T even, H and W multiples of 28
    sample_fps: float
    indices: list[int] = field(default_factory=list)  # source frame index of each frame
    total_frames: int = 0
    fps: float = 0.0
    backend: str = ""


def _round(x, f):
    return round(x / f) * f


def _ceil(x, f):
    return math.ceil(x / f) * f


def _floor(x, f):
    return math.floor(x / f) * f


def smart_nframes(item: dict, total_frames: int, video_fps: float) -> int:
    """Number of frames to sample, exactly qwen-vl-utils' ``smart_nframes``.

    ``nframes`` (rounded to FRAME_FACTOR) or ``fps`` (default 2) clamped to
    [``min_frames``, ``max_frames``] and to the video, floored to FRAME_FACTOR.
    """
    if "fps" in item and "nframes" in item:
        raise ValueError("a video item takes either 'fps' or 'nframes', not both")
    if "nframes" in item:
        nframes = _round(item["nframes"], FRAME_FACTOR)
    else:
        fps = item.get("fps", FPS)
        min_frames = _ceil(item.get("min_frames", FPS_MIN_FRAMES), FRAME_FACTOR)
        max_frames = _floor(item.get("max_frames", min(FPS_MAX_FRAMES, total_frames)), FRAME_FACTOR)
        nframes = total_frames / video_fps * fps
        if nframes > total_frames:
            logger.warning("smart_nframes: nframes[%s] > total_frames[%s]", nframes, total_frames)
        nframes = min(min(max(nframes, min_frames), max_frames), total_frames)
        nframes = _floor(nframes, FRAME_FACTOR)
    if not FRAME_FACTOR <= nframes <= total_frames:
        raise ValueError(f"nframes should be in [{FRAME_FACTOR}, {total_frames}] for this video, got {nframes}")
    return int(nframes)


def frame_range(item: dict, total_frames: int, video_fps: float) -> tuple[int, int, int]:
    """(start, end, count) of the ``video_start``/``video_end`` window (seconds), as qwen-vl-utils."""
    if video_fps <= 0:
        raise ValueError(f"video fps must be positive, got {video_fps}")
    if total_frames <= 0:
        raise ValueError("the video has no frames")
    start_s, end_s = item.get("video_start"), item.get("video_end")
    if start_s is None and end_s is None:
        return 0, total_frames - 1, total_frames
    duration = total_frames / video_fps
    start = math.ceil(max(0.0, min(start_s, duration)) * video_fps) if start_s is not None else 0
    end = total_frames - 1
    if end_s is not None:
        end = min(math.floor(max(0.0, min(end_s, duration)) * video_fps), total_frames - 1)
    if start >= end:
        raise ValueError(f"invalid time range: start frame {start} >= end frame {end} "
                         f"({total_frames} frames at {video_fps} fps)")
    return start, end, end - start + 1


def sample_indices(item: dict, total_frames: int, video_fps: float) -> tuple[list[int], float]:
    """Source frame indices to decode and the resulting sample fps (qwen-vl-utils' decord path)."""
    start, end, count = frame_range(item, total_frames, video_fps)
    nframes = smart_nframes(item, count, video_fps)
    # float32 as in the reference (torch's default dtype); pinned so a caller's default dtype
    # (bf16, say) cannot move the rounding
    idx = torch.linspace(start, end, nframes, dtype=torch.float32).round().long().tolist()
    return idx, nframes / max(count, 1e-6) * video_fps


def video_frame_size(height: int, width: int, nframes: int, item: dict, factor: int = 28) -> tuple[int, int]:
    """Per-frame (height, width) of qwen-vl-utils' ``fetch_video``.

    The per-frame pixel cap is an even share of the ``total_pixels`` budget (default
    MODEL_SEQ_LEN env, 128000 tokens, x 0.9) per pair of frames, capped at 768 tokens and floored
    at 1.05 x ``min_pixels`` (default 128 tokens); ``max_pixels`` can only lower it.
    """
    min_pixels = item.get("min_pixels", VIDEO_MIN_TOKEN_NUM * factor * factor)
    seq_len = int(float(os.environ.get("MODEL_SEQ_LEN", DEFAULT_MODEL_SEQ_LEN)))
    total_pixels = item.get("total_pixels", seq_len * factor * factor * 0.9)
    max_pixels = max(min(VIDEO_MAX_TOKEN_NUM * factor * factor, total_pixels / nframes * FRAME_FACTOR),
                     int(min_pixels * 1.05))
    wanted = item.get("max_pixels", max_pixels)
    if wanted > max_pixels:
        logger.warning("the given max_pixels[%s] exceeds limit[%s]", wanted, max_pixels)
    max_pixels = min(wanted, max_pixels)
    if "resized_height" in item and "resized_width" in item:
        return smart_resize_vl_utils(item["resized_height"], item["resized_width"], factor)
    return smart_resize_vl_utils(height, width, factor, min_pixels=min_pixels, max_pixels=max_pixels)


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [N, C, H, W] -> uint8 [N, C, h, w], bit-exact with torchvision's ``resize``.

    torchvision (bicubic, antialias, uint8 input) interpolates in float32, clamps and rounds;
    qwen-vl-utils then casts to float, which the video processor reproduces from these bytes.
    """
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames  # bicubic at scale 1 is the identity
    out = F.interpolate(frames.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    return out.clamp_(0, 255).round_().to(torch.uint8)


def _resize_stream(frames: Iterable[np.ndarray], nframes: int, item: dict, factor: int, what) -> torch.Tensor:
    """Resize HxWx3 uint8 frames as they arrive into one uint8 [nframes, 3, h, w] tensor."""
    out, size, shape, chunk, done = None, None, None, [], 0

    def flush():
        nonlocal done
        x = torch.from_numpy(np.stack(chunk)).permute(0, 3, 1, 2)  # [n, H, W, 3] -> [n, 3, H, W]
        out[done:done + len(chunk)] = resize_frames(x, size)
        done += len(chunk)
        chunk.clear()

    for frame in frames:
        if out is None:
            shape = frame.shape
            size = video_frame_size(shape[0], shape[1], nframes, item, factor)
            out = torch.empty(nframes, 3, *size, dtype=torch.uint8)
        elif frame.shape != shape:
            raise ValueError(f"frames of video {_describe(what)} change size: {frame.shape} after {shape}")
        chunk.append(frame)
        if len(chunk) == _RESIZE_CHUNK:
            flush()
    if chunk:
        flush()
    if done != nframes:
        raise ValueError(f"video {_describe(what)} gave {done} frames, expected {nframes}")
    return out


# ---- file readers -------------------------------------------------------------------------------


def reader_backend() -> str:
    """``QVL_VIDEO_READER`` if set, else decord when importable, else PyAV."""
    forced = os.environ.get("QVL_VIDEO_READER", "").strip().lower()
    if forced:
        if forced not in _READERS:
            raise ValueError(f"QVL_VIDEO_READER={forced!r}; expected one of {sorted(_READERS)}")
        return forced
    for name, module in (("decord", "decord"), ("pyav", "av")):
        if importlib.util.find_spec(module) is not None:
            return name
    raise VideoBackendMissing(f"reading video files needs decord or PyAV, and neither is installed: {INSTALL_HINT}")


class _DecordReader:
    name = "decord"

    def __init__(self, path: str):
        try:
            import decord
        except ImportError as e:
            raise VideoBackendMissing(f"QVL_VIDEO_READER=decord but decord is not importable: {e}") from e
        try:
            self._vr = decord.VideoReader(path)
            self.total_frames, self.fps = len(self._vr), float(self._vr.get_avg_fps())
        except Exception as e:  # decord raises DECORDError / RuntimeError on unreadable files
            raise ValueError(f"cannot read video {path}: {type(e).__name__}: {e}") from e

    def frames(self, indices: list[int]) -> Iterator[np.ndarray]:
        for i in range(0, len(indices), _RESIZE_CHUNK):
            try:
                batch = self._vr.get_batch(indices[i:i + _RESIZE_CHUNK]).asnumpy()
            except Exception as e:
                raise ValueError(f"cannot decode frames {indices[i:i + _RESIZE_CHUNK]}: {type(e).__name__}: {e}") from e
            yield from batch


class _PyAVReader:
    """Sequential PyAV decoding that keeps only the wanted frames.

    Frames are counted like decord, one per demuxed packet of the stream (container frame counts
    and durations are absent or rounded in mkv/webm), and numbered in presentation order.
    """

    name = "pyav"

    def __init__(self, path: str):
        try:
            import av
        except ImportError as e:
            raise VideoBackendMissing(f"PyAV is not importable ({e}): {INSTALL_HINT}") from e
        self._av, self.path = av, path
        try:
            with av.open(path) as container:
                if not container.streams.video:
                    raise ValueError(f"no video stream in {path} (not a video, or truncated)")
                stream = container.streams.video[0]
                self.fps = float(stream.average_rate or stream.guessed_rate or 0)
                self.total_frames = sum(1 for p in container.demux(stream) if p.size > 0)
                declared = (container.duration or 0) / 1e6
        except av.FFmpegError as e:
            raise ValueError(f"cannot read video {path}: {e}") from e
        if self.total_frames == 0:
            raise ValueError(f"no frames in video {path} (empty, truncated or corrupt)")
        # mkv/webm stay readable when cut short (decord reads them the same way); say so
        if self.fps > 0 and declared > 0 and self.total_frames / self.fps < 0.8 * declared:
            logger.warning("video %s holds %d frames (%.1fs at %.3g fps) but declares %.1fs; it may be "
                           "truncated", path, self.total_frames, self.total_frames / self.fps, self.fps, declared)

    def frames(self, indices: list[int]) -> Iterator[np.ndarray]:
        wanted, last = Counter(indices), max(indices)
        seen = 0
        try:
            with self._av.open(self.path) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for i, frame in enumerate(container.decode(stream)):
                    seen = i + 1
                    if i in wanted:
                        rgb = frame.to_ndarray(format="rgb24")
                        for _ in range(wanted[i]):
                            yield rgb
                    if i >= last:
                        return
        except self._av.FFmpegError as e:
            raise ValueError(f"cannot decode video {self.path} after {seen} frames: {e}") from e
        raise ValueError(f"video {self.path} ended after {seen} of {self.total_frames} frames; the file "
                         "is truncated or corrupt")


_READERS = {"decord": _DecordReader, "pyav": _PyAVReader}


def open_video(path: str, backend: str | None = None):
    """A reader with ``total_frames``, ``fps`` and ``frames(indices)`` (HxWx3 uint8 arrays)."""
    if not Path(path).is_file():
        raise ValueError(f"video file not found: {_describe(path)}")
    if _is_still_image(path):
        raise ValueError(f"{_describe(path)} is a still image, not a video: send it as an image item "
                         "({'type': 'image', 'image': ...}) or as a list of frames")
    return _READERS[backend or reader_backend()](path)


def _is_still_image(path: str) -> bool:
    """True for a file PIL reads as a single-frame picture (a PNG or JPEG named as a video)."""
    try:
        with Image.open(path) as im:
            return getattr(im, "n_frames", 1) == 1
    except Exception:  # noqa: BLE001 - not a picture PIL knows: leave it to the video readers
        return False


@contextlib.contextmanager
def _local_file(source, policy: FetchPolicy | None):
    if isinstance(source, Path):
        yield str(source)
    elif is_url(source):
        policy = policy or FetchPolicy()
        suffix = Path(source.split("?", 1)[0]).suffix[:8]
        with tempfile.NamedTemporaryFile(prefix="qvl-video-", suffix=suffix) as tmp:
            download(source, tmp, policy.max_video_bytes, policy, "video")
            tmp.flush()
            yield tmp.name
    elif source.startswith("data:"):
        raise ValueError(f"data: URIs are not supported for videos: {_describe(source)}")
    else:
        yield source[7:] if source.startswith("file://") else source


def _frame_list(source) -> list:
    if isinstance(source, torch.Tensor):
        if source.dtype != torch.uint8 or source.ndim != 4 or source.shape[1] not in (3, 4):
            raise ValueError(f"video tensors must be uint8 [T, C, H, W] (C = 3 or 4), got "
                             f"{source.dtype} {tuple(source.shape)}")
        source = source.permute(0, 2, 3, 1).numpy()  # TCHW, the layout torchvision and qwen-vl-utils use
    if isinstance(source, np.ndarray):
        if source.ndim == 3 and source.shape[2] in (3, 4):
            raise ValueError(f"video arrays must be uint8 [T, H, W, 3]; {_describe(source)} looks like one "
                             "[H, W, C] image: send it as an image item, or add a frame axis")
        if source.dtype != np.uint8 or source.ndim != 4 or source.shape[3] not in (3, 4):
            raise ValueError(f"video arrays must be uint8 [T, H, W, 3] (or 4 channels), got {_describe(source)}")
        return list(source)
    return list(source)


def fetch_video(item: dict, image_patch_size: int = 14, policy: FetchPolicy | None = None,
                backend: str | None = None) -> Video:
    """Load, sample and resize one video content item exactly as ``qwen_vl_utils.fetch_video``.

    Item keys: ``video`` (source), ``fps`` or ``nframes``, ``min_frames``, ``max_frames``,
    ``video_start``/``video_end`` (seconds; files only), ``min_pixels``, ``max_pixels``,
    ``total_pixels``, ``resized_height`` + ``resized_width``.
    For frame lists, each frame first goes through ``fetch_image`` with the item's keys and
    ``image_patch_size`` = 28, as qwen-vl-utils 0.0.14 does (it passes its 28-pixel factor where a
    patch size is expected, so list frames are first sized to multiples of 56); an odd count is
    padded by repeating the last frame.
    """
    if not isinstance(item, dict) or "video" not in item:
        raise ValueError(f"video item needs a 'video' key, got {_describe(item)}")
    check_item("video", item, "video item")
    factor = image_patch_size * SPATIAL_MERGE_SIZE
    source = item["video"]
    if isinstance(source, (str, Path)):
        with _local_file(source, policy) as path:
            reader = open_video(path, backend)
            indices, sample_fps = sample_indices(item, reader.total_frames, reader.fps)
            frames = _resize_stream(reader.frames(indices), len(indices), item, factor, source)
            logger.info("%s: %s, %d of %d frames at %.3g fps", reader.name, _describe(source), len(indices),
                        reader.total_frames, reader.fps)
            return Video(frames, sample_fps, indices, reader.total_frames, reader.fps, reader.name)
    if isinstance(source, Image.Image):
        raise ValueError("a video item holds one PIL image: send a still picture as an image item "
                         "({'type': 'image', 'image': ...}), or a list of frames")
    if not isinstance(source, (list, tuple, np.ndarray, torch.Tensor)):
        raise ValueError(f"unsupported video source type {type(source).__name__}: {_describe(source)}; expected "
                         "a path, file:// or http(s) URL, a list of frames or a uint8 frames array")
    frames = _frame_list(source)
    if not frames:
        raise ValueError("a video given as frames needs at least one frame")
    info = {k: v for k, v in item.items() if k in IMAGE_SETTINGS}  # what fetch_image reads of the item
    images = [fetch_image({"image": f, **info}, factor, policy) for f in frames]
    nframes = _ceil(len(images), FRAME_FACTOR)
    images += [images[-1]] * (nframes - len(images))
    sample_fps = float(item.get("sample_fps", 2.0))
    raw_fps = float(item.get("raw_fps", sample_fps))
    # the rate transformers reads from qwen-vl-utils' metadata for frame lists (frames_indices over
    # total_num_frames = nframes / sample_fps * raw_fps, times raw_fps), to the last bit: Qwen2.5-VL's
    # time ids follow it
    sample_fps = nframes / (nframes / sample_fps * raw_fps) * raw_fps
    arrays = (np.asarray(im) for im in images)
    video = _resize_stream(arrays, nframes, item, factor, "frames")
    return Video(video, sample_fps, list(range(nframes)), nframes, raw_fps, "frames")

