"""Hostile input at the engine's door: each case a clear error, raised before it costs anything.

Sampling parameters, message structure, item settings and picture sizes are refused with a
ValueError (or its PromptTooLongError) that names what is wrong; pictures too large to decode or
to fit the KV cache are refused from their headers, before a pixel is decoded.
"""

import io
import logging
import math

import numpy as np
import pytest
from PIL import Image, ImageFile

import qvl
from qvl.runtime.inputs import InputLimits, fetch_image
from qvl.runtime.video import fetch_video


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    return qvl.load(tiny_ckpt, max_seq_len=512, max_batch=2)


def _png(path, w, h, colour=(200, 30, 30)):
    Image.new("RGB", (w, h), colour).save(path)
    return str(path)


def _ask(image=None, text="What is it?", **item):
    content = [] if image is None else [{"type": "image", "image": image, **item}]
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]


@pytest.fixture
def no_decoding(monkeypatch):
    """Fails the test if any image file is decoded."""
    calls = []
    real = ImageFile.ImageFile.load

    def load(self):
        calls.append(self.size)
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


@pytest.mark.parametrize("kw,match", [
    ({"temperature": math.nan}, "temperature must be finite"),
    ({"temperature": math.inf}, "temperature must be finite"),
    ({"top_p": math.nan}, "top_p must be finite"),
    ({"repetition_penalty": math.nan}, "repetition_penalty must be finite"),
    ({"repetition_penalty": -math.inf}, "repetition_penalty must be finite"),
    ({"temperature": "0.7"}, "temperature must be a number"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
    ({"max_new_tokens": True}, "max_new_tokens must be an integer"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"stop": 7}, "stop must be a string or a list of strings"),
    ({"stop": ["ok", None]}, "stop must be a string or a list of strings"),
])
def test_bad_sampling_parameters_are_clear_errors(engine, kw, match):
    with pytest.raises(ValueError, match=match):
        engine.generate(_ask(), **kw)


@pytest.mark.parametrize("item,match", [
    ({"resized_height": "56", "resized_width": 56}, "resized_height must be a positive integer, got '56'"),
    ({"min_pixels": -1}, "min_pixels must be > 0"),
    ({"max_pixels": 2.5e5}, "max_pixels must be a positive integer"),
    ({"max_pixels": math.nan}, "max_pixels must be a positive integer"),
])
def test_bad_item_settings_are_clear_errors(engine, tmp_path, item, match):
    with pytest.raises(ValueError, match=match):
        engine.generate(_ask(_png(tmp_path / "a.png", 56, 56), **item))


def test_only_system_user_assistant_roles(engine):
    with pytest.raises(ValueError, match=r"messages\[0\]: role 'tool' is not one of system, user, assistant"):
        engine.generate([{"role": "tool", "content": "hi"}])


def test_an_unknown_item_key_is_a_warning_naming_it(engine, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="qvl.runtime.inputs"):
        engine.generate(_ask(_png(tmp_path / "a.png", 56, 56), max_pixel=1000), max_new_tokens=2)
    assert "'max_pixel' ignored: not a image setting" in caplog.text
    assert "max_pixels" in caplog.text  # the known names, so the typo is easy to see


def test_an_error_in_a_batch_names_its_conversation(engine):
    good, bad = _ask(), [{"role": "user", "content": [{"type": "image"}]}]
    with pytest.raises(ValueError, match=r"^conversation 1: messages\[0\]\['content'\]\[0\]"):
        engine.generate([good, bad])
    with pytest.raises(ValueError, match="^conversation 2: messages\\[0\\]: role 'robot'"):
        engine.generate_ids([good, good, [{"role": "robot", "content": "hi"}]])


def test_min_pixels_cannot_blow_a_tiny_image_up(engine, tmp_path):
    path = _png(tmp_path / "dot.png", 1, 1)
    with pytest.raises(ValueError, match="over the limit of .* \\(max_image_pixels at load\\)"):
        engine.generate(_ask(path, min_pixels=100_000_000, max_pixels=200_000_000))
    with pytest.raises(ValueError, match="must be >= min_pixels"):
        engine.generate(_ask(path, min_pixels=100_000_000))
    with pytest.raises(qvl.PromptTooLongError, match="more than the KV cache holds"):  # shrunk to 16384 tokens
        engine.generate(_ask(path, resized_height=28 * 2000, resized_width=28 * 2000))


def test_a_huge_file_is_refused_from_its_header(engine, tmp_path, no_decoding):
    path = tmp_path / "big.png"
    Image.new("1", (12000, 9000)).save(path)  # a few KB on disk, 108 Mpx decoded
    assert path.stat().st_size < 100_000
    with pytest.raises(ValueError, match="12000x9000 = 108000000 pixels, over the limit"):
        engine.generate(_ask(str(path)))
    assert no_decoding == []


def test_many_images_are_measured_against_the_cache_before_decoding(engine, tmp_path, no_decoding):
    path = _png(tmp_path / "a.png", 112, 112)  # 16 tokens each: 40 of them do not fit 512
    content = [{"type": "image", "image": path} for _ in range(40)] + [{"type": "text", "text": "Count."}]
    with pytest.raises(qvl.PromptTooLongError, match="40 images take .* tokens, more than the KV cache holds"):
        engine.generate([{"role": "user", "content": content}])
    assert no_decoding == []


def test_a_vision_token_budget_per_request(tiny_ckpt, tmp_path):
    eng = qvl.load(tiny_ckpt, max_seq_len=512, max_vision_tokens=20)
    path = _png(tmp_path / "a.png", 112, 112)
    eng.generate(_ask(path), max_new_tokens=1)  # 16 tokens
    with pytest.raises(ValueError, match="take 32 vision tokens, over the limit of 20"):
        eng.generate([{"role": "user", "content": [{"type": "image", "image": path}] * 2 + [{"type": "text",
                                                                                            "text": "?"}]}])
    with pytest.raises(ValueError, match="max_decode_pixels must be a positive integer"):
        InputLimits(max_decode_pixels=0)


def test_limits_are_set_at_load(tiny_ckpt, tmp_path):
    eng = qvl.load(tiny_ckpt, max_seq_len=512, max_decode_pixels=100 * 100)
    with pytest.raises(ValueError, match="over the limit of 10000 a file may decode to"):
        eng.generate(_ask(_png(tmp_path / "a.png", 112, 112)))
    with pytest.raises(ValueError, match="max_image_pixels"):
        fetch_image({"image": _png(tmp_path / "b.png", 56, 56), "min_pixels": 10**6},
                    limits=InputLimits(max_image_pixels=10**5))


def test_video_arrays_must_have_a_frame_axis(engine):
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\].*looks like one \[H, W, C\] image"):
        fetch_video({"video": np.zeros((56, 56, 3), np.uint8)})
    with pytest.raises(ValueError, match=r"video arrays must be uint8 \[T, H, W, 3\]"):
        fetch_video({"video": np.zeros((4, 56, 56), np.uint8)})


@pytest.mark.parametrize("fps", [0, -1, math.nan])
def test_fps_must_be_positive(fps):
    frames = np.zeros((4, 56, 56, 3), np.uint8)
    with pytest.raises(ValueError, match="fps must be"):
        fetch_video({"video": frames, "fps": fps})


def test_a_still_image_given_as_a_video_says_so(engine, tmp_path):
    path = _png(tmp_path / "still.png", 56, 56)
    with pytest.raises(ValueError, match="is a still image, not a video: send it as an image item"):
        engine.generate([{"role": "user", "content": [{"type": "video", "video": path}, {"type": "text", "text": "?"}]}])
    with pytest.raises(ValueError, match="holds one PIL image"):
        fetch_video({"video": Image.new("RGB", (56, 56))})


def test_bad_bytes_are_a_clear_error(engine):
    data = io.BytesIO()
    Image.new("RGB", (56, 56)).save(data, format="PNG")
    import base64

    uri = "data:image/png;base64," + base64.b64encode(data.getvalue()[:40]).decode()
    with pytest.raises(ValueError, match="cannot decode image data:image/png"):
        engine.generate(_ask(uri))
