"""qvl.runtime.inputs: qwen-vl-utils 0.0.14 fetch_image semantics, sources and errors."""

import base64
import dataclasses
import io
import math
import os

import numpy as np
import pytest
from PIL import Image

from qvl.runtime.fetch import FetchPolicy
from qvl.runtime.inputs import extract_images, extract_vision, fetch_image, load_image, smart_resize_vl_utils


def _ref_smart_resize(h, w, factor=28, lo=4 * 28 * 28, hi=16384 * 28 * 28):
    """qwen-vl-utils' documented algorithm, restated: round to the factor (at least one factor),
    then shrink (floor) or grow (ceil) by the area ratio when outside [lo, hi]."""
    hb, wb = max(factor, factor * round(h / factor)), max(factor, factor * round(w / factor))
    if hb * wb > hi:
        s = math.sqrt(h * w / hi)
        return factor * math.floor(h / s / factor), factor * math.floor(w / s / factor)
    if hb * wb < lo:
        s = math.sqrt(lo / (h * w))
        return factor * math.ceil(h * s / factor), factor * math.ceil(w * s / factor)
    return hb, wb


def _rgb(w=90, h=60, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_bytes(arr, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def png(tmp_path):
    arr = _rgb()
    path = tmp_path / "img.png"
    path.write_bytes(_png_bytes(arr))
    return path, arr


def test_every_source_form_gives_same_image(png):
    path, arr = png
    uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    for src in (str(path), path, f"file://{path}", uri, Image.fromarray(arr), arr):
        np.testing.assert_array_equal(np.asarray(load_image(src).convert("RGB")), arr)


def test_load_leaves_no_open_file(png):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc")
    before = len(os.listdir("/proc/self/fd"))
    images = [load_image(png[0]) for _ in range(5)]
    assert len(os.listdir("/proc/self/fd")) == before and images[0].size == (90, 60)


@pytest.mark.parametrize(
    "h,w,kw,want",
    [
        (60, 90, {}, (56, 84)),
        (2000, 3000, {}, (1988, 2996)),  # well under the 16384-token default
        (1000, 10, {}, (1008, 28)),  # transformers' variant would upscale to 560x28
        (720, 1280, {"max_pixels": 50000}, (140, 280)),
        (20, 20, {"min_pixels": 100 * 28 * 28}, (280, 280)),
    ],
)
def test_fetch_sizes_documented_cases(tmp_path, h, w, kw, want):
    assert _ref_smart_resize(h, w, lo=kw.get("min_pixels", 3136), hi=kw.get("max_pixels", 12845056)) == want
    assert smart_resize_vl_utils(h, w, 28, kw.get("min_pixels"), kw.get("max_pixels")) == want
    img = Image.fromarray(_rgb(w, h))
    item = {"type": "image", "image": img, **kw}
    out = fetch_image(item)
    assert out.mode == "RGB" and out.size == (want[1], want[0])
    want_pixels = img.resize(out.size, Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want_pixels))


def test_smart_resize_matches_restatement_on_grid():
    for h in [1, 13, 28, 29, 100, 517, 2048, 9000]:
        for w in [2, 28, 50, 333, 1999, 7000]:
            if max(h, w) / min(h, w) > 200:
                continue
            for lo, hi in [(3136, 12845056), (784, 50176), (200704, 1003520)]:
                want = _ref_smart_resize(h, w, 28, lo, hi)
                if 0 in want:  # qwen-vl-utils would build an empty image; we refuse
                    with pytest.raises(ValueError, match="too small"):
                        smart_resize_vl_utils(h, w, 28, lo, hi)
                    continue
                assert smart_resize_vl_utils(h, w, 28, lo, hi) == want
    assert smart_resize_vl_utils(100, 100, 32) == _ref_smart_resize(100, 100, 32, 4 * 32**2, 16384 * 32**2)


def test_resized_height_width_override(png):
    item = {"image": str(png[0]), "resized_height": 100, "resized_width": 37, "max_pixels": 1}
    assert fetch_image(item).size == (28, 112)
    # only one of the pair: ignored, limits apply (qwen-vl-utils needs both)
    assert fetch_image({"image": str(png[0]), "resized_height": 500}).size == (84, 56)


def test_image_url_forms(png):
    path, _ = png
    a = fetch_image({"type": "image_url", "image_url": str(path)})
    b = fetch_image({"type": "image_url", "image_url": {"url": f"file://{path}"}})
    assert a.tobytes() == b.tobytes() and a.size == (84, 56)


def test_rgba_pasted_on_white_la_alpha_dropped():
    rgba = np.zeros((56, 56, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:28, :, 3] = 255  # top half opaque red, bottom fully transparent
    out = np.asarray(fetch_image({"image": Image.fromarray(rgba, "RGBA")}))
    assert (out[:28] == [200, 0, 0]).all() and (out[28:] == 255).all()
    la = Image.fromarray(rgba[..., [0, 3]], "LA")  # qwen-vl-utils only composites mode RGBA
    np.testing.assert_array_equal(np.asarray(fetch_image({"image": la})), np.asarray(la.convert("RGB")))


def test_matches_real_qwen_vl_utils(png, tmp_path):
    qvu = pytest.importorskip("qwen_vl_utils")
    path, _ = png
    uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    big = tmp_path / "big.png"
    big.write_bytes(_png_bytes(_rgb(1280, 720, 1)))
    for item in (
        {"image": str(path)}, {"image": f"file://{path}"}, {"image": uri},
        {"image": str(big), "max_pixels": 50000}, {"image": str(big), "min_pixels": 2000000},
        {"image": str(big), "resized_height": 300, "resized_width": 200},
    ):
        want, got = qvu.fetch_image(dict(item)), fetch_image(item)
        assert got.size == want.size and got.tobytes() == want.convert("RGB").tobytes(), item


@pytest.mark.parametrize("cut", ["jpeg", "png"])
def test_truncated_image_raises(tmp_path, cut):
    data = _png_bytes(_rgb(200, 200), "JPEG" if cut == "jpeg" else "PNG")
    path = tmp_path / f"t.{cut}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot decode image .*t\\." + cut):
        load_image(str(path))


def test_error_messages(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="not found: .*nope.png"):
        load_image(str(tmp_path / "nope.png"))
    (tmp_path / "notes.txt").write_text("hello, not an image")
    with pytest.raises(ValueError, match="cannot decode image .*notes.txt"):
        fetch_image({"image": str(tmp_path / "notes.txt")})
    with pytest.raises(ValueError, match="remote image fetching is disabled"):
        fetch_image({"image": "https://example.com/cat.jpg"})
    with pytest.raises(ValueError, match="unsupported image source type int"):
        load_image(42)
    with pytest.raises(ValueError, match="uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))
    long_uri = "data:image/png;base64," + "A" * 10_000
    with pytest.raises(ValueError) as e:
        load_image(long_uri)
    assert len(str(e.value)) < 300 and "chars)" in str(e.value)
    with pytest.raises(ValueError, match="only base64 data:image"):
        load_image("data:text/plain,hi")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    (tmp_path / "bomb.png").write_bytes(_png_bytes(_rgb(100, 100)))
    with pytest.raises(ValueError, match="refusing to decode .*bomb.png"):
        load_image(tmp_path / "bomb.png")


def test_aspect_ratio_and_limits_errors():
    with pytest.raises(ValueError, match="aspect ratio"):
        fetch_image({"image": np.zeros((1, 300, 3), np.uint8)})
    with pytest.raises(ValueError, match="max_pixels"):
        fetch_image({"image": np.zeros((50, 50, 3), np.uint8), "min_pixels": 10000, "max_pixels": 5000})


def test_extract_images_order_and_forms():
    a, b, c = {"type": "image", "image": "a.png"}, {"image_url": {"url": "b.png"}}, {"image": "c.png"}
    msgs = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [a, {"type": "text", "text": "and"}, b]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"text": "more"}, c]},
    ]
    got = extract_images(msgs)
    assert len(got) == 3 and all(x is y for x, y in zip(got, [a, b, c]))
    assert extract_images([{"role": "user", "content": "hi"}]) == []


@pytest.mark.parametrize(
    "msgs,match",
    [
        ({"role": "user"}, "must be a list"),
        ([{"content": "hi"}], "role"),
        ([{"role": "user", "content": 5}], "must be a str or list"),
        ([{"role": "user", "content": None}], "must be a str or list"),
        ([{"role": "user", "content": ["hi"]}], "must be dicts"),
        ([{"role": "user", "content": [{"foo": 1}]}], "no known type"),
        ([{"role": "user", "content": [{"type": "audio", "audio": "x"}]}], "no known type"),
        ([{"role": "user", "content": [{"type": "image"}]}], "no 'image' or 'image_url' key"),
        ([{"role": "user", "content": [{"type": "text"}]}], "string 'text'"),
        ([{"role": "user", "content": [{"type": "video"}]}], "no 'video' key"),
        ([[{"role": "user", "content": "hi"}]], "one conversation"),
    ],
)
def test_extract_images_bad_shapes(msgs, match):
    with pytest.raises(ValueError, match=match):
        extract_images(msgs)


def test_extract_vision_keeps_prompt_order():
    a, v, b = {"image": "a.png"}, {"type": "video", "video": "v.mp4"}, {"type": "text", "video": ["f.png"]}
    msgs = [{"role": "user", "content": [a, {"text": "then"}, v]}, {"role": "user", "content": [b]}]
    # like the chat template, a "video" key wins over type "text"
    assert extract_vision(msgs) == [("image", a), ("video", v), ("video", b)]
    assert extract_images(msgs) == [a]


def test_http_image(http_server, png):
    root, base = http_server
    path, arr = png
    (root / "cat.png").write_bytes(path.read_bytes())
    on = FetchPolicy(allow_remote=True, allow_private_addresses=True)  # the test server is on loopback
    np.testing.assert_array_equal(np.asarray(load_image(f"{base}/cat.png", on)), arr)
    assert fetch_image({"image": f"{base}/cat.png"}, policy=on).size == (84, 56)
    with pytest.raises(ValueError, match="disabled.*allow_remote=True.*QVL_ALLOW_REMOTE"):
        load_image(f"{base}/cat.png")
    with pytest.raises(ValueError, match="HTTP 404"):
        load_image(f"{base}/missing.png", on)
    with pytest.raises(ValueError, match="over the 100-byte limit"):
        load_image(f"{base}/cat.png", dataclasses.replace(on, max_image_bytes=100))
    with pytest.raises(ValueError, match="exceeds the 1048576-byte limit"):  # no Content-Length
        load_image(f"{base}/big", dataclasses.replace(on, max_image_bytes=1 << 20))
    with pytest.raises(ValueError, match="timed out"):
        load_image(f"{base}/slow", dataclasses.replace(on, timeout_s=0.3))
    with pytest.raises(ValueError, match="non-http"):
        load_image(f"{base}/redirect-ftp", on)
    (root / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="cannot decode image .*notes.txt"):
        load_image(f"{base}/notes.txt", on)


def test_fetch_policy_from_env(monkeypatch):
    monkeypatch.delenv("QVL_ALLOW_REMOTE", raising=False)
    assert not FetchPolicy.from_env().allow_remote
    monkeypatch.setenv("QVL_ALLOW_REMOTE", "1")
    assert FetchPolicy.from_env().allow_remote and not FetchPolicy.from_env(False).allow_remote
    monkeypatch.delenv("QVL_ALLOW_PRIVATE_ADDRESSES", raising=False)
    assert not FetchPolicy.from_env().allow_private_addresses
    monkeypatch.setenv("QVL_ALLOW_PRIVATE_ADDRESSES", "yes")
    assert FetchPolicy.from_env().allow_private_addresses
    assert not FetchPolicy.from_env(True, False).allow_private_addresses
