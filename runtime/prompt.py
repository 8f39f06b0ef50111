"""Messages -> model inputs: chat template, images, videos, expanded placeholders, token ids.

Mirrors transformers' Qwen2VLProcessor: every ``<|image_pad|>`` / ``<|video_pad|>`` in the
rendered prompt is expanded to t*h*w / merge**2 copies before tokenizing, one per merged vision
token. Images and videos are loaded with qwen-vl-utils semantics (``qvl.runtime.inputs`` and
``qvl.runtime.video``), as Qwen's reference pipeline does before the processor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from qvl.runtime.fetch import FetchPolicy
from qvl.runtime.errors import PromptTooLongError
from qvl.runtime.inputs import InputLimits, item_source, extract_vision, finish_image, image_tokens, open_image
from qvl.runtime.prefix_cache import digest
from qvl.runtime.processor import ImageProcessor
from qvl.runtime.tokenizer import Tokenizer
from qvl.runtime.video import fetch_video
from qvl.runtime.video_processor import VideoPatches, VideoProcessor

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
_PAD_RE = re.compile(f"({re.escape(IMAGE_PAD)}|{re.escape(VIDEO_PAD)})")


@dataclass
class Request:
    ids: list[int]
    pixel_values: torch.Tensor | None = None  # images: [n_patches, patch_dim]
    grids: list[tuple[int, int, int]] = field(default_factory=list)  # images
    text: str = ""
    videos: list[VideoPatches] = field(default_factory=list)
    vision_grids: list[tuple[int, int, int]] | None = None  # images and videos in prompt order
    vision_keys: list[bytes] = field(default_factory=list)  # their content digests, in the same order
    # seconds per temporal patch of each item in vision_grids (None for images): video time ids
    vision_seconds: list[float | None] | None = None

    def __post_init__(self):
        if self.vision_grids is None:
            self.vision_grids = list(self.grids)
        if self.vision_seconds is None:
            self.vision_seconds = [None] * len(self.vision_grids)


def _check_vision_budget(tokens: int, limits: InputLimits) -> None:
    if limits.max_vision_tokens is not None and tokens > limits.max_vision_tokens:
        raise ValueError(f"the request's images and videos take {tokens} vision tokens, over the limit of "
                         f"{limits.max_vision_tokens} (max_vision_tokens at load)")


def build_request(messages, tokenizer: Tokenizer, processor: ImageProcessor, merge: int,
                  add_vision_id: bool = False, video_processor: VideoProcessor | None = None,
                  policy: FetchPolicy | None = None, limits: InputLimits | None = None,
                  max_tokens: int | None = None) -> Request:
    """One conversation -> model inputs. ``max_tokens`` (the KV cache): a prompt whose text and
    images, counted from the image files' headers, would not fit is refused before any image is
    decoded."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    limits = limits or InputLimits()
    items = extract_vision(messages)  # also validates the shape of every message and item
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, add_vision_id=add_vision_id)
    patch = processor.cfg.patch_size
    image_items = [it for kind, it in items if kind == "image"]
    opened = [open_image(item_source(it), policy, limits.max_decode_pixels) for it in image_items]
    if opened:
        vision = sum(image_tokens(it, im, patch, limits) for it, im in zip(image_items, opened))
        _check_vision_budget(vision, limits)
    if max_tokens is not None and opened:
        need = len(tokenizer.encode(_PAD_RE.sub("", text))) + vision
        if need >= max_tokens:
            raise PromptTooLongError(f"the prompt's text and {len(opened)} images take {need} tokens, more than the "
                                     f"KV cache holds (max_seq_len={max_tokens}); shrink the images (max_pixels) "
                                     "or load with a larger max_seq_len")
    images = [finish_image(it, im, patch, limits) for it, im in zip(image_items, opened)]
    del opened
    pixel_values, grids = None, []
    if images:
        pixel_values, grid_thw = processor(images)
        grids = [tuple(g) for g in grid_thw.tolist()]
    video_items = [it for kind, it in items if kind == "video"]
    videos = []
    if video_items:
        video_processor = video_processor or VideoProcessor()
        videos = []
        for it in video_items:
            video = fetch_video(it, patch, policy)
            videos.append(video_processor.prepare(video.frames, video.sample_fps))
    if videos:
        _check_vision_budget(sum(t * h * w for t, h, w in grids) // merge**2
                             + sum(v.grid[0] * v.grid[1] * v.grid[2] for v in videos) // merge**2, limits)
    parts = _PAD_RE.split(text)  # text, pad, text, pad, ..., text
    kinds = ["image" if p == IMAGE_PAD else "video" for p in parts[1::2]]
    if kinds != [kind for kind, _ in items]:
        raise ValueError(f"the chat template produced placeholders {kinds} for vision items "
                         f"{[kind for kind, _ in items]}")
    # a video's key holds its sampling rate: Qwen2.5-VL's time ids, so the KV a prefix-cache hit
    # would reuse, depend on it
    image_keys = iter(_image_digests(pixel_values, grids))
    video_keys = iter(digest(v.frames, v.grid, v.fps) for v in videos)
    image_grids, video_grids = iter(grids), iter(v.grid for v in videos)
    video_seconds = iter(v.seconds_per_grid for v in videos)
    expanded, vision_grids, vision_keys, vision_seconds = [parts[0]], [], [], []
    for pad, rest in zip(parts[1::2], parts[2::2]):
        t, h, w = next(image_grids if pad == IMAGE_PAD else video_grids)
        vision_grids.append((t, h, w))
        vision_seconds.append(None if pad == IMAGE_PAD else next(video_seconds))
        vision_keys.append(next(image_keys if pad == IMAGE_PAD else video_keys))
        expanded += [pad * (t * h * w // merge**2), rest]
    return Request(ids=tokenizer.encode("".join(expanded)), pixel_values=pixel_values, grids=grids, text=text,
                   videos=videos, vision_grids=vision_grids, vision_keys=vision_keys, vision_seconds=vision_seconds)


def _image_digests(pixel_values: torch.Tensor | None, grids: list[tuple[int, int, int]]) -> list[bytes]:
    """One digest per image of its preprocessed patches and grid: the same picture resized the
    same way is the same key, whatever file or URL it came from."""
    out, at = [], 0
    for t, h, w in grids:
        out.append(digest(pixel_values[at : at + t * h * w], (t, h, w)))
        at += t * h * w
    return out
