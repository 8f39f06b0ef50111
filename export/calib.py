"""Calibration conversations: the multimodal samples whose activations GPTQ and AWQ fit to.

Every sample is a whole chat, run through the same processor and vision tower as inference, so
the decoder layers see vision tokens at their real positions (M-RoPE ids included), not text
alone. Sources:

* default: the synthetic task generator (``qvl.export.synth``): pictures of shapes, text,
  image pairs and short clips with their questions and answers, plus text-only chats; a seed
  disjoint from the evaluation sets.
* ``DIR``: every image in it (``.png .jpg .jpeg .webp .bmp``) with a describe-this prompt, and
  every ``.txt`` file as a text-only user turn.
* ``FILE.jsonl``: ``qvl eval`` records (``question`` + ``image``/``images``/``video``, or
  ``messages``); an ``answer`` / ``answers[0]``, when present, becomes the assistant turn.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from qvl.export.tasks import jsonl_records, record_messages

log = logging.getLogger(__name__)

CALIB_SEED = 30_000  # not the training (10k/20k) or evaluation (1) seeds of qvl-toy
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
DESCRIBE = "Describe this image in detail."


def _with_answer(messages: list[dict], answer: str | None) -> list[dict]:
    if answer is None:
        return messages
    return [*messages, {"role": "assistant", "content": [{"type": "text", "text": str(answer)}]}]


def default_samples(n: int, seed: int = CALIB_SEED) -> list[list[dict]]:
    """``n`` synthetic chats: the image and video tasks in turn, every eighth one text only."""
    from qvl.export import synth

    out, i = [], 0
    while len(out) < n:
        task = synth.TASKS[i % len(synth.TASKS)]
        s = synth.make_sample(task, i // len(synth.TASKS), seed)
        if len(out) % 8 == 7:  # text only: the question and its answer, no picture
            out.append(_with_answer([{"role": "user", "content": [{"type": "text", "text": s.question}]}],
                                    s.answer))
        else:
            out.append(_with_answer(s.messages(), s.answer))
        i += 1
    return out


def _from_dir(d: Path) -> list[list[dict]]:
    out = []
    for f in sorted(d.iterdir()):
        if f.suffix.lower() in IMAGE_SUFFIXES:
            out.append([{"role": "user", "content": [{"type": "image", "image": str(f)},
                                                     {"type": "text", "text": DESCRIBE}]}])
        elif f.suffix.lower() == ".txt":
            out.append([{"role": "user", "content": [{"type": "text", "text": f.read_text(encoding="utf-8")}]}])
    return out


def _from_jsonl(f: Path) -> list[list[dict]]:
    out = []
    for _, rec in jsonl_records(f):
        answers = rec.get("answers") or ([rec["answer"]] if "answer" in rec else [None])
        out.append(_with_answer(record_messages(rec, f.parent), answers[0]))
    return out


def load_samples(spec: str | None, n: int) -> tuple[list[list[dict]], dict]:
    """(conversations, description for the manifest). ``spec``: None, a directory or a .jsonl."""
    if n < 1:
        raise ValueError(f"calibration samples: {n}; at least 1 chat is needed")
    if spec is None:
        samples = default_samples(n)
        return samples, {"source": "synthetic", "seed": CALIB_SEED, "samples": len(samples)}
    p = Path(spec)
    if p.is_dir():
        samples = _from_dir(p)
    elif p.is_file():
        samples = _from_jsonl(p)
    else:
        raise FileNotFoundError(f"calibration set {spec} does not exist (a directory or a .jsonl file)")
    if not samples:
        raise ValueError(f"calibration set {spec} has no images, .txt files or records")
    samples = samples[:n]
    digest = hashlib.sha256(json.dumps(samples, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return samples, {"source": str(p.resolve()), "samples": len(samples), "sha256_16": digest}
