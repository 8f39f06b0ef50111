"""Messages -> model inputs: chat template, images, expanded placeholders, token ids.

Mirrors transformers' Qwen2VLProcessor: every ``<|image_pad|>`` in the rendered prompt is
expanded to t*h*w / merge**2 copies before tokenizing, one per merged vision token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qvl.runtime.inputs import extract_images, fetch_image
from qvl.runtime.processor import ImageProcessor
from qvl.runtime.tokenizer import Tokenizer

IMAGE_PAD = "<|image_pad|>"


@dataclass
class Request:
    ids: list[int]
    pixel_values: torch.Tensor | None = None  # [n_patches, patch_dim]
    grids: list[tuple[int, int, int]] = field(default_factory=list)
    text: str = ""


def build_request(messages, tokenizer: Tokenizer, processor: ImageProcessor, merge: int,
                  add_vision_id: bool = False) -> Request:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    items = extract_images(messages)  # also validates the shape of every message and item
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, add_vision_id=add_vision_id)
    images = [fetch_image(it) for it in items]
    pixel_values, grids = None, []
    if images:
        pixel_values, grid_thw = processor(images)
        grids = [tuple(g) for g in grid_thw.tolist()]
    parts = text.split(IMAGE_PAD)
    if len(parts) - 1 != len(grids):
        raise ValueError(f"the chat template produced {len(parts) - 1} image placeholders for "
                         f"{len(grids)} images")
    expanded = parts[0]
    for (t, h, w), rest in zip(grids, parts[1:]):
        expanded += IMAGE_PAD * (t * h * w // merge**2) + rest
    return Request(ids=tokenizer.encode(expanded), pixel_values=pixel_values, grids=grids, text=text)
