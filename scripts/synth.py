"""Procedurally generated vision tasks: shapes, colours, counts, positions, text, pairs, motion.

Used to train the embedded default model (``scripts/train_toy.py``), to build evaluation sets
for ``qvl eval`` and as calibration data. Sample ``i`` of task ``t`` under seed ``s`` depends on
``(s, t, i)`` alone, so any slice of a set can be regenerated without generating the rest.

    python -m qvl.scripts.synth --out DIR --n 50 --seed 1 [--inline]   # n per task

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

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
          "cross": "crosses", "diamond": "diamonds"}
COLOURS = {"red": (215, 30, 35), "orange": (245, 135, 10), "yellow": (235, 205, 0), "green": (35, 155, 55),
           "blue": (35, 75, 215), "purple": (130, 45, 175), "pink": (240, 115, 185), "black": (25, 25, 25)}
CORNERS = ("top left", "top right", "bottom left", "bottom right")
DIRECTIONS = ("left", "right", "up", "down")
WORDS = ("cat", "dog", "sun", "box", "key", "map", "cup", "hat", "pen", "egg", "fox", "car", "bus", "toy",
         "tree", "fish", "bird", "moon", "book", "door", "lamp", "milk", "rain", "ship", "frog", "cake",
         "apple", "house", "robot", "water", "train", "chair", "plant", "music", "snow", "wind")
MAX_COUNT = 5
# Two digits at most, to keep reading within what a 2.5M-parameter model should learn to 95% exact
# in the 45-minute CPU budget (an estimate: 3-digit reads were not tried at full length).
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


def _background(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(228, 255) for _ in range(3))


def _jitter(rgb, rng: random.Random, amount: int = 18) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """``shape`` centred at (cx, cy) inside a circle of radius ``r``."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.82
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.75), (cx + r * 0.95, cy + r * 0.75)], fill=fill)
    elif shape == "star":
        pts = [(cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
        draw.polygon(pts, fill=fill)
    elif shape == "cross":
        a = r * 0.34
        draw.rectangle((cx - r, cy - a, cx + r, cy + a), fill=fill)
        draw.rectangle((cx - a, cy - r, cx + a, cy + r), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _canvas(rng: random.Random, lo: int, hi: int, max_ratio: float = 2.5) -> tuple[int, int]:
    while True:
        w, h = rng.randint(lo, hi), rng.randint(lo, hi)
        if max(w, h) / min(w, h) <= max_ratio:
            return w, h


def _place(rng, size, radii, region=None, placed=(), gap=4, tries=200):
    """Centres for circles of ``radii`` inside ``size``, apart from each other and ``placed``.

    ``region`` (x0, y0, x1, y1) bounds the first circle's extent. Returns None on failure."""
    w, h = size
    out = list(placed)
    new = []
    for i, r in enumerate(radii):
        x0, y0, x1, y1 = region if (region and i == 0) else (0, 0, w, h)
        x0, y0, x1, y1 = x0 + r + 2, y0 + r + 2, x1 - r - 2, y1 - r - 2
        if x0 > x1 or y0 > y1:
            return None
        for _ in range(tries):
            c = (rng.uniform(x0, x1), rng.uniform(y0, y1), r)
            if all(math.hypot(c[0] - o[0], c[1] - o[1]) > c[2] + o[2] + gap for o in out):
                out.append(c)
                new.append(c)
                break
        else:
            return None
    return new


def _scene(rng, objects, lo=56, hi=224, r_range=(9, 20), region_of_first=None):
    """Draw ``objects`` [(shape, colour)] on a fresh canvas; retries with new sizes until they fit.

    ``region_of_first(w, h)`` optionally confines the first object (used for corners). Returns the
    image and the placed objects [(shape, colour, cx, cy, r)]."""
    for _ in range(100):
        w, h = _canvas(rng, lo, hi)
        r_hi = min(r_range[1], int(min(w, h) / 4))
        if r_hi < r_range[0]:
            continue
        radii = [rng.randint(r_range[0], r_hi) for _ in objects]
        region = region_of_first(w, h) if region_of_first else None
        spots = _place(rng, (w, h), radii, region)
        if spots is None:
            continue
        img = Image.new("RGB", (w, h), _background(rng))
        d = ImageDraw.Draw(img)
        for (shape, colour), (cx, cy, r) in zip(objects, spots):
            draw_shape(d, shape, cx, cy, r, _jitter(COLOURS[colour], rng))
        return img, [(shape, colour, cx, cy, r) for (shape, colour), (cx, cy, r) in zip(objects, spots)]
    raise RuntimeError(f"could not place {len(objects)} objects")


def _corner_of(w, h, cx, cy, r) -> str | None:
    """The quadrant holding the whole object, at least 3 px off the centre lines, else None."""
    mx, my = w / 2, h / 2
    col = "left" if cx + r <= mx - 3 else "right" if cx - r >= mx + 3 else None
    row = "top" if cy + r <= my - 3 else "bottom" if cy - r >= my + 3 else None
    return f"{row} {col}" if row and col else None


def _extras(rng, size, objects, skip: tuple, k: int = 3) -> list[tuple[str, str]]:
    """Up to ``k`` more questions the scene answers unambiguously, for multi-turn training.

    One picture then teaches several answers for the price of one pass through the vision tower.
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
            corner = _corner_of(w, h, cx, cy, r)
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


def _with_extras(rng, img, objects, task, shape, answer):
    return [img], _ask(rng, task, shape), answer, _extras(rng, img.size, objects, skip=(task, shape))


def _shape(rng, index, seed):
    shape = rng.choice(SHAPES)
    img, objs = _scene(rng, [(shape, _colour(rng))], lo=56, hi=196, r_range=(10, 30))
    return _with_extras(rng, img, objs, "shape", None, shape)


def _colour_task(rng, index, seed):
    shapes = rng.sample(SHAPES, rng.randint(1, 3))
    colours = [_colour(rng) for _ in shapes]
    img, objs = _scene(rng, list(zip(shapes, colours)), lo=70, hi=224)
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
    img, objs = _scene(rng, _count_objects(rng, shape, n), lo=112, hi=224, r_range=(8, 15))
    return _with_extras(rng, img, objs, "count", shape, str(n))


def _position(rng, index, seed):
    shapes = rng.sample(SHAPES, rng.randint(1, 2))
    corner = rng.choice(CORNERS)
    top, left = corner.startswith("top"), corner.endswith("left")

    def region(w, h):  # the corner's quadrant, kept a few pixels off the centre lines
        mx, my = w / 2, h / 2
        return (0 if left else mx + 3, 0 if top else my + 3, mx - 3 if left else w, my - 3 if top else h)

    img, objs = _scene(rng, [(s, _colour(rng)) for s in shapes], lo=84, hi=224, r_range=(8, 18),
                       region_of_first=region)
    return _with_extras(rng, img, objs, "position", shapes[0], corner)


def _ocr(rng, index, seed):
    text = rng.choice(WORDS) if rng.random() < 0.5 else str(rng.randint(0, MAX_NUMBER))
    font = ImageFont.load_default(size=rng.randint(16, 28))
    x0, y0, x1, y1 = font.getbbox(text)
    tw, th = x1 - x0, y1 - y0
    w = rng.randint(max(56, tw + 8), max(56, tw + 8, 200))
    h = rng.randint(max(56, th + 8), max(56, th + 8, 140))
    img = Image.new("RGB", (w, h), _background(rng))
    ink = _jitter(rng.choice([(20, 20, 20), (30, 40, 150), (140, 20, 20), (20, 90, 30)]), rng)
    ImageDraw.Draw(img).text((rng.randint(4, w - tw - 4) - x0, rng.randint(4, h - th - 4) - y0), text,
                             font=font, fill=ink)
    return [img], _ask(rng, "ocr"), text, []


def _compare(rng, index, seed):
    shape = rng.choice(SHAPES)
    a, b = rng.sample(range(1, MAX_COUNT + 1), 2)
    imgs = [_scene(rng, _count_objects(rng, shape, n), lo=112, hi=196, r_range=(8, 14))[0] for n in (a, b)]
    return imgs, _ask(rng, "compare", shape), "first" if a > b else "second", []


def _direction(rng, index, seed):
    """VIDEO_FRAMES frames of a shape moving in a straight line, plus an optional still distractor."""
    shape = rng.choice(SHAPES)
    direction = rng.choice(DIRECTIONS)
    # multiples of 56: qwen-vl-utils sizes listed frames to multiples of 2 x 28 before the video
    # resize, so any other size would be resampled twice on its way to the model
    w, h = rng.choice(((112, 112), (112, 168), (168, 112), (168, 168), (224, 112), (112, 224), (224, 168)))
    r = rng.randint(8, 13)
    step = rng.randint(6, 10)
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    span = step * (VIDEO_FRAMES - 1)
    # the whole path stays inside the frame
    x0 = rng.uniform(r + 2 + max(0, -dx) * span, w - r - 2 - max(0, dx) * span)
    y0 = rng.uniform(r + 2 + max(0, -dy) * span, h - r - 2 - max(0, dy) * span)
    bg, colour = _background(rng), _colour(rng)
    fill = _jitter(COLOURS[colour], rng)
    still = None
    if rng.random() < 0.5:
        other = rng.choice([s for s in SHAPES if s != shape])
        path = [(x0 + dx * step * k, y0 + dy * step * k, r) for k in range(VIDEO_FRAMES)]
        spot = _place(rng, (w, h), [rng.randint(7, 11)], placed=path)
        if spot:
            still = (other, spot[0], _jitter(COLOURS[_colour(rng)], rng))
    frames = []
    for k in range(VIDEO_FRAMES):
        img = Image.new("RGB", (w, h), bg)
        d = ImageDraw.Draw(img)
        if still:
            draw_shape(d, still[0], *still[1], still[2])
        draw_shape(d, shape, x0 + dx * step * k, y0 + dy * step * k, r, fill)
        frames.append(img)
    return frames, _ask(rng, "direction", shape), direction, [(_ask(rng, "colour", shape), colour)]


_MAKERS = {"shape": _shape, "colour": _colour_task, "count": _count, "position": _position, "ocr": _ocr,
           "compare": _compare, "direction": _direction}


def make_sample(task: str, index: int, seed: int = 0) -> Sample:
    """Sample ``index`` of ``task``; a pure function of its arguments."""
    if task not in _MAKERS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    rng = _rng(seed, task, index)
    visuals, question, answer, extra = _MAKERS[task](rng, index, seed)
    sid = f"{task}-{index:05d}"
    if task in VIDEO_TASKS:
        return Sample(sid, task, question, answer, frames=visuals, extra=extra)
    return Sample(sid, task, question, answer, images=visuals, extra=extra)


def generate(n: int, seed: int = 0, tasks=TASKS, start: int = 0) -> list[Sample]:
    """``n`` samples of every task, interleaved task by task."""
    return [make_sample(t, i, seed) for i in range(start, start + n) for t in tasks]


def demo_pictures() -> list[tuple[Image.Image, list[tuple[str, str]]]]:
    """Two fixed pictures for ``qvl demo``, each with questions and what was drawn."""
    scene = Image.new("RGB", (224, 168), (246, 244, 236))
    d = ImageDraw.Draw(scene)
    draw_shape(d, "circle", 48, 42, 22, COLOURS["red"])
    draw_shape(d, "square", 180, 128, 20, COLOURS["blue"])
    draw_shape(d, "triangle", 150, 40, 16, COLOURS["green"])
    draw_shape(d, "triangle", 60, 128, 16, COLOURS["orange"])
    text = Image.new("RGB", (168, 84), (240, 244, 250))
    font = ImageFont.load_default(size=26)
    ImageDraw.Draw(text).text((34, 24), "robot", font=font, fill=(30, 40, 150))
    return [
        (scene, [("How many triangles are there?", "2"), ("What colour is the circle?", "red"),
                 ("Where is the square?", "bottom right")]),
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
