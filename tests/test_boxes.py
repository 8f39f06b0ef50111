"""qvl.runtime.boxes: grounding answers of Qwen2-VL (markers, 0..1000) and Qwen2.5-VL (JSON, pixels)."""

import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from qvl.runtime.boxes import Box, draw_boxes, model_image_size, parse_boxes
from qvl.runtime.inputs import InputLimits, finish_image
from qvl.runtime.processor import ImageProcessor, ImageProcessorConfig
from qvl.runtime.tokenizer import Tokenizer

TOY = Path(__file__).resolve().parents[1] / "scripts" / "qvl-toy"

REF = "<|object_ref_start|>{}<|object_ref_end|>"
BOX = "<|box_start|>{}<|box_end|>"

# Qwen2-VL report (arXiv 2409.12191), visual grounding example
PAPER = "<|object_ref_start|>the eyes on a giraffe<|object_ref_end|><|box_start|>(176,106),(232,160)<|box_end|>"
# ms-swift's Qwen2-VL grounding data format (a box answer without a ref; the ref is in the query)
SWIFT = "<|box_start|>(123,235),(324,546)<|box_end|>"
# Qwen2.5-VL cookbook spatial_understanding.ipynb, "detect certain object" (first three lines)
COOKBOOK_CAKES = """```json
[
    {"bbox_2d": [139, 768, 315, 954], "label": "small cake"},
    {"bbox_2d": [366, 679, 536, 849], "label": "small cake"},
    {"bbox_2d": [44, 575, 204, 753], "label": "small cake"}
]
```"""
# same cookbook, "help counting": prose after the fence
COOKBOOK_COUNT = """```json
[
    {"bbox_2d": [25, 6, 87, 124], "label": "ice cream"},
    {"bbox_2d": [169, 3, 288, 130], "label": "flip-flops"}
]
```

There are 2 items in the image."""


def _coords(boxes):
    return [(b.label, b.x1, b.y1, b.x2, b.y2) for b in boxes]


def test_paper_reference_string():
    assert _coords(parse_boxes(PAPER, (1000, 500))) == [("the eyes on a giraffe", 176, 53, 232, 80)]


def test_box_without_label_scales_to_the_image():
    assert _coords(parse_boxes(SWIFT, (2000, 1000))) == [(None, 246, 235, 648, 546)]


def test_one_label_followed_by_two_boxes():
    text = REF.format("cat") + BOX.format("(0,0),(100,100)") + " , " + BOX.format("(500,500),(600,700)")
    assert _coords(parse_boxes(text, (1000, 1000))) == [("cat", 0, 0, 100, 100), ("cat", 500, 500, 600, 700)]


def test_several_boxes_with_and_without_labels():
    text = ("A " + REF.format(" woman ") + BOX.format("(100,200),(300,400)") + " plays with "
            + BOX.format("(10,10),(20,20)") + " and a " + REF.format("dog") + "\n" + BOX.format("(1,2),(3,4)")
            + " then " + BOX.format("(5,6),(7,8)"))
    assert _coords(parse_boxes(text, (1000, 1000))) == [
        ("woman", 100, 200, 300, 400), (None, 10, 10, 20, 20), ("dog", 1, 2, 3, 4), (None, 5, 6, 7, 8)]


def test_marker_form_spaces_decimals_and_qwen2_5_pixels():
    # Qwen2.5-VL grounding data as posted in QwenLM/Qwen3-VL#762: spaces, absolute pixels
    text = REF.format("Popup close button") + BOX.format("(1769, 1013), (1778, 1027)")
    boxes = parse_boxes(text, (1000, 600), model_type="qwen2_5_vl", resized_size=(2000, 1200))
    assert _coords(boxes) == [("Popup close button", 884.5, 506.5, 889, 513.5)]
    assert _coords(parse_boxes(BOX.format(" ( 1.5 ,2 ) ( 3 , 4.25 ) "), (1000, 1000))) == [(None, 1.5, 2, 3, 4.25)]


def test_qwen2_5_cookbook_json_fenced():
    image = (1024, 1024)
    seen = model_image_size(image, ImageProcessor(ImageProcessorConfig(max_pixels=12845056)))
    assert seen == (1036, 1036)  # what image_grid_thw * 14 gives in the cookbook for its 1024 x 1024 cakes
    boxes = parse_boxes(COOKBOOK_CAKES, image, model_type="qwen2_5_vl", resized_size=seen)
    s = 1024 / 1036
    assert [b.label for b in boxes] == ["small cake"] * 3
    np.testing.assert_allclose([(b.x1, b.y1, b.x2, b.y2) for b in boxes],
                               np.array([[139, 768, 315, 954], [366, 679, 536, 849], [44, 575, 204, 753]]) * s)


def test_qwen2_5_json_unfenced_single_object_and_prose():
    one = '{"bbox_2d": [135, 114, 1016, 672], "label": "house"}'
    assert _coords(parse_boxes(one, (500, 500), model_type="qwen2_5_vl", resized_size=(1000, 1000))) == [
        ("house", 67.5, 57, 500, 336)]
    bare = '[{"bbox_2d": [10, 20, 30, 40]}]'
    assert _coords(parse_boxes(bare, (100, 100), model_type="qwen2_5_vl", resized_size=(100, 100))) == [
        (None, 10, 20, 30, 40)]
    boxes = parse_boxes(COOKBOOK_COUNT, (640, 465), model_type="qwen2_5_vl", resized_size=(644, 476))
    assert [b.label for b in boxes] == ["ice cream", "flip-flops"]


def test_json_truncated_tail_keeps_complete_objects():
    text = '```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6'
    assert _coords(parse_boxes(text, (10, 10), model_type="qwen2_5_vl", resized_size=(10, 10))) == [
        ("a", 1, 2, 3, 4)]


def test_point_2d_is_skipped():
    text = ('[{"point_2d": [346, 328], "label": "person"}, {"bbox_2d": [1, 2, 3, 4], "label": "cup"},'
            ' {"point_2d": [238, 158], "label": "person"}]')
    assert _coords(parse_boxes(text, (10, 10), model_type="qwen2_5_vl", resized_size=(10, 10))) == [
        ("cup", 1, 2, 3, 4)]


def test_json_read_in_qwen2_vl_frame_and_both_forms_in_text_order():
    text = '{"bbox_2d": [0, 0, 500, 500], "label": "a"} then ' + REF.format("b") + BOX.format("(500,500),(1000,1000)")
    assert _coords(parse_boxes(text, (200, 100))) == [("a", 0, 0, 100, 50), ("b", 100, 50, 200, 100)]


def test_clamping_and_swapped_corners():
    text = BOX.format("(-50,-1),(1200,2000)") + BOX.format("(900,800),(100,200)")
    assert _coords(parse_boxes(text, (100, 50))) == [(None, 0, 0, 100, 50), (None, 10, 10, 90, 40)]
    text = '{"bbox_2d": [-5, 300, 120, -7]}'
    assert _coords(parse_boxes(text, (100, 100), model_type="qwen2_5_vl", resized_size=(100, 100))) == [
        (None, 0, 0, 100, 100)]


def test_markers_stripped_by_decoding_give_no_boxes():
    tok = Tokenizer.from_dir(TOY)
    ids = tok.encode(REF.format("cat") + BOX.format("(1,2),(300,400)"))
    assert _coords(parse_boxes(tok.decode(ids, skip_special_tokens=False), (1000, 1000))) == [
        ("cat", 1, 2, 300, 400)]
    assert tok.decode(ids) == "cat(1,2),(300,400)"
    assert parse_boxes(tok.decode(ids), (1000, 1000)) == []


GOOD = BOX.format("(1,2),(3,4)")


@pytest.mark.parametrize("bad", [
    "<|box_start|>(1,2),(3,4)",                       # unclosed span
    "<|box_start|>(a,b),(c,d)<|box_end|>",            # not numbers
    "<|box_start|>(1,2),(3)<|box_end|>",              # three coordinates
    "<|box_start|>(1,2),(3,4),(5,6)<|box_end|>",      # three points
    "<|box_start|>(1,2)<|box_end|>",                  # a point
    "<|box_start|><|box_end|>",                       # empty
    "<|box_start|>(1,2)<|box_start|>(3,4)<|box_end|>",  # nested start
    "<|box_end|><|object_ref_end|>",                  # stray ends
    "<|box_start|>(1e5,2),(3,4)<|box_end|>",          # exponent
    "<|box_start|>(" + "1" * 500 + ",2),(3,4)<|box_end|>",  # over-long span
    '{"bbox_2d": [1, 2, 3]}',
    '{"bbox_2d": [1, 2, 3, 4, 5]}',
    '{"bbox_2d": ["1", "2", "3", "4"]}',
    '{"bbox_2d": [true, 2, 3, 4]}',
    '{"bbox_2d": [NaN, 2, 3, 4]}',
    '{"bbox_2d": [1e999, 2, 3, 4]}',
    '{"bbox_2d": [' + "9" * 400 + ', 2, 3, 4]}',
    '{"bbox_2d": [1, 2, 3, 4],}',                     # not JSON
    '{"bbox_2d": {"x": 1}}',
])
def test_malformed_pieces_are_skipped(bad):
    for text in (bad, bad + " " + GOOD, GOOD + " " + bad):
        boxes = parse_boxes(text, (1000, 1000), model_type="qwen2_5_vl", resized_size=(1000, 1000))
        assert _coords(boxes) == [(None, 1, 2, 3, 4)] * (text != bad)


def test_unclosed_or_interrupted_ref_gives_no_label():
    assert _coords(parse_boxes("<|object_ref_start|>cat " + GOOD, (1000, 1000))) == [(None, 1, 2, 3, 4)]
    text = "<|object_ref_start|>cat" + GOOD + "<|object_ref_end|>" + GOOD
    assert _coords(parse_boxes(text, (1000, 1000))) == [(None, 1, 2, 3, 4)] * 2
    long_ref = REF.format("x" * 1000) + GOOD
    assert _coords(parse_boxes(long_ref, (1000, 1000))) == [(None, 1, 2, 3, 4)]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="resized_size"):
        parse_boxes(COOKBOOK_CAKES, (100, 100), model_type="qwen2_5_vl")
    with pytest.raises(ValueError, match="model_type"):
        parse_boxes(PAPER, (100, 100), model_type="qwen3_vl")
    for size in [(0, 10), (10,), (10, -1), (float("nan"), 10), (True, 10), "10x10"]:
        with pytest.raises(ValueError, match="image_size"):
            parse_boxes(PAPER, size)
    with pytest.raises(ValueError, match="resized_size"):
        parse_boxes(PAPER, (10, 10), model_type="qwen2_5_vl", resized_size=(0, 5))
    with pytest.raises(TypeError):
        parse_boxes(b"bytes", (10, 10))


MB = 1 << 20
ADVERSARIAL = {
    "box starts": "<|box_start|>" * (MB // 13),
    "alternating marks": "<|box_start|><|object_ref_start|>" * (MB // 33),
    "refs and ends": "<|object_ref_start|>a<|object_ref_end|> " * (MB // 40),
    "open span of digits": "<|box_start|>(" + "1," * (MB // 2),
    "long span": "<|box_start|>" + " " * MB + "<|box_end|>",
    "long label": "<|object_ref_start|>" + "a" * MB + "<|object_ref_end|>" + GOOD,
    "parens": "(" * MB,
    "open braces": "{" * MB,
    "open object": '{"bbox_2d": [' + "1, " * (MB // 3),
    "keys in a string": '{"label": "' + '{"bbox_2d": [' * (MB // 13),
    "many small objects": '{"bbox_2d": [1, 2, 3, 4]}' * (MB // 25),
    "whitespace gap": REF.format("a") + " " * MB + GOOD,
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_megabyte_is_fast(name):
    text = ADVERSARIAL[name]
    t0 = time.perf_counter()
    boxes = parse_boxes(text, (640, 480))
    # linear parsing takes about a second at most here; a quadratic step would take hours
    assert time.perf_counter() - t0 < 10.0
    assert all(0 <= b.x1 <= b.x2 <= 640 and 0 <= b.y1 <= b.y2 <= 480 for b in boxes)


_PIECES = st.sampled_from([
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "(", ")", ",", " ", "\n",
    "1", "-7", "1000", "99999", "2.5", "{", "}", "[", "]", ":", '"bbox_2d"', '"point_2d"', '"label"', '"x"',
    "NaN", "1e400", "true", "```json", "```",
])
_INT = st.integers(-10**6, 10**6)
_WELL_FORMED = st.one_of(
    st.builds(lambda a, b, c, d: BOX.format(f"({a},{b}),({c},{d})"), _INT, _INT, _INT, _INT),
    st.builds(lambda a, b, c, d: f'{{"bbox_2d": [{a}, {b}, {c}, {d}], "label": "o"}}', _INT, _INT, _INT, _INT),
)
_TEXT = st.one_of(st.text(max_size=200),
                  st.lists(st.one_of(_PIECES, _WELL_FORMED, st.text(max_size=3)), max_size=60).map("".join))


@settings(max_examples=300, deadline=None)
@given(text=_TEXT, size=st.tuples(st.integers(1, 5000), st.integers(1, 5000)),
       seen=st.tuples(st.integers(1, 5000), st.integers(1, 5000)), qwen2_5=st.booleans())
def test_any_text_gives_boxes_inside_the_image(text, size, seen, qwen2_5):
    kw = {"model_type": "qwen2_5_vl", "resized_size": seen} if qwen2_5 else {}
    boxes = parse_boxes(text, size, **kw)
    w, h = size
    for b in boxes:
        assert isinstance(b, Box)
        assert 0 <= b.x1 <= b.x2 <= w and 0 <= b.y1 <= b.y2 <= h
        assert b.label is None or (isinstance(b.label, str) and b.label)


@pytest.mark.parametrize("size, item, cfg", [
    ((640, 480), {}, ImageProcessorConfig()),
    ((1024, 1024), {}, ImageProcessorConfig(max_pixels=12845056)),
    ((2000, 1500), {}, ImageProcessorConfig()),          # the processor shrinks what qwen-vl-utils sized
    ((500, 300), {"max_pixels": 128 * 28 * 28}, ImageProcessorConfig()),
    ((300, 200), {"resized_height": 280, "resized_width": 420}, ImageProcessorConfig()),
])
def test_model_image_size_is_the_grid_the_model_saw(size, item, cfg):
    processor = ImageProcessor(cfg)
    image = Image.new("RGB", size, (120, 30, 200))
    picture = finish_image({"image": image, **item}, image, cfg.patch_size, InputLimits())
    _, grid = processor([picture])
    _, gh, gw = grid[0].tolist()
    assert model_image_size(size, processor, {"image": "unused", **item}) == (gw * cfg.patch_size,
                                                                             gh * cfg.patch_size)


def test_draw_boxes_marks_edges_and_leaves_the_original():
    image = Image.new("RGB", (100, 80), (255, 255, 255))
    before = image.tobytes()
    out = draw_boxes(image, [Box("cup", 10, 30, 50, 60), Box(None, 0, 0, 100, 80)], width=1)
    assert image.tobytes() == before and out is not image and out.size == image.size
    white = (255, 255, 255)
    for xy in [(10, 30), (49, 30), (10, 59), (49, 59), (30, 30), (10, 45)]:  # edges of the first box
        assert out.getpixel(xy) != white, xy
    for xy in [(0, 0), (99, 79), (99, 40)]:  # the full-image box runs along the border
        assert out.getpixel(xy) != white, xy
    assert out.getpixel((30, 45)) == white  # outlines only
    assert out.getpixel((30, 20)) != white  # the label tab above the box


def test_draw_boxes_other_modes_default_width_and_unicode_labels():
    image = Image.new("L", (300, 200), 255)
    out = draw_boxes(image, [Box("猫 cat", 20, 20, 120, 120), Box("x" * 200, 150, 0, 300, 200)])
    assert out.mode == "RGB" and image.mode == "L" and out.getpixel((20, 70)) != (255, 255, 255)
    assert draw_boxes(image, []).tobytes() == image.convert("RGB").tobytes()
    with pytest.raises(ValueError, match="width"):
        draw_boxes(image, [], width=0)
