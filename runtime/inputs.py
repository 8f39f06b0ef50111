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
import numbers
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from qvl.runtime.errors import MemoryBudgetError
from qvl.runtime.fetch import FetchPolicy, download, is_url

logger = logging.getLogger(__name__)

# qwen-vl-utils 0.0.14 constants (vision_process.py)
MAX_RATIO = 200
SPATIAL_MERGE_SIZE = 2
IMAGE_MIN_TOKEN_NUM = 4
IMAGE_MAX_TOKEN_NUM = 16384

_IMAGE_KEYS = ("image", "image_url")
ROLES = ("system", "user", "assistant")
_KNOWN_TYPES = ("text", "image", "image_url", "video")


def _describe(source, limit: int = 80) -> str:
    """Short printable name of a source; data URIs can be megabytes long."""
    if isinstance(source, np.ndarray):
        return f"ndarray(shape={source.shape}, dtype={source.dtype})"
    text = repr(source) if not isinstance(source, (str, Path)) else str(source)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _open(data: bytes, what, max_pixels: int | None) -> Image.Image:
    """Open ``data`` lazily (header only) and refuse it when it would decode past ``max_pixels``."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ValueError(f"refusing to decode image {_describe(what)}: {e} (raise PIL.Image.MAX_IMAGE_PIXELS "
                         "if the image is trusted)") from e
    except Exception as e:  # PIL raises many types on input it cannot identify
        raise ValueError(f"cannot decode image {_describe(what)}: {type(e).__name__}: {e}") from e
    w, h = image.size
    if max_pixels is not None and w * h > max_pixels:
        raise ValueError(f"image {_describe(what)} is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} a file "
                         "may decode to (max_decode_pixels at load)")
    return image


def _load(image: Image.Image, what) -> Image.Image:
    """Decode a lazily opened image fully (a no-op for one already decoded); the result holds no
    OS file handle."""
    try:
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


def _decode(data: bytes, what, max_pixels: int | None = None) -> Image.Image:
    return _load(_open(data, what, max_pixels), what)


def _read_bytes(path, what) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as e:
        raise ValueError(f"image file not found: {_describe(what)}") from e
    except OSError as e:
        raise ValueError(f"cannot read image file {_describe(what)}: {e}") from e


def open_image(source, policy: FetchPolicy | None = None, max_pixels: int | None = None) -> Image.Image:
    """Read one image source and open it without decoding its pixels (size and mode known).

    Accepts a path (str or Path), ``file://`` URI (the prefix is stripped, as qwen-vl-utils
    does), ``http(s)://`` URL (only when ``policy.allow_remote``; see ``qvl.runtime.fetch``),
    ``data:image/...;base64,...`` URI, PIL image (returned as is) or uint8 array of shape
    HxW, HxWx3 or HxWx4. Every failure is a ValueError naming the source. A file whose header
    says it decodes to more than ``max_pixels`` is refused before any pixel is decoded.
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
        return _open(_read_bytes(source, source), source, max_pixels)
    if not isinstance(source, str):
        raise ValueError(
            f"unsupported image source type {type(source).__name__}: {_describe(source)}; expected a "
            "path, file:// or data: URI, PIL.Image or uint8 numpy array"
        )
    if is_url(source):
        policy = policy or FetchPolicy()
        buf = io.BytesIO()
        download(source, buf, policy.max_image_bytes, policy, "image")
        return _open(buf.getvalue(), source, max_pixels)
    if source.startswith("file://"):
        return _open(_read_bytes(source[7:], source), source, max_pixels)
    if source.startswith("data:"):
        if not source.startswith("data:image") or "base64," not in source:
            raise ValueError(f"only base64 data:image URIs are supported, got {_describe(source)}")
        try:
            # non-validating, like qwen-vl-utils: stray characters such as newlines are skipped
            data = base64.b64decode(source.split("base64,", 1)[1])
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"invalid base64 in data URI {_describe(source)}: {e}") from e
        return _open(data, source, max_pixels)
    return _open(_read_bytes(source, source), source, max_pixels)


def load_image(source, policy: FetchPolicy | None = None, max_pixels: int | None = None) -> Image.Image:
    """``open_image``, then decode: a PIL image with its pixels in memory (mode unchanged, no
    resizing). Images above PIL's hard decompression-bomb limit (2 * ``Image.MAX_IMAGE_PIXELS``)
    are refused too."""
    return _load(open_image(source, policy, max_pixels), source)


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


def item_source(item: dict):
    if "image" in item:
        return item["image"]
    source = item["image_url"]
    if isinstance(source, dict):
        if "url" not in source:
            raise ValueError(f"image_url dict needs a 'url' key, got keys {sorted(source)}")
        return source["url"]
    return source


@dataclass(frozen=True)
class InputLimits:
    """What one picture may cost, set per engine at load (defaults suit a 4 GB board).

    ``max_image_pixels``: the most pixels an image may be resized to, whatever its item asks
    (``min_pixels``, ``resized_height``/``width``): qwen-vl-utils' own default ceiling, 16384
    tokens of 28 x 28 pixels, so a default-sized image never meets it. ``max_decode_pixels``:
    the most pixels a file may decode to, read from its header before decoding (an 8000 x 8000
    RGB picture is 192 MB decoded). ``max_vision_tokens``: merged vision tokens one request's
    images and videos may take together.
    """

    max_image_pixels: int = IMAGE_MAX_TOKEN_NUM * 28 * 28
    max_decode_pixels: int = 64_000_000
    max_vision_tokens: int | None = None  # a request's images and videos together; None: the KV cache bounds them
    budget_pixels: int | None = None  # the largest image a memory budget's room for the vision tower takes

    def __post_init__(self):
        for name in ("max_image_pixels", "max_decode_pixels", "max_vision_tokens", "budget_pixels"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def resized_size(item: dict, height: int, width: int, factor: int) -> tuple[int, int]:
    """(height, width) an image item of ``height`` x ``width`` pixels is resized to."""
    if "resized_height" in item and "resized_width" in item:
        return smart_resize_vl_utils(item["resized_height"], item["resized_width"], factor)
    return smart_resize_vl_utils(height, width, factor,
                                 min_pixels=item.get("min_pixels", IMAGE_MIN_TOKEN_NUM * factor**2),
                                 max_pixels=item.get("max_pixels", IMAGE_MAX_TOKEN_NUM * factor**2))


def _checked_size(item: dict, image: Image.Image, factor: int, limits: InputLimits) -> tuple[int, int]:
    height, width = resized_size(item, image.height, image.width, factor)
    if height * width > limits.max_image_pixels:
        raise ValueError(f"image {_describe(item_source(item))} would be resized to {width}x{height} = "
                         f"{width * height} pixels, over the limit of {limits.max_image_pixels} "
                         "(max_image_pixels at load); ask for fewer with max_pixels")
    if limits.budget_pixels is not None and height * width > limits.budget_pixels:
        raise MemoryBudgetError(f"image {_describe(item_source(item))} would be resized to {width}x{height} = "
                                f"{width * height} pixels: the vision tower's activations for it would pass the "
                                f"memory budget, which has room for {limits.budget_pixels} pixels a call; ask for "
                                "fewer with max_pixels")
    return height, width


def fetch_image(item: dict, image_patch_size: int = 14, policy: FetchPolicy | None = None,
                limits: InputLimits | None = None) -> Image.Image:
    """Load and resize one image content item exactly as ``qwen_vl_utils.fetch_image``.

    The result is RGB with both sides multiples of ``image_patch_size * 2``. ``resized_height``
    and ``resized_width`` (both needed) win over ``min_pixels``/``max_pixels``.
    """
    if not isinstance(item, dict) or not any(k in item for k in _IMAGE_KEYS):
        raise ValueError(f"image item needs an 'image' or 'image_url' key, got {_describe(item)}")
    limits = limits or InputLimits()
    check_item("image", item, "image item")
    return finish_image(item, open_image(item_source(item), policy, limits.max_decode_pixels), image_patch_size,
                        limits)


def image_tokens(item: dict, image: Image.Image, image_patch_size: int, limits: InputLimits) -> int:
    """Merged vision tokens an opened (not yet decoded) image item will take."""
    factor = int(image_patch_size * SPATIAL_MERGE_SIZE)
    height, width = _checked_size(item, image, factor, limits)
    return (height // factor) * (width // factor)


def finish_image(item: dict, image: Image.Image, image_patch_size: int, limits: InputLimits) -> Image.Image:
    """Decode an opened image item and resize it as ``fetch_image`` does."""
    factor = int(image_patch_size * SPATIAL_MERGE_SIZE)
    height, width = _checked_size(item, image, factor, limits)
    image = to_rgb_vl_utils(_load(image, item_source(item)))
    # qwen-vl-utils passes no filter: Pillow's default for RGB images (BICUBIC) applies
    return image.resize((width, height))


# item keys qvl reads (qwen-vl-utils' names); anything else is most likely a typo
_ITEM_KEYS = {
    "image": {"type", "image", "image_url", "min_pixels", "max_pixels", "resized_height", "resized_width"},
    "video": {"type", "video", "fps", "nframes", "min_frames", "max_frames", "video_start", "video_end",
              "min_pixels", "max_pixels", "total_pixels", "resized_height", "resized_width", "sample_fps",
              "raw_fps"},
}
IMAGE_SETTINGS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
_POSITIVE_INTS = ("min_pixels", "max_pixels", "resized_height", "resized_width", "nframes", "min_frames",
                  "max_frames", "total_pixels")
_POSITIVE_REALS = ("fps", "sample_fps", "raw_fps")
_TIMES = ("video_start", "video_end")


def check_item(kind: str, item: dict, where: str) -> None:
    """Refuse an image or video item's settings of the wrong type or sign; warn on unknown keys."""
    unknown = sorted(set(item) - _ITEM_KEYS[kind])
    if unknown:
        logger.warning("%s: %s ignored: not a %s setting (known: %s)", where, ", ".join(map(repr, unknown)), kind,
                       ", ".join(sorted(_ITEM_KEYS[kind] - {"type", kind})))
    for key in _POSITIVE_INTS + _POSITIVE_REALS + _TIMES:
        if key not in item:
            continue
        value = item[key]
        real = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if key in _POSITIVE_INTS and not (isinstance(value, numbers.Integral) and not isinstance(value, bool)):
            raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")
        if not real or not math.isfinite(value):
            raise ValueError(f"{where}: {key} must be a finite number, got {value!r}")
        if (value < 0) if key in _TIMES else (value <= 0):
            raise ValueError(f"{where}: {key} must be {'>= 0' if key in _TIMES else '> 0'}, got {value!r}")


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
        if msg["role"] not in ROLES:
            raise ValueError(f"{where}: role {_describe(repr(msg['role']))} is not one of {', '.join(ROLES)}")
        content = msg.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise ValueError(f"{where}['content'] must be a str or list, got {type(content).__name__}")
        for j, item in enumerate(content):
            kind = _item_kind(item, f"{where}['content'][{j}]")
            if kind in ("image", "video"):
                check_item(kind, item, f"{where}['content'][{j}]")
                found.append((kind, item))
    return found


def extract_images(messages) -> list[dict]:
    """Image content items of one conversation, in order of appearance (the dicts themselves)."""
    return [item for kind, item in extract_vision(messages) if kind == "image"]
