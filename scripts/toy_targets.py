"""qvl-toy's training examples and what they are trained toward.

``Encoder`` turns a synth sample into token ids, labels and pixel inputs, and records each
answer's lookups; the rest derive targets from the generator's ground truth (``facts``):
per-picture classes for the auxiliary heads (``aux_targets``), per-token classes for the dense
head (``token_targets``), and the vision tokens the lookup heads should attend to from where an
answer is predicted (``lookup_targets``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qvl.runtime.processor import ImageProcessor, ImageProcessorConfig
from qvl.runtime.prompt import build_request
from qvl.runtime.tokenizer import Tokenizer
from qvl.export import synth


@dataclass
class Example:
    task: str
    ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None
    grids: list
    video_values: torch.Tensor | None
    video_grids: list
    facts: list = None
    aux: list | None = None  # example_aux's cache
    # (position predicting a turn's answer, sequence positions of the vision tokens it is about)
    lookups: list = field(default_factory=list)


class Encoder:
    """Sample -> token ids, labels and pixel inputs, through qvl's own prompt and image path.

    Image prompts go through ``build_request``, the code path qvl runs at inference, so training
    sees exactly the pixels and tokens inference will. Videos are patchified here, as
    transformers' Qwen2VLVideoProcessor does, so training does not hang on the runtime's video
    reader; tests/test_synth.py checks the rows against qvl's video path.
    """

    def __init__(self, ckpt_dir: Path, lookup_mode: str = "mass"):
        self.lookup_mode = lookup_mode
        self.tok = Tokenizer.from_dir(ckpt_dir)
        self.proc = ImageProcessor(ImageProcessorConfig.from_dir(ckpt_dir))
        self.im_end = self.tok.token_id("<|im_end|>")
        self.image_id, self.video_id = self.tok.token_id("<|image_pad|>"), self.tok.token_id("<|video_pad|>")
        c = self.proc.cfg
        x = (np.arange(256, dtype=np.float64) * c.rescale_factor).astype(np.float32)
        self._lut = ((x[None, :] - np.array(c.image_mean, np.float32)[:, None])
                     / np.array(c.image_std, np.float32)[:, None]).astype(np.float32)  # [3, 256]

    def video(self, frames) -> tuple[torch.Tensor, tuple[int, int, int]]:
        c = self.proc.cfg
        p, m, tp = c.patch_size, c.merge_size, c.temporal_patch_size
        arr = np.stack([np.asarray(f.convert("RGB"), dtype=np.uint8) for f in frames])  # [T, H, W, C]
        if len(arr) % tp:
            arr = np.concatenate([arr, arr[-1:].repeat(tp - len(arr) % tp, 0)])
        t, h, w, ch = arr.shape
        if h % (p * m) or w % (p * m):
            raise ValueError(f"video frames must be multiples of {p * m}, got {w}x{h}")
        vals = self._lut[np.arange(ch)[None, None, None, :], arr]  # [T, H, W, C] float32
        gt, gh, gw = t // tp, h // p, w // p
        x = vals.reshape(gt, tp, gh // m, m, p, gw // m, m, p, ch)
        x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)  # [gt, gh/m, gw/m, m, m, C, tp, p, p]
        return torch.from_numpy(np.ascontiguousarray(x).reshape(gt * gh * gw, -1)), (gt, gh, gw)

    def __call__(self, s: synth.Sample, follow_ups: bool = True) -> Example:
        """The sample's question as the first turn; with ``follow_ups``, its extra questions as
        later turns of the same chat (every answer is supervised)."""
        msgs = s.messages()
        vv, vgrids = None, []
        if s.frames:
            text = self.tok.apply_chat_template(msgs, add_generation_prompt=True)
            vv, g = self.video(s.frames)
            parts = text.split("<|video_pad|>")
            ids = self.tok.encode(parts[0] + "<|video_pad|>" * (g[0] * g[1] * g[2] // 4) + parts[1])
            pv, grids, vgrids = None, [], [g]
        else:
            req = build_request(msgs, self.tok, self.proc, self.proc.cfg.merge_size)
            text, ids, pv, grids = req.text, req.ids, req.pixel_values, req.grids
        labels = [-100] * len(ids)
        objects = object_positions(s.facts, ids, vgrids or grids, self.video_id if s.frames else self.image_id)
        lookups = []
        conv, done = list(msgs), text  # `done`: the template text whose tokens are in `ids`
        for k, (question, answer) in enumerate([(s.question, s.answer)] + (s.extra if follow_ups else [])):
            if k:
                conv.append({"role": "user", "content": question})
                text = self.tok.apply_chat_template(conv, add_generation_prompt=True)
                if not text.startswith(done):
                    raise ValueError("the chat template does not render a conversation as a prefix of its extension")
                prompt = self.tok.encode(text[len(done):])
                ids, labels = ids + prompt, labels + [-100] * len(prompt)
            # "count" classes each turn by its own question (a scene's follow-ups ask other
            # tasks); the other modes take the sample's task for every turn
            task = (turn_task(question) or s.task) if self.lookup_mode == "count" else s.task
            lookups += [(len(ids) - 1, head, where) for head, where in
                        lookup_targets(task, named_shape(question), objects, self.lookup_mode)]
            target = self.tok.encode(answer) + [self.im_end]
            ids, labels = ids + target, labels + target
            conv.append({"role": "assistant", "content": answer})
            done = text + answer + "<|im_end|>"
        return Example(s.task, ids, labels, pv, grids, vv, vgrids, s.facts, lookups=lookups)

    def collate(self, batch: list[Example]) -> dict:
        return collate(batch, self.image_id, self.video_id)


def collate(batch: list[Example], image_token_id: int, video_token_id: int) -> dict:
    """Right-padded batch in the keyword form ``Qwen2VLForConditionalGeneration`` takes."""
    n = max(len(e.ids) for e in batch)
    ids = torch.zeros(len(batch), n, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros(len(batch), n, dtype=torch.long)
    for b, e in enumerate(batch):
        ids[b, : len(e.ids)] = torch.tensor(e.ids)
        labels[b, : len(e.ids)] = torch.tensor(e.labels)
        mask[b, : len(e.ids)] = 1
    # transformers 5 finds the vision runs for M-RoPE from these (0 text, 1 image, 2 video)
    types = (ids == image_token_id).long() + 2 * (ids == video_token_id).long()
    out = dict(input_ids=ids, attention_mask=mask, labels=labels, mm_token_type_ids=types)
    pv = [e.pixel_values for e in batch if e.pixel_values is not None]
    if pv:
        out["pixel_values"] = torch.cat(pv)
        out["image_grid_thw"] = torch.tensor([g for e in batch for g in e.grids])
    vv = [e.video_values for e in batch if e.video_values is not None]
    if vv:
        out["pixel_values_videos"] = torch.cat(vv)
        out["video_grid_thw"] = torch.tensor([g for e in batch for g in e.video_grids])
    return out


WORD_CLASSES = ("<number>", *synth.WORDS)
TEXT = "<text>"  # object_positions' name for the cells a text covers
# Layers 0-1 can first bring the question's shape word to the answer position; heads 0 and 1 of
# layer 2 are the lookup heads (head 1 only for the second picture of ``compare``).
LOOKUP_LAYER, LOOKUP_HEADS = 2, (0, 1)
# lookup_mode "count": heads 1 and 2 of the same layer count (``lookup_targets``), their targets
# weighing the picture's <|vision_start|> as COUNT_SINK = k objects, so its share k/(n+k) carries n.
# With k = 1 the objects' share n/(n+1) steps by 0.033 from n = 4 to 5; k = 4 widens that step
# to 0.056 (the model card's notes: it counted no better).
COUNT_HEADS, COUNT_SINK = (1, 2), 1


def _aux_classes() -> dict[str, int]:
    heads = {"shape": len(synth.SHAPES), "text": len(WORD_CLASSES), "tens": 11, "units": 10,
             "direction": len(synth.DIRECTIONS), "mover": len(synth.SHAPES)}
    for sh in synth.SHAPES:  # per shape: how many, and (when it is the only one) its colour and corner
        heads[f"count:{sh}"] = synth.MAX_COUNT + 1
        heads[f"colour:{sh}"] = len(synth.COLOURS) + 1  # class 0: no such shape
        heads[f"corner:{sh}"] = len(synth.CORNERS) + 2  # 0: no such shape, 1: not in a corner cell
    return heads


AUX_CLASSES = _aux_classes()
AUX_NAMES = tuple(AUX_CLASSES)


def aux_targets(fact: dict) -> list[int]:
    """Class per auxiliary head for one image or clip; -100 where the fact does not apply."""
    t = dict.fromkeys(AUX_NAMES, -100)
    colours = list(synth.COLOURS)
    if "objects" in fact:
        (w, h), objs = fact["size"], fact["objects"]
        if len(objs) == 1:
            t["shape"] = synth.SHAPES.index(objs[0][0])
        for sh in synth.SHAPES:
            mine = [o for o in objs if o[0] == sh]
            if len(mine) <= synth.MAX_COUNT:
                t[f"count:{sh}"] = len(mine)
            if not mine:
                t[f"colour:{sh}"] = t[f"corner:{sh}"] = 0
            elif len(mine) == 1:
                _, colour, cx, cy, r = mine[0]
                t[f"colour:{sh}"] = 1 + colours.index(colour)
                corner = synth.corner_cell(w, h, cx, cy)
                t[f"corner:{sh}"] = 1 if corner is None else 2 + synth.CORNERS.index(corner)
    elif "text" in fact:
        text = fact["text"]
        if text.isdigit():
            t["text"] = 0
            t["tens"] = 0 if len(text) == 1 else 1 + int(text[0])
            t["units"] = int(text[-1])
        else:
            t["text"] = WORD_CLASSES.index(text)
    elif "motion" in fact:
        shape, colour, direction = fact["motion"]
        t["mover"] = synth.SHAPES.index(shape)
        t["direction"] = synth.DIRECTIONS.index(direction)
        t[f"colour:{shape}"] = 1 + colours.index(colour)
    return [t[n] for n in AUX_NAMES]


# Columns of token_targets, the classes of each (0: background or "none" where that means something)
DENSE = {"shape": len(synth.SHAPES) + 1, "colour": len(synth.COLOURS) + 1, "corner": len(synth.CORNERS) + 1,
         "motion": len(synth.DIRECTIONS) + 1, "edge": 9, "count": synth.MAX_COUNT + 1,
         "word": len(WORD_CLASSES), "tens": 11, "units": 10}
DENSE_NAMES = tuple(DENSE)
_COLUMN = {n: k for k, n in enumerate(DENSE_NAMES)}


def _edges(th: int, tw: int) -> torch.Tensor:
    """[th * tw] which canvas edges each token's cell touches: 3 * row + column, where row is
    0 top / 1 neither / 2 bottom and column 0 left / 1 neither / 2 right."""
    row = torch.ones(th, dtype=torch.long)
    col = torch.ones(tw, dtype=torch.long)
    row[0], row[-1], col[0], col[-1] = 0, 2, 0, 2
    return (3 * row[:, None] + col[None, :]).view(-1)


def token_targets(fact: dict, grid: tuple[int, int, int], merge: int = 2, clips: bool = False,
                  more: bool = False) -> torch.Tensor | None:
    """[tokens, len(DENSE)] classes per merged token, -100 where a column does not apply:

    - shape, colour: of the object the token holds (0: background);
    - corner: on scene objects, the canvas corner whose cell holds it (0: not a corner cell);
    - motion: on clip objects (0: still, 1 + DIRECTIONS index);
    - with ``more`` (``--more-facts``): edge, on every token, which canvas edges its cell touches
      (``_edges``); count, on scene objects, how many objects of its shape the picture holds; word,
      tens, units, on the cells of a text's box, the text (as ``aux_targets`` classes it).

    Clips (every temporal patch) only with ``clips``; texts only with ``more``. Columns past the
    first two train only with ``dense_facts`` (AuxHeads), past the first four with ``more``.

    synth draws every object inside one cell of the token grid, so the token holding an object's
    centre is the object's whole footprint. Dense targets teach the tower shapes far faster than
    one label a picture does: a ViT without a convolutional stem has to learn every part of a
    shape from data. The facts a question asks for (corner, motion, count, text) sit on the
    tokens of what it names, so the decoder answers with one lookup (lookup_targets). The edge
    column gives every token of every picture a target for what the corner needs: a token's only
    absolute cue is which neighbours it lacks.
    """
    t, gh, gw = grid
    th, tw = gh // merge, gw // merge
    colours = list(synth.COLOURS)
    out = torch.full((t, th * tw, len(DENSE)), -100, dtype=torch.long)
    col = _COLUMN
    if more:
        out[..., col["edge"]] = _edges(th, tw)
    if "objects" in fact:
        w, h = fact["size"]
        out[..., col["shape"]] = out[..., col["colour"]] = 0
        counts = {s: sum(o[0] == s for o in fact["objects"]) for s in synth.SHAPES}
        for shape, colour, cx, cy, r in fact["objects"]:
            i, j = min(int(cx * tw // w), tw - 1), min(int(cy * th // h), th - 1)
            corner = synth.corner_cell(w, h, cx, cy)
            cell = out[:, j * tw + i]
            cell[:, col["shape"]] = 1 + synth.SHAPES.index(shape)
            cell[:, col["colour"]] = 1 + colours.index(colour)
            cell[:, col["corner"]] = 0 if corner is None else 1 + synth.CORNERS.index(corner)
            if more:
                cell[:, col["count"]] = counts[shape] if counts[shape] <= synth.MAX_COUNT else -100
    elif "motion" in fact and clips:
        shape, colour, direction = fact["motion"]
        out[..., col["shape"]] = out[..., col["colour"]] = 0
        movers = [(shape, colour, *fact["mover"], 1 + synth.DIRECTIONS.index(direction))]
        if "still" in fact:
            movers.append((*fact["still"], 0))
        for shape, colour, i, j, motion in movers:
            cell = out[:, j * tw + i]
            cell[:, col["shape"]] = 1 + synth.SHAPES.index(shape)
            cell[:, col["colour"]] = 1 + colours.index(colour)
            cell[:, col["motion"]] = motion
    elif "cells" in fact and more:
        out[..., col["shape"]] = 0  # letters are not shapes
        i, j, n = fact["cells"]
        pooled = dict(zip(AUX_NAMES, aux_targets(fact)))
        for name, head in (("word", "text"), ("tens", "tens"), ("units", "units")):
            out[:, j * tw + i: j * tw + i + n, col[name]] = pooled[head]
    else:
        return None
    return out.view(-1, len(DENSE))


def named_shape(question: str) -> str | None:
    """The shape a question asks about ("the circle", "the circles"), if any."""
    words = set(question.lower().rstrip("?.").split())
    return next((sh for sh in synth.SHAPES if sh in words or synth.PLURAL[sh] in words), None)


def object_positions(facts, ids: list[int], grids, image_id: int, merge: int = 2) -> list[tuple[int, str, int]]:
    """(sequence position, shape, position of its picture's ``<|vision_start|>``) of the vision
    tokens holding each drawn object: every image's objects, a clip's in every temporal patch, a
    text's cells (shape ``TEXT``)."""
    pads = [i for i, t in enumerate(ids) if t == image_id]
    out, start = [], 0
    for fact, (t, gh, gw) in zip(facts or [], grids, strict=True):
        th, tw = gh // merge, gw // merge
        cells = []
        if "objects" in fact:
            (w, h) = fact["size"]
            cells = [(shape, min(int(cx * tw // w), tw - 1), min(int(cy * th // h), th - 1))
                     for shape, _, cx, cy, _ in fact["objects"]]
        elif "motion" in fact:
            cells = [(fact["motion"][0], *fact["mover"])] + ([(fact["still"][0], *fact["still"][2:])]
                                                              if "still" in fact else [])
        elif "cells" in fact:
            i, j, n = fact["cells"]
            cells = [(TEXT, i + k, j) for k in range(n)]
        for shape, i, j in cells:
            out += [(pads[start + k * th * tw + j * tw + i], shape, pads[start] - 1) for k in range(t)]
        start += t * th * tw
    return out


_TURN_TASK = {q.format(shape=sh, shapes=synth.PLURAL[sh]): task
              for task, qs in synth.QUESTIONS.items() for q in qs for sh in synth.SHAPES}


def turn_task(question: str) -> str | None:
    """The task a synth question belongs to (a follow-up's may differ from its sample's)."""
    return _TURN_TASK.get(question)


def lookup_kind(mode: str, head: int) -> str:
    """LookupProbe.loss's form for a lookup of ``mode`` on ``head``: "count" mode supervises the
    mass of head 0 and the even spread of the counting heads."""
    if mode == "count":
        return "mass" if head == LOOKUP_HEADS[0] else "sink"
    return mode


def lookup_targets(task: str, named: str | None, objects, mode: str = "sink") -> list[tuple[int, list[int]]]:
    """(head, sequence positions) the lookup heads should attend to from the position that
    predicts the answer to a question naming ``named``; ``task`` is the turn's own (``turn_task``).

    ``mode="sink"``: evenly, every token of that shape in a picture plus the picture's
    ``<|vision_start|>``. The start token is a sink whose share, 1/(n+1), tells the head's output
    how many objects matched (a count the decoder can read off one attention row; without it the
    mass sums to 1 whatever n is). ``compare`` gives each picture its own head, so both counts
    reach the answer side by side.

    ``mode="mass"``: head 0 only, the named objects of every picture, no sink (LookupProbe then
    supervises the attention mass on them, not its spread), and none into clips.

    ``mode="answer"`` (meant for ``--more-facts``): the mass on every token that holds what the
    answer needs: head 0, or one head a picture for ``compare``; a clip's named object in every
    temporal patch; for ``ocr`` the text's cells.

    ``mode="count"`` (``Settings``' default): head 0 as in "mass", clips included (the mover in
    both temporal patches); a count turn adds head COUNT_HEADS[0] with "sink" targets (the named
    objects, and the picture's ``<|vision_start|>`` listed COUNT_SINK times: its share k/(n+k)
    carries n), and ``compare`` one such head a picture. With "mass" alone head 0's output is the
    mean of the named tokens, the same for one circle as for five, so it cannot carry a count."""
    if mode == "answer" and task == "ocr":
        named = TEXT
    if named is None:
        return []
    # objects run picture by picture, so ``where`` is ``groups`` end to end
    where = [pos for pos, shape, _ in objects if shape == named]
    sinks = sorted({sink for _, _, sink in objects})
    groups = [[pos for pos, shape, sk in objects if shape == named and sk == sink] for sink in sinks]
    if mode == "count":
        if not where:
            return []
        out = [(LOOKUP_HEADS[0], where)]
        if task == "count" and len(sinks) == 1:
            out.append((COUNT_HEADS[0], where + sinks * COUNT_SINK))
        elif task == "compare" and len(sinks) == 2:
            out += [(head, group + [sink] * COUNT_SINK) for head, group, sink in zip(COUNT_HEADS, groups, sinks)
                    if group]
        return out
    if mode == "mass":
        if task in synth.VIDEO_TASKS:
            return []
        return [(LOOKUP_HEADS[0], where)] if where else []
    with_sink = mode == "sink"
    if task == "compare" and len(sinks) == 2:
        return [(LOOKUP_HEADS[k], group + [sink] * with_sink)
                for k, (group, sink) in enumerate(zip(groups, sinks)) if group]
    if not with_sink:
        return [(LOOKUP_HEADS[0], where)] if where else []
    return [(LOOKUP_HEADS[0], where + sinks)] if where and len(sinks) == 1 else []



def example_aux(e: Example, clips: bool = False, more: bool = False
                ) -> list[tuple[list[int], torch.Tensor | None]]:
    """(pooled targets, dense targets) of each of the example's images (or its clip), cached (one
    run uses one setting); ``clips``, ``more``: as token_targets takes them."""
    if e.aux is None:
        grids = e.grids or e.video_grids
        e.aux = [(aux_targets(f), token_targets(f, tuple(g), clips=clips, more=more))
                 for f, g in zip(e.facts or [], grids, strict=True)]
    return e.aux


def aux_rows(examples: list[Example], clips: bool = False, more: bool = False
             ) -> list[tuple[list[int], torch.Tensor | None]]:
    """example_aux's rows in the order visual_features returns merged tokens: images, then clips."""
    return ([row for e in examples if e.pixel_values is not None for row in example_aux(e, clips, more)]
            + [row for e in examples if e.video_values is not None for row in example_aux(e, clips, more)])
