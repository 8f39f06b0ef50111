"""The qvl command line, run as a user would (a subprocess), against the Python API's answers."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
from PIL import Image

import qvl


def _qvl(*args, stdin=None, env=None):
    return subprocess.run([sys.executable, "-m", "qvl.cli", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    p = tmp_path_factory.mktemp("cli") / "pic.png"
    Image.new("RGB", (100, 60), "red").save(p)
    return p


def test_run_prints_the_api_answer(tiny_ckpt, picture):
    r = _qvl("run", tiny_ckpt, "--image", picture, "--max-new-tokens", 12, "What is this?")
    assert r.returncode == 0, r.stderr
    eng = qvl.load(tiny_ckpt)
    expected = eng.generate([{"role": "user", "content": [{"type": "image", "image": str(picture)},
                                                            {"type": "text", "text": "What is this?"}]}],
                            max_new_tokens=12)
    assert r.stdout == expected + "\n"
    assert "tok/s" in r.stderr and "peak RSS" in r.stderr


def test_run_bad_image_is_a_clear_error(tiny_ckpt, tmp_path):
    r = _qvl("run", tiny_ckpt, "--image", tmp_path / "missing.png", "hi")
    assert r.returncode == 2
    assert "missing.png" in r.stderr and "Traceback" not in r.stderr


def test_chat_keeps_history_and_survives_errors(tiny_ckpt, picture, tmp_path):
    script = f"/image {tmp_path / 'nope.png'}\nfirst\n/image {picture}\nsecond\n"
    r = _qvl("chat", tiny_ckpt, "--max-new-tokens", 6, stdin=script)
    assert r.returncode == 0, r.stderr
    assert "nope.png" in r.stderr  # the bad image turn fails, the session goes on
    assert r.stderr.count("prompt tokens") == 1  # one successful turn: "second" with the picture


def test_demo_on_a_given_model(tiny_ckpt, tmp_path):
    r = _qvl("demo", "--model", tiny_ckpt, "--workdir", tmp_path, "--max-new-tokens", 4)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Q: ") == 5 and all((tmp_path / f"demo{k}.png").exists() for k in ("", 1, 2))


def test_demo_uses_the_default_model(tmp_path):
    import os
    import re

    from qvl.scripts.default_model import TOY_MODEL
    from qvl.export import synth

    env = {**os.environ, "QVL_CACHE": str(tmp_path)}
    r = _qvl("demo", "--max-new-tokens", 4, env=env)
    assert r.returncode == 0, r.stderr
    if (TOY_MODEL / "config.json").exists():
        assert f"model: {TOY_MODEL}" in r.stdout
        # the trained default sees: it answers all five questions about the demo's pictures as drawn
        # (a count, a colour, a corner, a shape, a text; fixed weights, fp32)
        pairs = re.findall(r"^A: '(.*)'  \(drawn: (.*)\)$", r.stdout, flags=re.M)
        assert len(pairs) == 5, r.stdout
        assert all(a == drawn and a in synth.ANSWERS for a, drawn in pairs), r.stdout
    else:
        assert (tmp_path / "tiny-default" / "config.json").exists()


def test_default_model_falls_back_to_a_tiny_random_one(tmp_path, monkeypatch):
    from qvl.scripts import default_model

    monkeypatch.setattr(default_model, "TOY_MODEL", tmp_path / "absent")
    monkeypatch.setenv("QVL_CACHE", str(tmp_path))
    assert default_model.default_model_dir() == tmp_path / "tiny-default"
    assert (tmp_path / "tiny-default" / "config.json").exists()


def test_run_boxes_draws_on_the_picture(tiny_ckpt, picture, tmp_path):
    out = tmp_path / "boxes.png"
    r = _qvl("run", tiny_ckpt, "--image", picture, "--max-new-tokens", 6, "--boxes", out, "Find the red thing.")
    assert r.returncode == 0, r.stderr
    assert "boxes drawn on" in r.stderr
    with Image.open(out) as im:
        assert im.size == (100, 60)
    r = _qvl("run", tiny_ckpt, "--boxes", out, "No picture.")
    assert r.returncode != 0 and "--boxes" in r.stderr and "Traceback" not in r.stderr


def test_answer_boxes_are_listed_and_drawn(picture, tmp_path, capsys):
    from qvl.cli import _draw_answer_boxes
    from qvl.runtime.boxes import parse_boxes
    from qvl.runtime.processor import ImageProcessor

    class Engine:
        processor = ImageProcessor()
        model = SimpleNamespace(cfg=SimpleNamespace(model_type="qwen2_vl"))

    text = "<|object_ref_start|>cup<|object_ref_end|><|box_start|>(100,200),(500,800)<|box_end|>"
    out = tmp_path / "drawn.png"
    _draw_answer_boxes(Engine(), str(picture), text, str(out))
    (box,) = parse_boxes(text, (100, 60))
    err = capsys.readouterr().err
    assert f"box cup: ({box.x1:.0f}, {box.y1:.0f}), ({box.x2:.0f}, {box.y2:.0f})" in err
    with Image.open(out) as im, Image.open(picture) as orig:
        assert im.getpixel((int(box.x1), int((box.y1 + box.y2) / 2))) != orig.convert("RGB").getpixel((0, 0))
        assert im.getpixel((99, 59)) == orig.convert("RGB").getpixel((99, 59))
