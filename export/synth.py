"""Procedurally generated vision tasks: shapes, colours, counts, positions, text, pairs, motion.

Used to train the embedded default model (``scripts/train_toy.py``), to build evaluation sets
for ``qvl eval`` and as calibration data. Sample ``i`` of task ``t`` under seed ``s`` depends on
``(s, t, i)`` alone, so any slice of a set can be regenerated without generating the rest.

    python -m qvl.export.synth --out DIR --n 50 --seed 1 [--inline]   # n per task

Answers are short lowercase strings from closed vocabularies (``VOCAB_TEXT`` lists every word),
so a model that gets one right gets it exactly right.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from qvl.export.scene import (CELL, COLOURS, FRAME, FRAME_RGB, MAX_CELLS, OBJECT_R, background, corner_cell,  # noqa: F401
                              draw_frame, draw_scene, draw_shape, jitter)

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
          "cross": "crosses", "diamond": "diamonds"}
CORNERS = ("top left", "top right", "bottom left", "bottom right")
DIRECTIONS = ("left", "right", "up", "down")
WORDS = ("cat", "dog", "sun", "box", "key", "map", "cup", "hat", "pen", "egg", "fox", "car", "bus", "toy",
         "tree", "fish", "bird", "moon", "book", "door", "lamp", "milk", "rain", "ship", "frog", "cake",
         "apple", "house", "robot", "water", "train", "chair", "plant", "music", "snow", "wind")
MAX_COUNT = 5
# Two digits at most: the numbers qvl-toy is trained to read (its model card gives its ocr accuracy).
MAX_NUMBER = 99

QUESTIONS = {
    "shape": ("What shape is this?", "What shape is in the picture?"),
    "colour": ("What colour is the {shape}?", "What is the colour of the {shape}?"),
    "count": ("How many {shapes} are there?", "Count the {shapes}."),
    "position": ("Where is the {shape}?", "In which corner is the {shape}?"),
    "ocr": ("What does the text say?", "Read the text in the image."),
    "compare": ("Which image has more {shapes}?", "Which picture shows more {shapes}?"),
    "direction": ("Which way is the {shape} moving?", "In which direction does the {shape} move?"),
}
IMAGE_TASKS = ("shape", "colour", "count", "position", "ocr", "compare")
VIDEO_TASKS = ("direction",)
TASKS = IMAGE_TASKS + VIDEO_TASKS
VIDEO_FRAMES = 4  # two temporal patches of two frames each

# Every word a question or an answer can contain: the toy tokenizer is trained on this so answers
# and questions are a few tokens each. Answers start the assistant turn, so each also stands at the
# start of a line (byte-level BPE merges " cat" and "cat" separately); so do the chat roles.
ANSWERS = (*SHAPES, *COLOURS, *CORNERS, *DIRECTIONS, *WORDS, "first", "second", *map(str, range(10)))
VOCAB_TEXT = "\n".join([
    *(q.format(shape=s, shapes=PLURAL[s]) for qs in QUESTIONS.values() for q in qs for s in SHAPES),
    *ANSWERS, " ".join(ANSWERS), " ".join(PLURAL.values()), "system", "user", "assistant",
    "You are a helpful assistant.",
])


@dataclass
class Sample:
    id: str
    task: str
    question: str
    answer: str
    images: list = field(default_factory=list)  # PIL images, in the order the question refers to them
    frames: list = field(default_factory=list)  # one video's PIL frames, all the same size
    metric: str = "exact"
    # more (question, answer) pairs the same visuals answer: follow-up turns in training only
    extra: list = field(default_factory=list)
    # what was drawn, one dict per image (or one for the video): ``objects`` [(shape, colour, cx, cy,
    # r)] and ``size`` for scenes, ``text`` for OCR, ``motion`` (shape, colour, direction), ``size``,
    # the ``mover``'s cell (column, row) and an optional ``still`` (shape, colour, column, row) for clips.
    # Training supervises the vision tower with it directly (scripts/toy_heads.py's auxiliary heads).
    facts: list = field(default_factory=list)

    def messages(self, images=None, frames=None) -> list[dict]:
        """One user turn in qwen-vl-utils form; ``images``/``frames`` replace the PIL objects
        (e.g. with file paths). Video items pin their size: the frames are already multiples of
        56, and qwen-vl-utils' video minimum (128 tokens a frame) would otherwise upscale them."""
        images = self.images if images is None else images
        frames = self.frames if frames is None else frames
        content = [{"type": "image", "image": im} for im in images]
        if frames:
            w, h = self.frames[0].size
            content.append({"type": "video", "video": list(frames), "resized_height": h, "resized_width": w})
        content.append({"type": "text", "text": self.question})
        return [{"role": "user", "content": content}]


def _rng(seed: int, task: str, index: int) -> random.Random:
    # str seeds hash with sha512: stable across processes and Python versions, unlike hash()
    return random.Random(f"qvl-synth:{seed}:{task}:{index}")


def _extras(rng, size, objects, skip: tuple, k: int = 8) -> list[tuple[str, str]]:
    """Up to ``k`` more questions the scene answers unambiguously, for multi-turn training.

    One picture then teaches several answers for the price of one pass through the vision tower;
    the decoder's lookups (which object is "the circle") are what the toy learns slowest.
    ``skip`` is the first question's (task, shape): a paraphrase of it would only teach copying.
    """
    w, h = size
    counts = {s: sum(o[0] == s for o in objects) for s in SHAPES}
    qa = {}
    if len(objects) == 1:
        qa[("shape", None)] = objects[0][0]
    for shape, colour, cx, cy, r in objects:
        if counts[shape] == 1:
            qa[("colour", shape)] = colour
            corner = corner_cell(w, h, cx, cy)
            if corner:
                qa[("position", shape)] = corner
    qa.update({("count", s): str(n) for s, n in counts.items() if 1 <= n <= MAX_COUNT})
    qa.pop(skip, None)
    keys = sorted(qa, key=lambda key: (key[0], key[1] or ""))  # fixed order before the seeded shuffle
    rng.shuffle(keys)
    return [(_ask(rng, task, shape), qa[(task, shape)]) for task, shape in keys[:k]]


def _colour(rng) -> str:
    return rng.choice(list(COLOURS))


def _ask(rng, task: str, shape: str | None = None) -> str:
    return rng.choice(QUESTIONS[task]).format(shape=shape, shapes=PLURAL.get(shape))


def _scene_facts(img, objects) -> dict:
    return {"size": img.size, "objects": list(objects)}


def _with_extras(rng, img, objects, task, shape, answer):
    return ([img], _ask(rng, task, shape), answer, _extras(rng, img.size, objects, skip=(task, shape)),
            [_scene_facts(img, objects)])


def _shape(rng, index, seed):
    shape = rng.choice(SHAPES)
    img, objs = draw_scene(rng, [(shape, _colour(rng))], lo=2, hi=7)
    return _with_extras(rng, img, objs, "shape", None, shape)


def _colour_task(rng, index, seed):
    shapes = rng.sample(SHAPES, rng.randint(1, 3))
    colours = [_colour(rng) for _ in shapes]
    img, objs = draw_scene(rng, list(zip(shapes, colours)), lo=2, hi=8)
    return _with_extras(rng, img, objs, "colour", shapes[0], colours[0])


def _count_objects(rng, shape, n):
    others = [s for s in SHAPES if s != shape]
    objs = [(shape, _colour(rng)) for _ in range(n)]
    objs += [(rng.choice(others), _colour(rng)) for _ in range(rng.randint(0, 2))]
    rng.shuffle(objs)
    return objs


def _count(rng, index, seed):
    shape = rng.choice(SHAPES)
    n = rng.randint(1, MAX_COUNT)
    img, objs = draw_scene(rng, _count_objects(rng, shape, n), lo=3, hi=8)
    return _with_extras(rng, img, objs, "count", shape, str(n))


def _position(rng, index, seed):
    shapes = rng.sample(SHAPES, rng.randint(1, 2))
    corner = rng.choice(CORNERS)
    top, left = corner.startswith("top"), corner.endswith("left")

    def cells(a, b):  # the corner's cell
        return [(0 if left else a - 1, 0 if top else b - 1)]

    img, objs = draw_scene(rng, [(s, _colour(rng)) for s in shapes], lo=2, hi=8, cells_of_first=cells)
    return _with_extras(rng, img, objs, "position", shapes[0], corner)


OCR_FONT = (18, 22)  # font sizes: a character is about half a cell wide


def _ocr(rng, index, seed):
    """A word or number starting at a cell's left edge, centred on a row of cells."""
    text = rng.choice(WORDS) if rng.random() < 0.5 else str(rng.randint(0, MAX_NUMBER))
    font = ImageFont.load_default(size=rng.randint(*OCR_FONT))
    x0, y0, x1, y1 = font.getbbox(text)
    need = math.ceil((x1 - x0 + 4) / CELL)
    a = rng.randint(max(2, need), max(2, need, 7))
    b = rng.randint(2, 5)
    i, j = rng.randint(0, a - need), rng.randint(0, b - 1)
    img = Image.new("RGB", (a * CELL, b * CELL), background(rng))
    ink = jitter(rng.choice([(20, 20, 20), (30, 40, 150), (140, 20, 20), (20, 90, 30)]), rng)
    ImageDraw.Draw(img).text((i * CELL + 2 - x0, (j + 0.5) * CELL - (y0 + y1) / 2), text, font=font, fill=ink)
    # the cells of the text's box (columns i..i+need-1 of row j; the last may hold only its 4 px
    # margin): toy_targets.token_targets puts the text on their tokens
    return [img], _ask(rng, "ocr"), text, [], [{"text": text, "size": img.size, "cells": (i, j, need)}]


def _compare(rng, index, seed):
    shape = rng.choice(SHAPES)
    a, b = rng.sample(range(1, MAX_COUNT + 1), 2)
    scenes = [draw_scene(rng, _count_objects(rng, shape, n), lo=3, hi=7) for n in (a, b)]
    return ([img for img, _ in scenes], _ask(rng, "compare", shape), "first" if a > b else "second", [],
            [_scene_facts(img, objs) for img, objs in scenes])


MOTION_STEP = 3  # px a frame: the path stays inside the object's cell


def _direction(rng, index, seed):
    """VIDEO_FRAMES frames of a shape moving in a straight line inside its cell, plus an optional
    still distractor in another cell."""
    shape = rng.choice(SHAPES)
    direction = rng.choice(DIRECTIONS)
    # multiples of 56: qwen-vl-utils sizes listed frames to multiples of 2 x 28 before the video
    # resize, so any other size would be resampled twice on its way to the model
    a, b = rng.choice(((4, 4), (4, 6), (6, 4), (6, 6), (8, 4), (4, 8), (8, 6)))
    r = rng.randint(7, 8)
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    cells = [(i, j) for j in range(b) for i in range(a)]
    (i, j), (si, sj) = rng.sample(cells, 2)
    half = MOTION_STEP * (VIDEO_FRAMES - 1) / 2
    x0, y0 = (i + 0.5) * CELL - dx * half, (j + 0.5) * CELL - dy * half
    bg, colour = background(rng), _colour(rng)
    fill = jitter(COLOURS[colour], rng)
    still, fact = None, {"motion": (shape, colour, direction), "size": (a * CELL, b * CELL), "mover": (i, j)}
    if rng.random() < 0.5:
        other = rng.choice([s for s in SHAPES if s != shape])
        r_still, still_colour = rng.randint(*OBJECT_R), _colour(rng)
        still = (other, ((si + 0.5) * CELL, (sj + 0.5) * CELL, r_still), jitter(COLOURS[still_colour], rng))
        fact["still"] = (other, still_colour, si, sj)
    frames = []
    for k in range(VIDEO_FRAMES):
        img = Image.new("RGB", (a * CELL, b * CELL), bg)
        d = ImageDraw.Draw(img)
        if still:
            draw_shape(d, still[0], *still[1], still[2])
        draw_shape(d, shape, x0 + dx * MOTION_STEP * k, y0 + dy * MOTION_STEP * k, r, fill)
        frames.append(img)
    return frames, _ask(rng, "direction", shape), direction, [(_ask(rng, "colour", shape), colour)], [fact]


_MAKERS = {"shape": _shape, "colour": _colour_task, "count": _count, "position": _position, "ocr": _ocr,
           "compare": _compare, "direction": _direction}


def make_sample(task: str, index: int, seed: int = 0) -> Sample:
    """Sample ``index`` of ``task``; a pure function of its arguments."""
    if task not in _MAKERS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    rng = _rng(seed, task, index)
    visuals, question, answer, extra, facts = _MAKERS[task](rng, index, seed)
    sid = f"{task}-{index:05d}"
    if task in VIDEO_TASKS:
        return Sample(sid, task, question, answer, frames=visuals, extra=extra, facts=facts)
    return Sample(sid, task, question, answer, images=visuals, extra=extra, facts=facts)


def generate(n: int, seed: int = 0, tasks=TASKS, start: int = 0) -> list[Sample]:
    """``n`` samples of every task, interleaved task by task."""
    return [make_sample(t, i, seed) for i in range(start, start + n) for t in tasks]


def demo_pictures() -> list[tuple[Image.Image, list[tuple[str, str]]]]:
    """Two fixed pictures for ``qvl demo``, each with questions and what was drawn (on the cell grid
    the toy was trained on)."""
    scene = Image.new("RGB", (8 * CELL, 6 * CELL), (246, 244, 236))
    draw_frame(scene)
    d = ImageDraw.Draw(scene)
    for shape, colour, (i, j) in (("circle", "red", (1, 1)), ("square", "blue", (7, 5)),
                                  ("triangle", "green", (5, 1)), ("triangle", "orange", (2, 4))):
        draw_shape(d, shape, (i + 0.5) * CELL, (j + 0.5) * CELL, 11, COLOURS[colour])
    text = Image.new("RGB", (6 * CELL, 3 * CELL), (240, 244, 250))
    font = ImageFont.load_default(size=20)
    x0, y0, _, y1 = font.getbbox("robot")
    ImageDraw.Draw(text).text((CELL + 2 - x0, 1.5 * CELL - (y0 + y1) / 2), "robot", font=font, fill=(30, 40, 150))
    single = Image.new("RGB", (4 * CELL, 3 * CELL), (240, 246, 240))
    draw_frame(single)
    draw_shape(ImageDraw.Draw(single), "star", 2.5 * CELL, 1.5 * CELL, 11, COLOURS["purple"])
    return [
        (scene, [("How many triangles are there?", "2"), ("What colour is the circle?", "red"),
                 ("Where is the square?", "bottom right")]),
        (single, [("What shape is this?", "star")]),
        (text, [("What does the text say?", "robot")]),
    ]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_dataset(out_dir, n: int, seed: int = 1, tasks=TASKS, inline: bool = False) -> Path:
    """Write ``n`` samples per task as ``data.jsonl`` (``qvl eval`` format) plus PNGs under
    ``images/``, or with ``inline`` as base64 data URIs inside the one JSONL file. Returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not inline:
        (out / "images").mkdir(exist_ok=True)

    def ref(img: Image.Image, name: str) -> str:
        data = _png(img)
        if inline:
            return "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        (out / "images" / name).write_bytes(data)
        return f"images/{name}"

    lines = []
    for s in generate(n, seed, tasks):
        rec = {"id": s.id, "task": s.task}
        if s.frames:
            rec["messages"] = s.messages(frames=[ref(f, f"{s.id}-f{k}.png") for k, f in enumerate(s.frames)])
        else:
            rec["images"] = [ref(im, f"{s.id}-{k}.png") for k, im in enumerate(s.images)]
            rec["question"] = s.question
        rec["answers"] = [s.answer]
        rec["metric"] = s.metric
        lines.append(json.dumps(rec))
    path = out / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    logger.info("wrote %d samples (%d per task, seed %d) to %s", len(lines), n, seed, path)
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Write a synthetic vision-task set (PNG files + data.jsonl).")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=50, help="samples per task")
    ap.add_argument("--seed", type=int, default=1, help="training uses seed 0; evaluate on another")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--inline", action="store_true", help="embed the PNGs in data.jsonl as data: URIs")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_dataset(args.out, args.n, args.seed, tuple(args.tasks), args.inline)


if __name__ == "__main__":
    main()
