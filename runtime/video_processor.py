"""Qwen2-VL video preprocessing, bit-for-bit with transformers' ``Qwen2VLVideoProcessor`` (5.x).

transformers needs torchvision for this; the same float32 math is done here with torch alone:
``smart_resize`` (a no-op for frames ``fetch_video`` already sized) -> ``(x - mean/r) / (std/r)``
in float32, r = ``rescale_factor`` (transformers fuses rescale into normalize) -> pad T to a
multiple of ``temporal_patch_size`` with the last frame -> patchify into rows of C*T*P*P values,
ordered frame pair by frame pair, then in 2x2 merge blocks as images are.

``prepare`` keeps the frames as they come (uint8 after ``fetch_video``) and ``VideoPatches.rows``
builds float rows for a span of frame pairs on demand, so a long video never holds its whole
float32 ``pixel_values_videos`` (4x the uint8 frames) at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from qvl.runtime.processor import ImageProcessorConfig, _read_json, smart_resize

logger = logging.getLogger(__name__)

# qwen-vl-utils' sampling rate (its FPS); the rate assumed for frames given without one
DEFAULT_FPS = 2.0
# transformers' Qwen2VLVideoProcessor.size when a checkpoint sets no pixel limits
VIDEO_DEFAULT_MIN_PIXELS = 128 * 28 * 28
VIDEO_DEFAULT_MAX_PIXELS = 768 * 28 * 28


@dataclass
class VideoProcessorConfig(ImageProcessorConfig):
    min_pixels: int = VIDEO_DEFAULT_MIN_PIXELS
    max_pixels: int = VIDEO_DEFAULT_MAX_PIXELS

    @classmethod
    def from_dir(cls, path) -> "VideoProcessorConfig":
        """Read a checkpoint directory the way ``AutoVideoProcessor.from_pretrained`` does.

        Priority: ``processor_config.json``'s nested ``video_processor`` dict, then
        ``video_preprocessor_config.json``, then ``preprocessor_config.json`` (official Qwen2-VL
        checkpoints ship only this one, so images and videos share its pixel limits).
        """
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"checkpoint directory not found: {path}")
        nested = _read_json(path / "processor_config.json")
        if nested is not None and isinstance(nested.get("video_processor"), dict):
            return cls.from_dict(nested["video_processor"])
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            flat = _read_json(path / name)
            if flat is not None:
                return cls.from_dict(flat)
        logger.warning("no video processor config in %s; using Qwen2-VL defaults", path)
        return cls()


@dataclass
class VideoPatches:
    """One preprocessed video: frames [T, C, H, W] (uint8, or float32 if the processor resized)."""

    frames: torch.Tensor
    grid: tuple[int, int, int]  # (t, h, w) in patches; t = frame pairs
    processor: "VideoProcessor"
    fps: float = DEFAULT_FPS  # the rate the frames were sampled at

    @property
    def seconds_per_grid(self) -> float:
        """Seconds one temporal patch spans (Qwen2.5-VL's ``second_per_grid_ts``)."""
        return self.processor.cfg.temporal_patch_size / self.fps

    def __len__(self) -> int:
        t, h, w = self.grid
        return t * h * w

    def rows(self, t0: int = 0, t1: int | None = None) -> torch.Tensor:
        """float32 [(t1 - t0) * h * w, C*T*P*P] for temporal patches t0..t1."""
        t1 = self.grid[0] if t1 is None else t1
        return self.processor.patchify(self.frames, t0, t1)


class VideoProcessor:
    def __init__(self, cfg: VideoProcessorConfig | None = None):
        self.cfg = cfg or VideoProcessorConfig()
        c = self.cfg
        # transformers' _fuse_mean_std_and_rescale_factor, op for op (float32 tensor * python float)
        if c.do_rescale and c.do_normalize:
            self._mean = torch.tensor(c.image_mean) * (1.0 / c.rescale_factor)
            self._std = torch.tensor(c.image_std) * (1.0 / c.rescale_factor)
        else:
            self._mean = torch.tensor(c.image_mean, dtype=torch.float32)
            self._std = torch.tensor(c.image_std, dtype=torch.float32)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        c = self.cfg
        if not c.do_resize:
            return height, width
        return smart_resize(height, width, c.patch_size * c.merge_size, c.min_pixels, c.max_pixels)

    def prepare(self, frames: torch.Tensor, fps: float = DEFAULT_FPS) -> VideoPatches:
        """frames uint8 or float [T, C, H, W] (RGB), sampled at ``fps`` -> VideoPatches; nothing
        is normalized yet."""
        c = self.cfg
        if not fps > 0:
            raise ValueError(f"video fps must be positive, got {fps}")
        if frames.ndim != 4 or frames.shape[1] not in (1, 3) or frames.shape[0] < 1:
            raise ValueError(f"video frames must be [T, 3, H, W], got {tuple(frames.shape)}")
        if frames.shape[1] == 1:
            frames = frames.expand(-1, 3, -1, -1)  # grayscale_to_rgb
        h, w = self.target_size(*frames.shape[-2:])
        if (h, w) != tuple(frames.shape[-2:]):
            # torchvision on a float tensor: bicubic, antialias, no clamp or rounding
            frames = torch.cat([
                F.interpolate(frames[i:i + 16].float(), size=(h, w), mode="bicubic", align_corners=False,
                              antialias=True)
                for i in range(0, frames.shape[0], 16)
            ])
        f = c.patch_size * c.merge_size
        if h % f or w % f:
            raise ValueError(f"video frame size {h}x{w} is not a multiple of {f}; enable do_resize")
        t = -(-frames.shape[0] // c.temporal_patch_size)
        return VideoPatches(frames, (t, h // c.patch_size, w // c.patch_size), self, float(fps))

    def patchify(self, frames: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
        c = self.cfg
        tp, p, m = c.temporal_patch_size, c.patch_size, c.merge_size
        x = frames[t0 * tp:t1 * tp]
        if pad := (t1 - t0) * tp - x.shape[0]:  # odd frame count: repeat the last frame
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        x = x.to(torch.float32)
        if c.do_normalize:
            x = (x - self._mean.view(-1, 1, 1)) / self._std.view(-1, 1, 1)  # frames stay untouched
        elif c.do_rescale:
            x = x * c.rescale_factor
        gt, ch, gh, gw = t1 - t0, x.shape[1], x.shape[2] // p, x.shape[3] // p
        # [gt*tp, C, H, W] -> [gt, tp, C, gh/m, m, p, gw/m, m, p] -> [gt, gh/m, gw/m, m, m, C, tp, p, p]
        x = x.view(gt, tp, ch, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(gt * gh * gw, ch * tp * p * p)

    def __call__(self, videos: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Materialized (pixel_values_videos float32 [N, C*T*P*P], video_grid_thw int64 [n, 3])."""
        if isinstance(videos, torch.Tensor):
            videos = [videos]
        prepared = [self.prepare(v) for v in videos]
        pixel_values = torch.cat([v.rows() for v in prepared])
        return pixel_values, torch.tensor([v.grid for v in prepared], dtype=torch.int64)
