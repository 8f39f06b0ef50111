"""Image loading for chat messages, with qwen-vl-utils 0.0.14 ``fetch_image`` semantics.

Qwen's reference pipeline runs ``qwen_vl_utils.process_vision_info`` before the HF processor, and
that step always resizes each image itself (its own pixel limits, per-item overrides). Matching it
here keeps token counts and pixels identical to what users of the reference pipeline see. The
image processor then finds sizes that are already multiples of 28 and leaves them alone.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image

from qvl.runtime.fetch import FetchPolicy, download, is_url

logger = logging.getLogger(__name__)

# qwen-vl-utils 0.0.14 constants (vision_process.py)
MAX_RATIO = 200
SPATIAL_MERGE_SIZE = 2
IMAGE_MIN_TOKEN_NUM = 4
IMAGE_MAX_TOKEN_NUM = 16384

_IMAGE_KEYS = ("image", "image_url")
_KNOWN_TYPES = ("text", "image", "image_url", "video")


def _describe(source, limit: int = 80) -> str:
    """Short printable name of a source; data URIs can be megabytes long."""
    if isinstance(source, np.ndarray):
        return f"ndarray(shape={source.shape}, dtype={source.dtype})"
    text = repr(source) if not isinstance(source, (str, Path)) else str(source)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _decode(data: bytes, what) -> Image.Image:
    """Fully decode ``data``; the returned image holds no OS file handle."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Image.DecompressionBombError as e:
        raise ValueError(
            f"refusing to decode image {_describe(what)}: {e} (raise PIL.Image.MAX_IMAGE_PIXELS "
            "if the image is trusted)"
        ) from e
    # PIL's format plugins raise many exception types on corrupt input (OSError, SyntaxError,
    # struct.error, EOFError, ...); all of them mean "not a readable image".
    except Exception as e:
        raise ValueError(f"cannot decode image {_describe(what)}: {type(e).__name__}: {e}") from e
    return image


def _read_path(path, what) -> Image.Image:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as e:
        raise ValueError(f"image file not found: {_describe(what)}") from e
    except OSError as e:
        raise ValueError(f"cannot read image file {_describe(what)}: {e}") from e
    return _decode(data, what)


def load_image(source, policy: FetchPolicy | None = None) -> Image.Image:
    """Load one image source as a decoded PIL image (mode unchanged, no resizing).

    Accepts a path (str or Path), ``file://`` URI (the prefix is stripped, as qwen-vl-utils
    does), ``http(s)://`` URL (only when ``policy.allow_remote``; see ``qvl.runtime.fetch``),
    ``data:image/...;base64,...`` URI, PIL image (returned as is) or uint8 array of shape
    HxW, HxWx3 or HxWx4. Every failure is a ValueError naming the source. Images above PIL's
    hard decompression-bomb limit (2 * ``Image.MAX_IMAGE_PIXELS``) are refused.
    """
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or not (
            source.ndim == 2 or (source.ndim == 3 and source.shape[2] in (3, 4))
        ):
            raise ValueError(f"image arrays must be uint8 HxW, HxWx3 or HxWx4, got {_describe(source)}")
        return Image.fromarray(np.ascontiguousarray(source))
    if isinstance(source, Path):
        return _read_path(source, source)
    if not isinstance(source, str):
        raise ValueError(
            f"unsupported image source type {type(source).__name__}: {_describe(source)}; expected a "
            "path, file:// or data: URI, PIL.Image or uint8 numpy array"
        )
    if is_url(source):
        policy = policy or FetchPolicy()
        buf = io.BytesIO()
        download(source, buf, policy.max_image_bytes, policy, "image")
        return _decode(buf.getvalue(), source)
    if source.startswith("file://"):
        return _read_path(source[7:], source)
    if source.startswith("data:"):
        if not source.startswith("data:image") or "base64," not in source:
            raise ValueError(f"only base64 data:image URIs are supported, got {_describe(source)}")
        try:
            # non-validating, like qwen-vl-utils: stray characters such as newlines are skipped
            data = base64.b64decode(source.split("base64,", 1)[1])
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"invalid base64 in data URI {_describe(source)}: {e}") from e
        return _decode(data, source)
    return _read_path(source, source)


def smart_resize_vl_utils(
    height: int, width: int, factor: int, min_pixels: int | None = None, max_pixels: int | None = None
) -> tuple[int, int]:
    """qwen-vl-utils' ``smart_resize`` (not transformers'; they differ at the edges).

    Versus transformers: the rounded sides are clamped to >= ``factor`` before the range check
    (so a 10x1000 image stays 28x1008 instead of being upscaled), the shrink branch has no clamp,
    and the default limits scale with ``factor`` (4 and 16384 tokens of ``factor**2`` pixels).
    """
    max_pixels = max_pixels if max_pixels is not None else IMAGE_MAX_TOKEN_NUM * factor**2
    min_pixels = min_pixels if min_pixels is not None else IMAGE_MIN_TOKEN_NUM * factor**2
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels ({max_pixels}) must be >= min_pixels ({min_pixels})")
    if min(height, width) <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_RATIO}, got "
            f"{max(height, width) / min(height, width)} for {height}x{width}"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar <= 0 or w_bar <= 0:
        # qwen-vl-utils would hand an empty image to the processor here
        raise ValueError(f"max_pixels={max_pixels} is too small for a {height}x{width} image")
    return h_bar, w_bar


def to_rgb_vl_utils(image: Image.Image) -> Image.Image:
    """qwen-vl-utils' ``to_rgb``: only mode RGBA is pasted on white; LA/P alpha is dropped."""
    if image.mode == "RGBA":
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.split()[3])
        return white
    return image.convert("RGB")


def _item_source(item: dict):
    if "image" in item:
        return item["image"]
    source = item["image_url"]
    if isinstance(source, dict):
        if "url" not in source:
            raise ValueError(f"image_url dict needs a 'url' key, got keys {sorted(source)}")
        return source["url"]
    return source


def fetch_image(item: dict, image_patch_size: int = 14, policy: FetchPolicy | None = None) -> Image.Image:
    """Load and resize one image content item exactly as ``qwen_vl_utils.fetch_image``.

    The result is RGB with both sides multiples of ``image_patch_size * 2``. ``resized_height``
    and ``resized_width`` (both needed) win over ``min_pixels``/``max_pixels``.
    """
    if not isinstance(item, dict) or not any(k in item for k in _IMAGE_KEYS):
        raise ValueError(f"image item needs an 'image' or 'image_url' key, got {_describe(item)}")
    factor = int(image_patch_size * SPATIAL_MERGE_SIZE)
    image = to_rgb_vl_utils(load_image(_item_source(item), policy))
    if "resized_height" in item and "resized_width" in item:
        height, width = smart_resize_vl_utils(item["resized_height"], item["resized_width"], factor)
    else:
        height, width = smart_resize_vl_utils(
            image.height,
            image.width,
            factor,
            min_pixels=item.get("min_pixels", IMAGE_MIN_TOKEN_NUM * factor**2),
            max_pixels=item.get("max_pixels", IMAGE_MAX_TOKEN_NUM * factor**2),
        )
    # qwen-vl-utils passes no filter: Pillow's default for RGB images (BICUBIC) applies
    return image.resize((width, height))


def _item_kind(item, where: str) -> str:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: content items must be dicts, got {_describe(item)}")
    # same test as qwen-vl-utils' extract_vision_info and the Qwen2-VL chat template
    if any(k in item for k in _IMAGE_KEYS) or item.get("type") in _IMAGE_KEYS:
        if not any(k in item for k in _IMAGE_KEYS):
            raise ValueError(f"{where}: image item has no 'image' or 'image_url' key: {_describe(item)}")
        return "image"
    # the template tests for video before text, so {"type": "text", "video": ...} is a video
    if item.get("type") == "video" or "video" in item:
        if "video" not in item:
            raise ValueError(f"{where}: video item has no 'video' key: {_describe(item)}")
        return "video"
    kind = item.get("type")
    if kind is None and "text" in item:
        kind = "text"
    if kind not in _KNOWN_TYPES:
        raise ValueError(
            f"{where}: content item has no known type (expected one of {_KNOWN_TYPES}) or "
            f"'text'/'image'/'image_url' key: {_describe(item)}"
        )
    if kind == "text" and not isinstance(item.get("text"), str):
        raise ValueError(f"{where}: text item needs a string 'text' value: {_describe(item)}")
    return kind


def extract_vision(messages) -> list[tuple[str, dict]]:
    """``("image" | "video", item)`` for every vision item of one conversation, in prompt order.

    Validates the shape of every message and content item on the way.
    """
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of message dicts, got {type(messages).__name__}")
    found = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            hint = " (pass one conversation, not a batch)" if isinstance(msg, (list, tuple)) else ""
            raise ValueError(f"{where} must be a dict, got {type(msg).__name__}{hint}")
        if not isinstance(msg.get("role"), str):
            raise ValueError(f"{where} needs a string 'role', got {_describe(msg.get('role'))}")
        content = msg.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise ValueError(f"{where}['content'] must be a str or list, got {type(content).__name__}")
        for j, item in enumerate(content):
            kind = _item_kind(item, f"{where}['content'][{j}]")
            if kind in ("image", "video"):
                found.append((kind, item))
    return found


def extract_images(messages) -> list[dict]:
    """Image content items of one conversation, in order of appearance (the dicts themselves)."""
    return [item for kind, item in extract_vision(messages) if kind == "image"]
