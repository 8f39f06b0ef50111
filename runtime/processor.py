"""Qwen2-VL image preprocessing, bit-for-bit with transformers' ``Qwen2VLImageProcessorPil``.

Pipeline per image (transformers 5.x, PIL backend):
  RGB conversion (alpha composited onto white) -> PIL resize to ``smart_resize`` size ->
  ``float64(u8) * rescale_factor`` cast to float32 -> ``(x - mean) / std`` in float32 ->
  patchify into rows of ``C * T * P * P`` values.
Rescale and normalize are elementwise functions of one uint8 value and its channel, so they are
evaluated once per (channel, value) into a lookup table with the same numpy ops transformers uses;
gathering from that table gives identical float32 bits at a fraction of the cost.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200


@dataclass
class ImageProcessorConfig:
    """Image settings of a Qwen2-VL checkpoint; defaults are transformers' class defaults."""

    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple = OPENAI_CLIP_MEAN
    image_std: tuple = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "ImageProcessorConfig":
        """Build from an image-processor dict, resolving pixel limits as transformers 5 does.

        Precedence per limit: top-level ``min_pixels``/``max_pixels`` > ``size.shortest_edge``/
        ``size.longest_edge`` > ``size.min_pixels``/``size.max_pixels`` > default. transformers
        loads a bare ``size: {min_pixels, max_pixels}`` but then fails on the first call; here
        those values are used instead, as older transformers and the Qwen docs intend.
        """
        known = {f.name for f in fields(cls)} - {"min_pixels", "max_pixels"}
        kw = {k: v for k, v in d.items() if k in known and v is not None}
        for k in ("image_mean", "image_std"):
            if k in kw:
                v = kw[k]
                kw[k] = tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else (float(v),) * 3
        size = d.get("size")
        if size is not None and not isinstance(size, dict):
            logger.warning("ignoring non-dict image processor size %r", size)
            size = None
        size = size or {}
        # the class's own defaults: the video processor subclass has other limits
        for name, top, edge, alias, default in (
            ("min_pixels", "min_pixels", "shortest_edge", "min_pixels", cls.min_pixels),
            ("max_pixels", "max_pixels", "longest_edge", "max_pixels", cls.max_pixels),
        ):
            for v in (d.get(top), size.get(edge), size.get(alias)):
                if v is not None:
                    kw[name] = int(v)
                    break
            else:
                if size:
                    logger.warning("image processor size %r lacks %s; using %d", size, edge, default)
        return cls(**kw)

    @classmethod
    def from_dir(cls, path) -> "ImageProcessorConfig":
        """Read a checkpoint directory the way ``AutoImageProcessor.from_pretrained`` does.

        ``processor_config.json`` wins when it nests an ``image_processor`` dict (transformers 5 /
        GPTQModel exports); otherwise ``preprocessor_config.json`` (official checkpoints).
        """
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"checkpoint directory not found: {path}")
        nested = _read_json(path / "processor_config.json")
        if nested is not None and isinstance(nested.get("image_processor"), dict):
            return cls.from_dict(nested["image_processor"])
        flat = _read_json(path / "preprocessor_config.json")
        if flat is not None:
            return cls.from_dict(flat)
        logger.warning("no image processor config in %s; using Qwen2-VL defaults", path)
        return cls()


def _read_json(file: Path) -> dict | None:
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {file}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """Target (height, width), both multiples of ``factor``, with area in [min, max] pixels.

    Exactly transformers' Qwen2-VL ``smart_resize`` (Python banker's ``round``; the shrink branch
    clamps each side to >= ``factor``). qwen-vl-utils' variant differs at the edges; see
    ``qvl.runtime.inputs``.
    """
    if min(height, width) <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image aspect ratio {ratio:.1f} ({height}x{width}) exceeds the Qwen2-VL limit of "
            f"{MAX_ASPECT_RATIO}; crop or pad the image first"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image: Image.Image) -> Image.Image:
    """transformers' ``convert_to_rgb``: any alpha (band or ``transparency``) composited on white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    # convert() of an RGB image is a pure copy; skip it for large photos
    return image if image.mode == "RGB" else image.convert("RGB")


class ImageProcessor:
    """Turns PIL images into Qwen2-VL vision-tower inputs.

    Output rows are ordered image by image, then by 2x2 merge block (row-major over blocks), then
    row-major inside a block; each row is ``[C][T][P][P]`` with the still frame repeated T times.
    """

    def __init__(self, cfg: ImageProcessorConfig | None = None):
        self.cfg = cfg or ImageProcessorConfig()
        self._lut = self._build_lut()

    def _build_lut(self) -> np.ndarray:
        """[3 * 256] float32 table equal to transformers' rescale+normalize of each uint8 value."""
        c = self.cfg
        x = np.arange(256, dtype=np.uint8)[None, :].repeat(3, axis=0)
        if c.do_rescale:
            x = (x.astype(np.float64) * c.rescale_factor).astype(np.float32)
        if c.do_normalize:
            if not np.issubdtype(x.dtype, np.floating):
                x = x.astype(np.float32)
            mean = np.array(c.image_mean, dtype=x.dtype)[:, None]
            std = np.array(c.image_std, dtype=x.dtype)[:, None]
            x = (x - mean) / std
        return np.ascontiguousarray(x, dtype=np.float32).reshape(-1)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this size is resized to."""
        c = self.cfg
        if not c.do_resize:
            return height, width
        return smart_resize(height, width, c.patch_size * c.merge_size, c.min_pixels, c.max_pixels)

    def _prepare(self, image: Image.Image) -> np.ndarray:
        if not isinstance(image, Image.Image):
            raise TypeError(f"ImageProcessor takes PIL images, got {type(image).__name__}")
        c = self.cfg
        if c.do_convert_rgb:
            image = to_rgb(image)
        elif image.mode != "RGB":
            raise ValueError(f"do_convert_rgb is off but the image is mode {image.mode!r}, not RGB")
        h, w = self.target_size(image.height, image.width)
        # transformers always calls resize, but PIL returns a plain copy for a same-size resize
        if (h, w) != (image.height, image.width):
            image = image.resize((w, h), resample=c.resample)
        f = c.patch_size * c.merge_size
        if h % f or w % f:
            raise ValueError(f"image size {h}x{w} is not a multiple of {f}; enable do_resize")
        return np.asarray(image, dtype=np.uint8)

    def _patchify(self, hwc: np.ndarray, out: np.ndarray) -> tuple[int, int]:
        c = self.cfg
        p, m, t = c.patch_size, c.merge_size, c.temporal_patch_size
        h, w, ch = hwc.shape
        gh, gw = h // p, w // p
        blocks = hwc.reshape(gh // m, m, p, gw // m, m, p, ch).transpose(0, 3, 1, 4, 6, 2, 5)
        idx = blocks.reshape(gh * gw, ch, p * p).astype(np.intp)
        idx += (np.arange(ch, dtype=np.intp) * 256)[:, None]
        vals = self._lut[idx]
        out.reshape(gh * gw, ch, t, p * p)[...] = vals[:, :, None, :]
        return gh, gw

    def __call__(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (pixel_values float32 [sum(t*h*w), C*T*P*P], image_grid_thw int64 [n, 3])."""
        if isinstance(images, Image.Image):
            images = [images]
        if not images:
            raise ValueError("ImageProcessor needs at least one image")
        c = self.cfg
        arrays = [self._prepare(im) for im in images]
        n_rows = [a.shape[0] * a.shape[1] // (c.patch_size**2) for a in arrays]
        dim = 3 * c.temporal_patch_size * c.patch_size**2
        pixel_values = np.empty((sum(n_rows), dim), dtype=np.float32)
        grids, start = [], 0
        for arr, n in zip(arrays, n_rows):
            gh, gw = self._patchify(arr, pixel_values[start : start + n])
            grids.append((1, gh, gw))
            start += n
        return torch.from_numpy(pixel_values), torch.tensor(grids, dtype=torch.int64)
