"""Prefill + one-token decode steps over the static KV cache, for a left-padded batch.

Prefill writes cache slots 0..T-1 (pads included, masked out); step s writes slot T+s.
M-RoPE ids come from ``rope_index`` once; decode positions are ``slot + rope_delta[row]``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from qvl.model.qwen2_vl import Qwen2VL
from qvl.model.rope import rope_index
from qvl.runtime.prompt import Request
from qvl.runtime.sampler import Sampler
from qvl.runtime.video_processor import VideoPatches

log = logging.getLogger(__name__)


# patches per vision-tower call for videos (7 frame pairs of 280x392): float pixel rows are
# 4.7 KB a patch, so a chunk costs ~20 MB of rows plus its activations; images go in whole
VIDEO_CHUNK_PATCHES = 4096


class PromptTooLongError(ValueError):
    pass


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    vision_s: float = 0.0
    prefill_s: float = 0.0  # includes the vision tower
    decode_s: float = 0.0

    @property
    def decode_tok_s(self) -> float:
        steps = max(self.new_tokens - 1, 0)  # the first token comes from prefill
        return steps / self.decode_s if self.decode_s > 0 else 0.0


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def encode_video(tower, video: VideoPatches, device, max_patches: int = VIDEO_CHUNK_PATCHES) -> torch.Tensor:
    """Merged embeddings of one video, run through the tower a few frame pairs at a time.

    Vision attention never crosses a frame pair, so chunks at pair boundaries give the same
    embeddings as one pass, while activations and float pixel rows stay bounded by the chunk.
    """
    t, h, w = video.grid
    step = max(1, max_patches // (h * w))
    out = []
    for t0 in range(0, t, step):
        t1 = min(t, t0 + step)
        out.append(tower.encode(video.rows(t0, t1).to(device), torch.tensor([[t1 - t0, h, w]])))
    return torch.cat(out)


def _splice(embeds, ids, token_id: int, vis: torch.Tensor, kind: str) -> None:
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
        _splice(embeds, ids, image_token_id, tower.encode(pv, torch.tensor(grids)), "image")
    videos = [v for r in requests for v in r.videos]
    if videos:
        _splice(embeds, ids, video_token_id, torch.cat([encode_video(tower, v, device) for v in videos]), "video")
    if grids or videos:
        _sync(device)
    return embeds, time.perf_counter() - t0 if (grids or videos) else 0.0


def generate_ids(model: Qwen2VL, requests: list[Request], sampler: Sampler, max_new_tokens: int,
                 stop_ids: set[int], pad_id: int, image_token_id: int, video_token_id: int,
                 stats: Stats, device="cpu", ignore_eos: bool = False, vision=None) -> Iterator[torch.Tensor]:
    """Yield the next token ids [B] step by step; a finished row keeps yielding ``pad_id``.

    ``vision``: the tower to run, anything with ``encode(pixel_values, grid_thw) -> embeds``
    (default ``model.visual``; ``OnnxVision`` runs it in onnxruntime).
    """
    cfg = model.cfg
    tower = model.visual if vision is None else vision
    bsz = len(requests)
    if bsz > model.max_batch:
        raise ValueError(f"batch of {bsz} exceeds max_batch={model.max_batch} set at load")
    seqlen = max(len(r.ids) for r in requests)
    if seqlen >= model.max_seq:
        raise PromptTooLongError(f"prompt of {seqlen} tokens does not fit the KV cache (max_seq_len="
                                 f"{model.max_seq}); load with a larger max_seq_len or shrink the images "
                                 "(max_pixels)")
    if seqlen + max_new_tokens > model.max_seq:
        log.warning("max_new_tokens=%d cut to %d to fit max_seq_len=%d", max_new_tokens,
                    model.max_seq - seqlen, model.max_seq)
        max_new_tokens = model.max_seq - seqlen

    ids = torch.full((bsz, seqlen), pad_id, dtype=torch.int64)
    valid = torch.zeros(bsz, seqlen, dtype=torch.bool)
    for b, r in enumerate(requests):  # left padding
        ids[b, seqlen - len(r.ids):] = torch.tensor(r.ids)
        valid[b, seqlen - len(r.ids):] = True
    stats.prompt_tokens = int(valid.sum())
    t0 = time.perf_counter()
    with torch.inference_mode():
        embeds, stats.vision_s = embed_prompt(model, tower, ids, requests, image_token_id, video_token_id, device)
        grids = [g for r in requests for g in r.vision_grids]  # prompt order, images and videos
        positions, delta = rope_index(ids, grids, (image_token_id, video_token_id),
                                      cfg.vision.spatial_merge_size, valid.long())
        padded = not bool(valid.all())
        mask = None
        if padded:
            causal = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
            # a pad query may attend to itself, so no softmax row is empty (NaN)
            mask = (causal & valid[:, None, :]) | torch.eye(seqlen, dtype=torch.bool)
            mask = mask[:, None].to(device)  # [B, 1, T, T]
        hidden = model(embeds, positions.to(device), torch.arange(seqlen, device=device), mask, seqlen)
        logits = model.logits(hidden[:, -1])
        seen = ids.to(device)
        done = torch.zeros(bsz, dtype=torch.bool, device=device)
        stop = torch.tensor(sorted(stop_ids), dtype=torch.int64, device=device)
        key_valid = torch.cat([valid, torch.ones(bsz, max_new_tokens, dtype=torch.bool)], dim=1).to(device)
        delta = delta.to(device)
        for step in range(max_new_tokens):
            nxt = sampler(logits, seen)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            if step == 0:
                _sync(device)
                stats.prefill_s = time.perf_counter() - t0
                t_dec = time.perf_counter()
            stats.new_tokens = step + 1
            yield nxt
            if not ignore_eos:
                done |= torch.isin(nxt, stop)
                if bool(done.all()):
                    break
            if step == max_new_tokens - 1:
                break
            slot = seqlen + step
            seen = torch.cat([seen, nxt[:, None]], dim=1)
            pos = (slot + delta).view(1, bsz, 1).expand(3, bsz, 1)
            step_mask = key_valid[:, None, None, : slot + 1] if padded else None
            hidden = model(model.embed_tokens(nxt[:, None]), pos, torch.tensor([slot], device=device),
                           step_mask, slot + 1)
            logits = model.logits(hidden[:, -1])
        _sync(device)
        stats.decode_s = time.perf_counter() - t_dec


def sequence_logprobs(model: Qwen2VL, request: Request, answer_ids: list[int], image_token_id: int,
                      video_token_id: int, device="cpu", vision=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probabilities of every text token after the first, over the prompt and
    ``answer_ids`` in one causal pass: rows [N, vocab] float32 on the CPU and the targets [N] they
    predict. Positions whose next token is an image or video pad are skipped (those tokens are
    replaced by vision embeddings, not predicted). One prefill, no decode steps: the same
    numbers ``score`` gives for the answer rows up to kernel rounding."""
    tower = model.visual if vision is None else vision
    seq = list(request.ids) + [int(i) for i in answer_ids]
    if len(seq) > model.max_seq:
        raise PromptTooLongError(f"prompt + answer of {len(seq)} tokens does not fit the KV cache "
                                 f"(max_seq_len={model.max_seq})")
    ids = torch.tensor([seq])
    with torch.inference_mode():
        embeds, _ = embed_prompt(model, tower, ids, [request], image_token_id, video_token_id, device)
        positions, _ = rope_index(ids, request.vision_grids, (image_token_id, video_token_id),
                                  model.cfg.vision.spatial_merge_size)
        hidden = model(embeds, positions.to(device), torch.arange(len(seq), device=device), None, len(seq))
        nxt = ids[0, 1:]
        keep = ((nxt != image_token_id) & (nxt != video_token_id)).nonzero().flatten()
        logits = model.logits(hidden[0, keep.to(device)]).float()
        return torch.log_softmax(logits, dim=-1).cpu(), nxt[keep]
