"""Property tests: whatever the picture or the message structure, preprocessing answers or
raises a documented error (ValueError, its PromptTooLongError), in bounded time and memory.

Each example has a deadline; the memory bound is the engine's limits (a file may decode to
``max_decode_pixels``, an image be resized to ``max_image_pixels``), checked as the growth of
this process's peak RSS over the whole run.
"""

import base64
import io
import resource

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import qvl
from qvl.runtime.inputs import InputLimits, fetch_image, load_image

LIMITS = InputLimits(max_image_pixels=1 << 20, max_decode_pixels=4 << 20)
SETTINGS = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture],
                    derandomize=True)
MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "I", "F", "CMYK", "YCbCr", "I;16"]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    eng = qvl.load(tiny_ckpt, max_seq_len=512, max_image_pixels=LIMITS.max_image_pixels,
                   max_decode_pixels=LIMITS.max_decode_pixels)
    start = _peak_mb()
    yield eng
    assert _peak_mb() - start < 400, "preprocessing grew the peak RSS past the bound its limits imply"


def _png_uri(img: Image.Image, fmt: str) -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


@SETTINGS
@given(data=st.binary(max_size=4096))
def test_any_bytes_decode_or_raise_value_error(data):
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    try:
        load_image(uri, max_pixels=LIMITS.max_decode_pixels)
    except ValueError:
        pass


@SETTINGS
@given(w=st.integers(1, 600), h=st.integers(1, 600), mode=st.sampled_from(MODES),
       fmt=st.sampled_from(["PNG", "TIFF", "BMP", "GIF", "JPEG", "WEBP"]),
       min_pixels=st.one_of(st.none(), st.integers(1, 1 << 22)), max_pixels=st.one_of(st.none(), st.integers(1, 1 << 22)))
def test_any_picture_resizes_to_the_grid_or_raises(w, h, mode, fmt, min_pixels, max_pixels):
    try:
        img = Image.new(mode, (w, h))
        uri = _png_uri(img, fmt)
    except (OSError, ValueError, KeyError):  # PIL cannot write this mode in this format: nothing to test
        return
    item = {"image": uri}
    if min_pixels is not None:
        item["min_pixels"] = min_pixels
    if max_pixels is not None:
        item["max_pixels"] = max_pixels
    try:
        out = fetch_image(item, limits=LIMITS)
    except ValueError:
        return
    assert out.mode == "RGB" and out.width % 28 == 0 and out.height % 28 == 0
    assert out.width * out.height <= LIMITS.max_image_pixels


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**9), st.floats(allow_nan=True),
                     st.text(max_size=12), st.sampled_from(["user", "assistant", "system", "image", "text", "video",
                                                            "image_url", "content", "role", "type"]))
_json = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.sampled_from(
                                                           ["role", "content", "type", "text", "image", "video",
                                                            "image_url", "url", "min_pixels", "max_pixels", "fps"]),
                                                           inner, max_size=4)), max_leaves=12)


@SETTINGS
@given(messages=_json)
def test_any_message_structure_answers_or_raises_value_error(engine, messages):
    try:
        engine._request(messages, False)
    except ValueError:
        pass


@SETTINGS
@given(text=st.text(max_size=200), role=st.sampled_from(["user", "system", "assistant"]))
def test_any_text_is_a_prompt(engine, text, role):
    msgs = [{"role": role, "content": text}] + ([{"role": "user", "content": "?"}] if role != "user" else [])
    try:
        req = engine._request(msgs, False)
    except qvl.PromptTooLongError:
        return
    assert req.ids and req.pixel_values is None
