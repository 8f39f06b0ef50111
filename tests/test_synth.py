"""The synthetic task generator and the toy model's training inputs."""

import hashlib
import json

import numpy as np
import pytest
import torch

from qvl.export import synth


def _digest(sample: synth.Sample) -> str:
    h = hashlib.sha256(f"{sample.question}|{sample.answer}|{sample.extra}".encode())
    for im in sample.images + sample.frames:
        h.update(repr(im.size).encode() + im.tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("task", synth.TASKS)
def test_a_sample_depends_only_on_task_index_and_seed(task):
    a = [_digest(synth.make_sample(task, i, seed=3)) for i in range(4)]
    assert a == [_digest(synth.make_sample(task, i, seed=3)) for i in range(4)]
    assert len(set(a)) == 4
    assert a != [_digest(synth.make_sample(task, i, seed=4)) for i in range(4)]
    # a slice regenerates without the samples before it
    assert synth.generate(2, seed=3, tasks=(task,), start=2)[1].id == f"{task}-00003"
    assert _digest(synth.generate(2, seed=3, tasks=(task,), start=2)[1]) == a[3]


def test_answers_come_from_the_closed_vocabulary():
    numbers = {str(i) for i in range(synth.MAX_NUMBER + 1)}
    for s in synth.generate(20, seed=0):
        assert s.answer in synth.ANSWERS or (s.task == "ocr" and s.answer in numbers), s
        for _, answer in s.extra:
            assert answer in synth.ANSWERS
        if s.task in synth.VIDEO_TASKS:
            assert len(s.frames) == synth.VIDEO_FRAMES and not s.images
        else:
            assert s.images and not s.frames
            assert all(56 <= min(im.size) and max(im.size) <= 252 for im in s.images)


def test_video_frames_show_the_motion_the_answer_names():
    for i in range(12):
        s = synth.make_sample("direction", i, seed=0)
        w, h = s.frames[0].size
        assert w % 56 == 0 and h % 56 == 0 and all(f.size == (w, h) for f in s.frames)
        bg = np.asarray(s.frames[0])[0, 0].astype(int)
        centres = []
        for f in s.frames:
            ink = np.abs(np.asarray(f).astype(int) - bg).sum(-1) > 30
            ys, xs = np.nonzero(ink)
            centres.append((xs.mean(), ys.mean()))
        dx, dy = centres[-1][0] - centres[0][0], centres[-1][1] - centres[0][1]
        seen = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert seen == s.answer, (s.id, dx, dy)


def _kind(question: str) -> tuple:
    """(task, shape) a question asks about, from the question templates."""
    for task, forms in synth.QUESTIONS.items():
        for form in forms:
            for shape in (None, *synth.SHAPES):
                if question == form.format(shape=shape, shapes=synth.PLURAL.get(shape)):
                    return task, shape
    raise AssertionError(question)


def test_follow_up_questions_never_repeat_the_first():
    for s in synth.generate(10, seed=0, tasks=("shape", "colour", "count", "position")):
        kinds = [_kind(s.question)] + [_kind(q) for q, _ in s.extra]
        assert len(set(kinds)) == len(kinds), (s.question, s.extra)


def test_write_dataset_is_reproducible(tmp_path):
    a = synth.write_dataset(tmp_path / "a", n=1, seed=5)
    b = synth.write_dataset(tmp_path / "b", n=1, seed=5)
    assert a.read_bytes() == b.read_bytes()
    recs = [json.loads(line) for line in a.read_text().splitlines()]
    assert [r["task"] for r in recs] == list(synth.TASKS)
    for r in recs:
        paths = r.get("images") or r["messages"][0]["content"][0]["video"]
        for p in paths:
            assert (tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes()


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    from qvl.scripts import train_toy

    out = tmp_path_factory.mktemp("toy")
    train_toy.build_checkpoint_files(out)
    return out


def test_toy_tokenizer_makes_answers_short(toy_dir):
    from qvl.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(toy_dir)
    for a in synth.ANSWERS:
        assert len(tok.encode(a)) == len(a.split()), a  # one token a word


def test_training_examples_supervise_only_the_answers(toy_dir):
    from qvl.runtime.prompt import build_request
    from qvl.scripts.toy_targets import Encoder

    enc = Encoder(toy_dir)
    for s in synth.generate(1, seed=0):
        e = enc(s)
        labelled = [t for t in e.labels if t != -100]
        expected = []
        for _, answer in [(s.question, s.answer)] + s.extra:
            expected += enc.tok.encode(answer) + [enc.im_end]
        assert labelled == expected
        # labels sit on the ids they supervise; the first turn is exactly what inference builds
        assert all(lab in (-100, i) for lab, i in zip(e.labels, e.ids))
        single = enc(s, follow_ups=False)
        req = build_request(s.messages(), enc.tok, enc.proc, 2, video_processor=_video_processor(toy_dir))
        assert single.ids[: len(req.ids)] == req.ids
        if s.frames:  # our video patches match the runtime's video path
            rows = torch.cat([v.rows() for v in req.videos])
            torch.testing.assert_close(single.video_values, rows, rtol=0, atol=1e-5)
            assert list(single.video_grids) == [tuple(v.grid) for v in req.videos]
        else:
            torch.testing.assert_close(single.pixel_values, req.pixel_values, rtol=0, atol=0)


def _video_processor(path):
    from qvl.runtime.video_processor import VideoProcessor, VideoProcessorConfig

    return VideoProcessor(VideoProcessorConfig.from_dir(path))


def test_scenes_sit_on_the_token_grid_and_the_processor_keeps_their_size(toy_dir):
    from qvl.runtime.processor import ImageProcessor, ImageProcessorConfig

    proc = ImageProcessor(ImageProcessorConfig.from_dir(toy_dir))
    for s in synth.generate(8, seed=0, tasks=synth.IMAGE_TASKS):
        for im, fact in zip(s.images, s.facts):
            w, h = im.size
            assert w % synth.CELL == 0 and h % synth.CELL == 0
            assert proc.target_size(h, w) == (h, w)
            for _, _, cx, cy, r in fact.get("objects", []):  # each object wholly inside one cell
                assert int((cx - r) // synth.CELL) == int((cx + r) // synth.CELL)
                assert int((cy - r) // synth.CELL) == int((cy + r) // synth.CELL)


def _ink(img, rows: int, cols: int):
    """[rows, cols] which token cells hold anything but the background (the pixel just inside the
    top-left corner) and a scene's frame."""
    f = np.asarray(img).astype(int)
    ink = np.abs(f - f[synth.FRAME, synth.FRAME]).sum(-1) > 60
    ink[: synth.FRAME] = ink[-synth.FRAME:] = ink[:, : synth.FRAME] = ink[:, -synth.FRAME:] = False
    return ink.reshape(rows, synth.CELL, cols, synth.CELL).any((1, 3))


def test_scenes_have_a_frame_that_no_object_touches():
    """Every scene's outermost FRAME pixels are the frame's colour, whatever is drawn (objects keep
    2 px from their cell's border), so a corner cell shows its corner; texts and clips have none."""
    frame = np.array(synth.FRAME_RGB)
    for s in synth.generate(6, seed=7):
        for im in s.images + s.frames:
            f = np.asarray(im).astype(int)
            border = np.concatenate([f[: synth.FRAME].reshape(-1, 3), f[-synth.FRAME:].reshape(-1, 3),
                                     f[:, : synth.FRAME].reshape(-1, 3), f[:, -synth.FRAME:].reshape(-1, 3)])
            if s.task in ("ocr", "direction"):
                assert (np.abs(border - frame).sum(-1) > 60).all(), s.id
                continue
            assert (border == frame).all(), s.id  # objects, drawn after it, never cover it
            assert np.abs(f[synth.FRAME, synth.FRAME] - frame).sum() > 200, s.id  # background inside


def test_dense_targets_mark_the_cell_of_each_object():
    from qvl.scripts.toy_targets import DENSE_NAMES, token_targets

    c = {n: k for k, n in enumerate(DENSE_NAMES)}
    for s in synth.generate(6, seed=2, tasks=("count", "colour", "position")):
        (fact,) = s.facts
        w, h = fact["size"]
        cols, rows = w // synth.CELL, h // synth.CELL
        dense = token_targets(fact, (1, 2 * rows, 2 * cols), more=True).view(rows, cols, len(DENSE_NAMES))
        expected = torch.full((rows, cols, len(DENSE_NAMES)), -100, dtype=torch.long)
        expected[..., c["shape"]] = expected[..., c["colour"]] = 0
        for j in range(rows):
            for i in range(cols):
                expected[j, i, c["edge"]] = 3 * (0 if j == 0 else 2 if j == rows - 1 else 1) + (
                    0 if i == 0 else 2 if i == cols - 1 else 1)
        for shape, colour, cx, cy, r in fact["objects"]:
            i, j = int(cx // synth.CELL), int(cy // synth.CELL)
            corner = {(0, 0): "top left", (cols - 1, 0): "top right", (0, rows - 1): "bottom left",
                      (cols - 1, rows - 1): "bottom right"}.get((i, j))
            expected[j, i, c["shape"]] = 1 + synth.SHAPES.index(shape)
            expected[j, i, c["colour"]] = 1 + list(synth.COLOURS).index(colour)
            expected[j, i, c["corner"]] = 0 if corner is None else 1 + synth.CORNERS.index(corner)
            expected[j, i, c["count"]] = sum(o[0] == shape for o in fact["objects"])
        assert torch.equal(dense, expected), s.id
        # without ``more`` (the committed qvl-toy's recipe): the same first four columns, no others
        expected[..., c["edge"]:] = -100
        assert torch.equal(token_targets(fact, (1, 2 * rows, 2 * cols)).view(rows, cols, -1), expected), s.id
        assert int((dense[..., c["shape"]] > 0).sum()) == int(_ink(s.images[0], rows, cols).sum()), s.id
        if s.task == "count":  # the answer sits on every token of the shape asked about
            assert set(dense[dense[..., c["count"]] == int(s.answer)][:, c["shape"]].tolist()) >= {
                1 + next(k for k, sh in enumerate(synth.SHAPES) if synth.PLURAL[sh] in s.question
                         or sh in s.question)}, s.id


def test_text_targets_cover_the_cells_with_ink():
    from qvl.scripts.toy_targets import DENSE_NAMES, WORD_CLASSES, token_targets

    c = {n: k for k, n in enumerate(DENSE_NAMES)}
    seen = set()
    for s in synth.generate(12, seed=6, tasks=("ocr",)):
        (fact,) = s.facts
        w, h = fact["size"]
        cols, rows = w // synth.CELL, h // synth.CELL
        assert token_targets(fact, (1, 2 * rows, 2 * cols)) is None  # only with ``more``
        dense = token_targets(fact, (1, 2 * rows, 2 * cols), more=True).view(rows, cols, len(DENSE_NAMES))
        word = dense[..., c["word"]]
        # the cells of the text's box (its width + 4 px, from the first inked cell): every inked
        # cell, and at most one empty one after the last
        marked, ink = (word != -100).numpy(), _ink(s.images[0], rows, cols)
        (j,), cells = set(np.nonzero(marked)[0]), np.nonzero(marked[np.nonzero(marked)[0][0]])[0]
        assert (marked >= ink).all() and ink[j, cells[0]] and ink[j].sum() >= len(cells) - 1, s.id
        assert list(cells) == list(range(cells[0], cells[0] + len(cells))), s.id
        want = 0 if s.answer.isdigit() else WORD_CLASSES.index(s.answer)
        assert set(word[word != -100].tolist()) == {want}, s.id
        if s.answer.isdigit():
            units = dense[..., c["units"]]
            assert set(units[units != -100].tolist()) == {int(s.answer[-1])}, s.id
        assert (dense[..., c["shape"]] == 0).all() and (dense[..., c["colour"]] == -100).all()
        seen.add(s.answer.isdigit())
    assert seen == {True, False}


def test_position_questions_ask_about_an_object_in_that_corner_cell():
    from qvl.scripts.toy_targets import named_shape

    for s in synth.generate(20, seed=3, tasks=("position",)):
        (fact,) = s.facts
        w, h = fact["size"]
        shape, _, cx, cy, _ = fact["objects"][0]
        col = "left" if cx < synth.CELL else "right" if cx > w - synth.CELL else None
        row = "top" if cy < synth.CELL else "bottom" if cy > h - synth.CELL else None
        assert s.answer == f"{row} {col}" and named_shape(s.question) == shape, s.id


def test_clip_targets_follow_the_mover_in_every_temporal_patch():
    from qvl.scripts.toy_targets import DENSE_NAMES, token_targets

    c = {n: k for k, n in enumerate(DENSE_NAMES)}
    cols4 = [c["shape"], c["colour"], c["corner"], c["motion"]]
    seen_still = False
    for s in synth.generate(8, seed=4, tasks=("direction",)):
        (fact,) = s.facts
        w, h = fact["size"]
        cols, rows = w // synth.CELL, h // synth.CELL
        assert token_targets(fact, (2, 2 * rows, 2 * cols)) is None  # only when asked for
        dense = token_targets(fact, (2, 2 * rows, 2 * cols), clips=True).view(2, rows, cols, len(DENSE_NAMES))
        shape, colour, direction = fact["motion"]
        i, j = fact["mover"]
        # the cells holding ink in frame 0: the mover's, and the still object's if there is one
        ink = _ink(s.frames[0], rows, cols)
        assert ink[j, i]
        for t in range(2):
            assert dense[t, j, i, cols4].tolist() == [1 + synth.SHAPES.index(shape),
                                                      1 + list(synth.COLOURS).index(colour),
                                                      -100, 1 + synth.DIRECTIONS.index(direction)]
        assert int((dense[0, ..., c["shape"]] > 0).sum()) == int(ink.sum()) == 1 + ("still" in fact), s.id
        if "still" in fact:
            seen_still = True
            other, _, si, sj = fact["still"]
            assert ink[sj, si] and dense[1, sj, si, c["shape"]] == 1 + synth.SHAPES.index(other)
            assert dense[1, sj, si, c["motion"]] == 0
    assert seen_still


def test_lookup_targets_point_at_the_named_objects(toy_dir):
    """Lookup supervision: the position predicting each answer, the head, and the vision tokens of
    the objects its question names plus their picture's <|vision_start|> (a compare pair: one head
    a picture; a clip: the mover in each temporal patch)."""
    from qvl.scripts import toy_targets

    enc = toy_targets.Encoder(toy_dir, "sink")
    start = enc.tok.token_id("<|vision_start|>")
    assert toy_targets.named_shape("How many crosses are there?") == "cross"
    assert toy_targets.named_shape("What shape is this?") is None
    for task in ("colour", "count", "compare", "direction"):
        s = synth.make_sample(task, 3, seed=5)
        e = enc(s)
        named = toy_targets.named_shape(s.question)
        first = [lk for lk in e.lookups if lk[0] == e.lookups[0][0]]  # the first answer's lookups
        assert sorted(head for _, head, _ in first) == ([0, 1] if task == "compare" else [0]), s.id
        pad = enc.video_id if task == "direction" else enc.image_id
        pads = [i for i, t in enumerate(e.ids) if t == pad]
        objs = []
        for p, _, where in first:
            assert e.labels[p] == -100 and e.labels[p + 1] != -100  # p predicts the first answer token
            *mine, sink = where
            assert e.ids[sink] == start and set(mine) <= set(pads) and min(mine) > sink
            objs += mine
        if task == "direction":
            assert len(objs) == 2  # the mover, in both temporal patches
            continue
        drawn = [o for f in s.facts for o in f["objects"] if o[0] == named]
        assert len(objs) == len(drawn) > 0, s.id
        # the token of each named object is its cell's: row-major over each image's cell grid
        cols = s.facts[0]["size"][0] // synth.CELL
        for _, _, cx, cy, _ in [o for o in s.facts[0]["objects"] if o[0] == named]:
            assert pads[int(cy // synth.CELL) * cols + int(cx // synth.CELL)] in objs


def test_aux_targets_follow_what_was_drawn():
    from qvl.scripts.toy_targets import AUX_NAMES, WORD_CLASSES, aux_targets

    fact = {"size": (112, 112), "objects": [("circle", "red", 14, 14, 10), ("circle", "blue", 98, 98, 10),
                                            ("star", "green", 98, 14, 10)]}
    t = dict(zip(AUX_NAMES, aux_targets(fact)))
    assert t["count:circle"] == 2 and t["count:star"] == 1 and t["count:square"] == 0
    assert t["colour:circle"] == -100  # two circles: no single colour
    assert t["colour:star"] == 1 + list(synth.COLOURS).index("green")
    assert t["corner:star"] == 2 + synth.CORNERS.index("top right")
    assert t["shape"] == -100 and t["text"] == -100
    t = dict(zip(AUX_NAMES, aux_targets({"text": "7"})))
    assert (t["text"], t["tens"], t["units"]) == (0, 0, 7)
    t = dict(zip(AUX_NAMES, aux_targets({"text": "cat"})))
    assert t["text"] == WORD_CLASSES.index("cat") and t["units"] == -100


def test_mass_lookups_name_every_object_of_the_shape_on_one_head(toy_dir):
    """The default lookup form: head 0, the named shape's tokens in every picture, no sink, no
    lookups into clips or texts."""
    from qvl.scripts import toy_targets

    enc = toy_targets.Encoder(toy_dir, "mass")
    for task in ("colour", "count", "compare"):
        s = synth.make_sample(task, 3, seed=5)
        e = enc(s)
        (p, head, where), *_ = e.lookups
        named = toy_targets.named_shape(s.question)
        drawn = [o for f in s.facts for o in f["objects"] if o[0] == named]
        assert head == 0 and len(where) == len(drawn) and all(e.ids[q] == enc.image_id for q in where), s.id
        assert all(lk[0] != p for lk in e.lookups[1:])  # one lookup per answer
    assert enc(synth.make_sample("direction", 3, seed=5)).lookups == []
    assert enc(synth.make_sample("ocr", 3, seed=5)).lookups == []


def test_answer_lookups_name_every_token_the_answer_is_on(toy_dir):
    """``--lookup-mode answer``: no sink; head 0 on the named shape's tokens (a clip's mover in
    both temporal patches, a text's cells), one head a picture for compare."""
    from qvl.scripts import toy_targets

    enc = toy_targets.Encoder(toy_dir, "answer")
    for task in ("colour", "count", "compare", "direction", "ocr"):
        s = synth.make_sample(task, 3, seed=5)
        e = enc(s)
        p = e.lookups[0][0]
        first = sorted((head, where) for q, head, where in e.lookups if q == p)
        assert all(lk[0] > p for lk in e.lookups[len(first):])  # the follow-ups' come after
        pad = enc.video_id if task == "direction" else enc.image_id
        pads = [i for i, t in enumerate(e.ids) if t == pad]
        assert all(q in pads for _, where in first for q in where), s.id
        if task == "ocr":
            (head, where), = first
            assert head == 0 and len(where) == s.facts[0]["cells"][2]
            continue
        if task == "direction":
            (head, where), = first
            assert head == 0 and len(where) == 2  # the mover, in both temporal patches
            continue
        named = toy_targets.named_shape(s.question)
        per_picture = [sum(o[0] == named for o in f["objects"]) for f in s.facts]
        if task == "compare":
            assert [h for h, _ in first] == [0, 1], s.id
            # head k looks only inside picture k: every token of picture 0 comes before picture 1's
            assert [len(w) for _, w in first] == per_picture and max(first[0][1]) < min(first[1][1])
        else:
            (head, where), = first
            assert head == 0 and len(where) == sum(per_picture), s.id


def test_count_lookups_add_counting_heads_with_the_sink(toy_dir):
    """``--lookup-mode count``: head 0's mass on the named shape's tokens for every turn (clips
    too, the mover in both temporal patches); count turns add a counting head over the named tokens
    and the picture's <|vision_start|> (listed COUNT_SINK times), compare one counting head a picture. Each turn
    is classed by its own question, so a scene's follow-up count questions get the counting head."""
    from qvl.scripts import toy_targets

    enc = toy_targets.Encoder(toy_dir, "count")
    start, k = enc.tok.token_id("<|vision_start|>"), toy_targets.COUNT_SINK
    assert toy_targets.turn_task("Count the crosses.") == "count" and toy_targets.turn_task("hello") is None
    assert [toy_targets.lookup_kind("count", h) for h in (0, *toy_targets.COUNT_HEADS)] == ["mass", "sink", "sink"]
    assert toy_targets.lookup_kind("mass", 1) == "mass"
    counted = 0
    for task in ("colour", "count", "position", "compare", "direction"):
        for i in range(4):
            s = synth.make_sample(task, i, seed=5)
            e = enc(s)
            turns = [(s.question, s.answer)] + s.extra
            answer_at = [p for p, lab in enumerate(e.labels[:-1]) if lab == -100 and e.labels[p + 1] != -100]
            assert len(answer_at) == len(turns), s.id
            pads = [k for k, t in enumerate(e.ids) if t in (enc.image_id, enc.video_id)]
            for p, (question, answer) in zip(answer_at, turns):
                mine = sorted((head, where) for q, head, where in e.lookups if q == p)
                named = toy_targets.named_shape(question)
                if named is None:
                    assert mine == [], s.id
                    continue
                (h0, objs), *counting = mine
                assert h0 == 0 and set(objs) <= set(pads), s.id
                if task == "direction":
                    assert len(objs) == 2 and not counting, s.id
                    continue
                drawn = [o for f in s.facts for o in f["objects"] if o[0] == named]
                assert len(objs) == len(drawn), s.id
                kind = toy_targets.turn_task(question)
                if kind == "count":
                    ((head, where),) = counting
                    assert head == toy_targets.COUNT_HEADS[0], s.id
                    assert sorted(where[:-k]) == sorted(objs) and len(objs) == int(answer), s.id
                    assert [e.ids[q] for q in where[-k:]] == [start] * k, s.id
                    counted += 1
                elif kind == "compare":
                    assert [h for h, _ in counting] == list(toy_targets.COUNT_HEADS), s.id
                    (_, w1), (_, w2) = counting
                    (n1, s1), (n2, s2) = (len(w1) - k, set(w1[-k:])), (len(w2) - k, set(w2[-k:]))
                    assert len(s1) == len(s2) == 1 and {e.ids[q] for q in s1 | s2} == {start}, s.id
                    assert max(s1) < min(w1[:-k]) and max(w1[:-k]) < max(s2) < min(w2[:-k]), s.id
                    assert (n1 > n2) == (answer == "first"), s.id
                else:
                    assert not counting, s.id
    assert counted > 4  # count turns from count samples and from other scenes' follow-ups
