"""Next-token choice: greedy, or temperature / top-k / top-p sampling with repetition penalty.

Same order and semantics as transformers' logits processors (repetition penalty, then
temperature, top-k, top-p), so a seeded run is reproducible and greedy output identical.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        for name in ("top_k", "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


class Sampler:
    def __init__(self, params: SamplingParams, device="cpu"):
        self.p = params
        self.gen = None
        if params.temperature > 0:
            self.gen = torch.Generator(device=device)
            self.gen.manual_seed(params.seed if params.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, V]; ``seen`` [B, S] ids so far (prompt + generated, pads allowed to repeat).

        Returns next ids [B].
        """
        p = self.p
        if p.temperature == 0 and (p.repetition_penalty == 1.0 or seen is None):
            return logits.argmax(-1)  # the float copy would change no value: bf16 -> fp32 is exact
        logits = logits.float()
        if p.repetition_penalty != 1.0 and seen is not None:
            score = logits.gather(1, seen)
            score = torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty)
            logits = logits.scatter(1, seen, score)
        if p.temperature == 0:
            return logits.argmax(-1)
        logits = logits / p.temperature
        if p.top_k > 0:
            kth = logits.topk(min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, idx = logits.sort(dim=-1)  # ascending, as transformers' TopPLogitsWarper
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum <= 1 - p.top_p
            drop[:, -1] = False  # always keep the most likely token
            logits = logits.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.gen).squeeze(1)
