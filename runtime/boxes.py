"""Grounding answers -> boxes in pixels of the original image, and a picture of them.

Accepted forms; everything else in the text is ignored, and a malformed piece is skipped, never raised:

1. Marker form (Qwen2-VL report, arXiv 2409.12191, "visual grounding"; Qwen2.5-VL reads it too):
   ``<|object_ref_start|>LABEL<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``.
   A span holds exactly two points: integers or decimals, optional sign, spaces around any of them,
   an optional comma between the points. One ref may be followed by several spans; a span takes the
   label of the ref before it only while nothing but whitespace, commas and other spans lies between
   them, else its label is ``None``. Coordinates are read only between box markers: text decoded
   with ``skip_special_tokens=True`` has lost the markers and gives no boxes, so decode the answer
   with ``skip_special_tokens=False`` (bare pairs in prose are too often something else).
2. JSON form (Qwen2.5-VL cookbook ``spatial_understanding.ipynb``): ``{"bbox_2d": [x1, y1, x2, y2],
   "label": "..."}`` objects, alone or in a list, in a ```json fence or not, with prose around them
   or a truncated tail (every complete object counts). Each flat ``{...}`` is read on its own, so an
   object whose label contains a brace is lost. ``point_2d`` objects are points, not boxes: skipped.
   The cookbook's other formats (plain ``x1,y1,x2,y2 label`` lines, XML ``<points>``) are not read.

Both forms are read for either model type; the type fixes only the coordinate frame:
``qwen2_vl`` answers in 0..1000 of the image on both axes (the report: normalized to [0, 1000));
``qwen2_5_vl`` answers in absolute pixels of the picture the model saw after ``smart_resize`` (the
cookbook scales by ``image_grid_thw * 14``), which :func:`model_image_size` gives.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import re
from dataclasses import dataclass
from typing import Iterable

from PIL import Image, ImageDraw, ImageFont

from qvl.runtime.inputs import SPATIAL_MERGE_SIZE, resized_size as vl_utils_size
from qvl.runtime.processor import ImageProcessor, to_rgb

logger = logging.getLogger(__name__)

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
QWEN2_VL_RANGE = 1000  # Qwen2-VL's relative grid on both axes

_MARKER = re.compile(r"<\|(object_ref_start|object_ref_end|box_start|box_end)\|>")
_NUM = r"\s*([-+]?\d+(?:\.\d+)?)\s*"
_SPAN = re.compile(rf"\s*\({_NUM},{_NUM}\)\s*,?\s*\({_NUM},{_NUM}\)\s*")
_FLAT_OBJECT = re.compile(r"\{[^{}]*\}")
_SEPARATORS = " \t\r\n,"
# Longer pieces cannot be well-formed answers; they are skipped unread, which bounds the work per piece.
_MAX_SPAN = 128
_MAX_LABEL = 256
_MAX_OBJECT = 4096
# dark enough for white label text
_PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (0, 160, 160),
            (240, 50, 230), (128, 128, 0))


@dataclass(frozen=True)
class Box:
    """A box in pixels of the original image: ``0 <= x1 <= x2 <= width``, ``0 <= y1 <= y2 <= height``."""

    label: str | None
    x1: float
    y1: float
    x2: float
    y2: float


def model_image_size(image_size: tuple[int, int], processor: ImageProcessor | None = None,
                     item: dict | None = None) -> tuple[int, int]:
    """(width, height) of the picture the model saw for an image of ``image_size`` (width, height).

    The runtime's own path: qwen-vl-utils' resize with the item's ``min_pixels``/``max_pixels`` or
    ``resized_height``/``resized_width`` (``fetch_image``), then the processor's ``smart_resize`` with
    its own limits, which may shrink the picture again. ``processor``: the engine's
    (``engine.processor``, limits from the checkpoint); without it transformers' class defaults
    apply, whose ``max_pixels`` is lower than most checkpoints'. ``item``: the message's image item.
    """
    width, height = _check_size("image_size", image_size)
    processor = processor or ImageProcessor()
    factor = processor.cfg.patch_size * SPATIAL_MERGE_SIZE
    h, w = vl_utils_size(item or {}, int(height), int(width), factor)
    h, w = processor.target_size(h, w)
    return w, h


def parse_boxes(text: str, image_size: tuple[int, int], *, model_type: str = "qwen2_vl",
                resized_size: tuple[int, int] | None = None) -> list[Box]:
    """Boxes of a grounding answer, in text order, on an image of ``image_size`` (width, height).

    ``resized_size`` (width, height): the picture the model saw, required for ``qwen2_5_vl``
    (:func:`model_image_size`); ``qwen2_vl`` answers relative to the image and does not use it.
    Coordinates outside the image are clamped into it and swapped corners put in order. Runs in
    time linear in ``len(text)``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    width, height = _check_size("image_size", image_size)
    if model_type == "qwen2_vl":
        frame = (QWEN2_VL_RANGE, QWEN2_VL_RANGE)
    elif model_type == "qwen2_5_vl":
        if resized_size is None:
            raise ValueError("qwen2_5_vl answers in pixels of the resized picture: pass resized_size "
                             "(width, height), e.g. model_image_size(image.size, engine.processor)")
        frame = _check_size("resized_size", resized_size)
    else:
        raise ValueError(f"model_type {model_type!r}: use one of {MODEL_TYPES}")
    sx, sy = width / frame[0], height / frame[1]
    found = sorted([*_marker_boxes(text), *_json_boxes(text)], key=lambda f: f[0])
    return [_to_box(label, coords, sx, sy, width, height) for _, label, coords in found]


def draw_boxes(image: Image.Image, boxes: Iterable[Box], *, width: int | None = None) -> Image.Image:
    """An RGB copy of ``image`` with each box outlined and its label, if any, on a tab above it.

    One color per label (boxes without a label share one). ``width``: outline in pixels, by default
    about 1/250 of the shorter side. The input image is left untouched.
    """
    if width is None:
        width = max(2, round(min(image.size) / 250))
    if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    out = to_rgb(image).copy()
    draw = ImageDraw.Draw(out)
    font = _font(min(out.size) // 40)
    colors: dict[str | None, tuple[int, int, int]] = {}
    w, h = out.size
    for box in boxes:
        color = colors.setdefault(box.label, _PALETTE[len(colors) % len(_PALETTE)])
        # a box's right/bottom edge is a pixel boundary; the outline goes on the last pixel inside it
        x1, y1 = min(round(box.x1), w - 1), min(round(box.y1), h - 1)
        x2, y2 = max(x1, round(box.x2) - 1), max(y1, round(box.y2) - 1)
        draw.rectangle((x1, y1, x2, y2), outline=color, width=width)
        if box.label:
            _draw_label(draw, font, box.label, x1, y1, color)
    return out


def _font(size: int):
    try:
        return ImageFont.load_default(size=max(10, size))
    except TypeError:  # Pillow < 10.1: one fixed-size bitmap font
        return ImageFont.load_default()


def _draw_label(draw: ImageDraw.ImageDraw, font, label: str, x: int, y: int, color) -> None:
    text = label if len(label) <= 60 else label[:57] + "..."
    try:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    except UnicodeError:  # Pillow without FreeType falls back to a Latin-1 bitmap font
        text = text.encode("latin-1", "replace").decode("latin-1")
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = 2
    th = bottom - top + 2 * pad
    ty = y - th if y - th >= 0 else y  # above the box when there is room, else inside it
    draw.rectangle((x, ty, x + right - left + 2 * pad, ty + th), fill=color)
    draw.text((x + pad - left, ty + pad - top), text, fill=(255, 255, 255), font=font)


def _check_size(name: str, size) -> tuple[float, float]:
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or any(isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0
                   for v in size)):
        raise ValueError(f"{name} must be (width, height), both positive, got {size!r}")
    return float(size[0]), float(size[1])


def _to_box(label, coords, sx: float, sy: float, width: float, height: float) -> Box:
    x1, y1, x2, y2 = coords
    xa, xb = sorted((_clamp(x1 * sx, width), _clamp(x2 * sx, width)))
    ya, yb = sorted((_clamp(y1 * sy, height), _clamp(y2 * sy, height)))
    return Box(label, xa, ya, xb, yb)


def _clamp(v: float, hi: float) -> float:
    return min(max(v, 0.0), hi)


def _marker_boxes(text: str):
    """(offset, label, (x1, y1, x2, y2)) of each well-formed box span, in the frame the model used."""
    marks = [(m.start(), m.end(), m.group(1)) for m in _MARKER.finditer(text)]
    label, bind_from, skipped, i = None, 0, 0, 0
    while i < len(marks):
        start, end, kind = marks[i]
        nxt = marks[i + 1] if i + 1 < len(marks) else None
        if kind == "object_ref_start":
            label = None  # an unclosed or over-long ref names nothing
            if nxt is not None and nxt[2] == "object_ref_end":
                if nxt[0] - end <= _MAX_LABEL:
                    label, bind_from = text[end:nxt[0]].strip() or None, nxt[1]
                i += 1
        elif kind == "box_start" and nxt is not None and nxt[2] == "box_end":
            # the gaps between consecutive marks are disjoint, so these slices add up to len(text)
            bound = label if label is not None and not text[bind_from:start].strip(_SEPARATORS) else None
            label, bind_from = bound, nxt[1]
            coords = _read_span(text[end:nxt[0]]) if nxt[0] - end <= _MAX_SPAN else None
            if coords is None:
                skipped += 1
            else:
                yield start, bound, coords
            i += 1
        elif kind == "box_start":
            skipped += 1
        i += 1
    if skipped:
        logger.debug("grounding: skipped %d malformed or unclosed box spans", skipped)


def _read_span(content: str):
    m = _SPAN.fullmatch(content)
    return None if m is None else tuple(float(g) for g in m.groups())


def _json_boxes(text: str):
    """(offset, label, (x1, y1, x2, y2)) of each flat JSON object with a well-formed ``bbox_2d``."""
    skipped = 0
    for m in _FLAT_OBJECT.finditer(text):
        if m.end() - m.start() > _MAX_OBJECT or '"bbox_2d"' not in m.group():
            continue
        try:
            obj = json.loads(m.group())
        except (ValueError, RecursionError):
            skipped += 1
            continue
        coords = _json_coords(obj.get("bbox_2d"))
        if coords is None:
            skipped += 1
            continue
        label = obj.get("label")
        label = label.strip() or None if isinstance(label, str) and len(label) <= _MAX_LABEL else None
        yield m.start(), label, coords
    if skipped:
        logger.debug("grounding: skipped %d malformed bbox_2d objects", skipped)


def _json_coords(value):
    if not isinstance(value, list) or len(value) != 4:
        return None
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        return None
    try:
        coords = tuple(float(v) for v in value)
    except OverflowError:  # an integer beyond float range
        return None
    return coords if all(math.isfinite(v) for v in coords) else None
