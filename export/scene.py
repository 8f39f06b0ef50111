"""The synthetic pictures' canvas: a grid of token-sized cells, a frame, a palette, and shapes.

Canvases are whole numbers of ``CELL`` x ``CELL`` cells (one merged token of Qwen2-VL: 14 px
patches, 2 x 2 merge) and every object sits inside one cell; ``qvl.export.synth`` builds its
tasks' scenes from these pieces.
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

COLOURS = {"red": (215, 30, 35), "orange": (245, 135, 10), "yellow": (235, 205, 0), "green": (35, 155, 55),
           "blue": (35, 75, 215), "purple": (130, 45, 175), "pink": (240, 115, 185), "black": (25, 25, 25)}


def background(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(228, 255) for _ in range(3))


def jitter(rgb, rng: random.Random, amount: int = 18) -> tuple[int, int, int]:
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


# Pictures are laid out on the vision tower's token grid: canvases are whole numbers of CELL x CELL
# cells (one merged token of Qwen2-VL: 14 px patches, 2 x 2 merge) within the toy's pixel limits,
# so the processor keeps their size, and every object sits inside one cell. A ViT trained from
# scratch in minutes on CPU does not learn shapes at arbitrary offsets (qvl-toy's model card
# gives the measurement). Off-grid pictures are outside the toy's training distribution, which
# its model card says.
CELL = 28
MAX_CELLS = 64  # 224 x 224 pixels: the toy's max_pixels
OBJECT_R = (9, 11)  # radius range; with JITTER the object stays 2 px inside its cell
JITTER = 1.0
# Scenes have a thin frame at the canvas edge. Qwen2-VL's vision tower knows only relative
# positions (2D rotary), and a plain canvas gives every background token the same value, so a
# token's absolute place reaches it only through which neighbours are missing, by way of the
# softmax normaliser, which the tower learns slowly. The frame puts the edge into the pixels of
# the cells along it, where a corner is as local as a shape (qvl-toy's model card: the tower's
# corner column with and without it). It stays outside the objects (they keep 2 px from their
# cell's border).
FRAME, FRAME_RGB = 2, (96, 96, 96)


def draw_frame(img: Image.Image) -> None:
    if not FRAME:
        return
    w, h = img.size
    ImageDraw.Draw(img).rectangle((0, 0, w - 1, h - 1), outline=FRAME_RGB, width=FRAME)


def canvas_cells(rng, lo: int = 2, hi: int = 8, min_cells: int = 1, max_ratio: float = 2.5) -> tuple[int, int]:
    """Canvas size in cells (columns, rows)."""
    while True:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if a * b <= MAX_CELLS and a * b >= min_cells and max(a, b) / min(a, b) <= max_ratio:
            return a, b


def draw_scene(rng, objects, lo=2, hi=8, cells_of_first=None, r_range=OBJECT_R):
    """Draw ``objects`` [(shape, colour)] in distinct cells of a fresh canvas.

    ``cells_of_first(a, b)`` optionally lists the cells the first object may take (corners).
    Returns the image and the placed objects [(shape, colour, cx, cy, r)]."""
    for _ in range(100):
        a, b = canvas_cells(rng, lo, hi, min_cells=len(objects))
        free = [(i, j) for j in range(b) for i in range(a)]
        first = cells_of_first(a, b) if cells_of_first else free
        if not first:
            continue
        spots = [rng.choice(first)]
        rest = [c for c in free if c != spots[0]]
        spots += rng.sample(rest, len(objects) - 1)
        img = Image.new("RGB", (a * CELL, b * CELL), background(rng))
        draw_frame(img)
        d = ImageDraw.Draw(img)
        placed = []
        for (shape, colour), (i, j) in zip(objects, spots):
            r = rng.randint(*r_range)
            cx = (i + 0.5) * CELL + rng.uniform(-JITTER, JITTER)
            cy = (j + 0.5) * CELL + rng.uniform(-JITTER, JITTER)
            draw_shape(d, shape, cx, cy, r, jitter(COLOURS[colour], rng))
            placed.append((shape, colour, cx, cy, r))
        return img, placed
    raise RuntimeError(f"could not place {len(objects)} objects")


def corner_cell(w, h, cx, cy) -> str | None:
    """The canvas corner whose cell holds the point (cx, cy), or None off the four corner cells.

    Position questions ask about objects in a corner cell only. Qwen2-VL's vision tower has no
    absolute position embedding (its 2D rotary one is relative), and on a plain background the
    only absolute cue a token has is which neighbours it lacks at the canvas edges; an object in
    the middle of a quadrant lacks none (qvl-toy's model card compares quadrants, corner
    cells and corner cells with a FRAME)."""
    i, j, a, b = int(cx // CELL), int(cy // CELL), w // CELL, h // CELL
    col = "left" if i == 0 else "right" if i == a - 1 else None
    row = "top" if j == 0 else "bottom" if j == b - 1 else None
    return f"{row} {col}" if row and col else None
