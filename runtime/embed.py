"""Prompt embeddings: token embeddings with every image and video pad replaced by the vision
tower's output (videos a few frame pairs at a time)."""

from __future__ import annotations

import time

import torch

from qvl.model.qwen2_vl import Qwen2VL
from qvl.runtime.prompt import Request
from qvl.runtime.video_processor import VideoPatches


# patches per vision-tower call for videos (7 frame pairs of 280x392): float pixel rows are
# 4.7 KB a patch, so a chunk costs ~20 MB of rows plus its activations; images go in whole
VIDEO_CHUNK_PATCHES = 4096


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def encode_video(tower, video: VideoPatches, device, max_patches: int = VIDEO_CHUNK_PATCHES) -> torch.Tensor:
    """Merged embeddings of one video, run through the tower a few frame pairs at a time.

    Vision attention never crosses a frame pair, so chunks at pair boundaries give the same
    embeddings as one pass, while activations and float pixel rows stay bounded by the chunk.
    """
    return torch.cat([encode_video_chunk(tower, video, t0, t1, device) for t0, t1 in video_chunks(video, max_patches)])


def video_chunks(video: VideoPatches, max_patches: int = VIDEO_CHUNK_PATCHES) -> list[tuple[int, int]]:
    """Frame-pair ranges [t0, t1) of at most ``max_patches`` patches (at least one pair each)."""
    t, h, w = video.grid
    step = max(1, max_patches // (h * w))
    return [(t0, min(t, t0 + step)) for t0 in range(0, t, step)]


def encode_video_chunk(tower, video: VideoPatches, t0: int, t1: int, device) -> torch.Tensor:
    _, h, w = video.grid
    return tower.encode(video.rows(t0, t1).to(device), torch.tensor([[t1 - t0, h, w]]))


def splice(embeds, ids, token_id: int, vis: torch.Tensor, kind: str) -> None:
    slots = (ids == token_id).to(embeds.device)
    if int(slots.sum()) != vis.shape[0]:
        raise ValueError(f"{int(slots.sum())} {kind} placeholder tokens for {vis.shape[0]} vision embeddings")
    embeds[slots] = vis.to(embeds.dtype)


def embed_prompt(model: Qwen2VL, tower, ids: torch.Tensor, requests: list[Request], image_token_id: int,
                 video_token_id: int, device="cpu") -> tuple[torch.Tensor, float]:
    """Token embeddings [B, T, D] of the padded prompt ``ids`` with every image and video pad
    token replaced by its vision embedding; also the seconds spent in the vision tower."""
    embeds = model.embed_tokens(ids.to(device))
    t0 = time.perf_counter()
    grids = [g for r in requests for g in r.grids]
    if grids:
        pv = torch.cat([r.pixel_values for r in requests if r.pixel_values is not None]).to(device)
        splice(embeds, ids, image_token_id, tower.encode(pv, torch.tensor(grids)), "image")
    videos = [v for r in requests for v in r.videos]
    if videos:
        splice(embeds, ids, video_token_id, torch.cat([encode_video(tower, v, device) for v in videos]), "video")
    if grids or videos:
        sync(device)
    return embeds, time.perf_counter() - t0 if (grids or videos) else 0.0
