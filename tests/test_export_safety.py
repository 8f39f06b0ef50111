"""``qvl export gptq|awq`` never deletes or writes into what qvl did not write, refuses settings
the formats cannot hold before any work, and gives every file of OUT one mode."""

import json
import os
import stat

import pytest

import qvl
from qvl.cli import main as cli_main
from qvl.export import quantize as xq
from qvl.export.layerwise import QuantSpec
from qvl.runtime.manifest import MANIFEST, read_manifest, umask_mode
from qvl.scripts.tiny import write_tiny_checkpoint

FAST = ["--rtn", "--group-size", "32", "--calib-samples", "2", "--quality-samples", "0"]
ODD_MODES = {"tokenizer.json": 0o600, "chat_template.json": 0o600, "generation_config.json": 0o755}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A checkpoint in models/ beside an unrelated file, some of its files with unusual modes."""
    models = tmp_path_factory.mktemp("safety") / "models"
    ckpt = write_tiny_checkpoint(models / "ckpt", weights="random")
    (models / "notes.txt").write_text("not qvl's")
    for name, mode in ODD_MODES.items():
        os.chmod(ckpt / name, mode)
    return ckpt


@pytest.fixture(scope="module")
def earlier(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "q"
    assert cli_main(["export", "gptq", str(src), str(out), *FAST]) == 0
    return out


def _tree(root):
    return {str(p.relative_to(root)): (p.stat().st_mode, p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def _export(src, out, *extra):
    return cli_main(["export", "gptq", str(src), str(out), *FAST, *extra])


def _refused(capsys, src, out, match, *extra):
    """The CLI exits 2 with one error line, and nothing in or beside SRC's folder changed."""
    root = src.parent.parent
    before = _tree(root)
    assert _export(src, out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qvl: error: ") and match in err and "\n" not in err, err
    assert _tree(root) == before


def test_out_containing_src_is_refused(src, capsys):
    _refused(capsys, src, src.parent, "contains the source checkpoint", "--overwrite")
    assert (src / "model.safetensors").is_file() and (src.parent / "notes.txt").read_text() == "not qvl's"


def test_out_inside_src_is_refused(src, capsys):
    _refused(capsys, src, src / "q", "lies inside the source checkpoint")
    _refused(capsys, src, src / "sub" / "q", "lies inside the source checkpoint", "--overwrite")


def test_out_is_src_is_refused(src, capsys, tmp_path):
    _refused(capsys, src, src, "is the source checkpoint", "--overwrite")
    alias = tmp_path / "alias"
    alias.symlink_to(src, target_is_directory=True)
    _refused(capsys, src, alias, "is the source checkpoint", "--overwrite")
    parent_alias = tmp_path / "parent-alias"
    parent_alias.symlink_to(src.parent, target_is_directory=True)
    _refused(capsys, src, parent_alias, "contains the source checkpoint", "--overwrite")


def test_overwrite_refuses_what_qvl_did_not_write(src, capsys, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "data.bin").write_bytes(b"\0" * 8)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    # a manifest without the quantization section: what `qvl export onnx --onnx-only` leaves in a checkpoint
    onnx_only = tmp_path / "onnx-only"
    onnx_only.mkdir()
    (onnx_only / MANIFEST).write_text(json.dumps({"qvl_version": qvl.__version__, "vision_onnx": {}}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / MANIFEST).write_text("{not json")
    before = _tree(tmp_path)
    for out, match in ((plain, "was not written by qvl export"), (a_file, "is not a directory"),
                       (onnx_only, "was not written by qvl export"), (broken, "was not written by qvl export")):
        assert _export(src, out, "--overwrite") == 2
        err = capsys.readouterr().err.strip()
        assert match in err and "will not delete it" in err and "\n" not in err, err
    assert _tree(tmp_path) == before


def test_overwrite_replaces_an_earlier_export(src, earlier):
    assert json.loads((earlier / "config.json").read_text())["quantization_config"]["group_size"] == 32
    assert cli_main(["export", "gptq", str(src), str(earlier), *FAST, "--group-size", "-1", "--overwrite"]) == 0
    assert json.loads((earlier / "config.json").read_text())["quantization_config"]["group_size"] == -1
    assert read_manifest(earlier)["quantization"]["settings"]["group_size"] == -1
    assert sorted(p.name for p in earlier.parent.iterdir()) == ["q"], "work directory or old copy left behind"
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
    assert len(qvl.load(earlier, max_seq_len=64).generate_ids(msgs, max_new_tokens=2, ignore_eos=True)) == 2


def test_failed_replacement_keeps_the_old_export(earlier, tmp_path):
    before = _tree(earlier)
    work = xq.WorkDir(xq._work_path(earlier), {})
    work.path.mkdir()
    try:
        with pytest.raises(FileNotFoundError):  # the staged artifact vanished before its rename
            xq._move_into_place(work.path / "artifact", earlier, work)
    finally:
        os.rename(work.path, tmp_path / "work")
    assert _tree(earlier) == before


@pytest.mark.parametrize("args,match", [
    (["--group-size", "0"], "group_size=0"),
    (["--group-size", "-2"], "group_size=-2"),
    (["--damp", "-1"], "damp_percent=-1.0"),
    (["--damp", "0"], "damp_percent=0.0"),
    (["--damp", "1"], "damp_percent=1.0"),
    (["--calib-samples", "0"], "calibration samples: 0"),
    (["--calib-samples", "-3"], "calibration samples: -3"),
    (["--max-tokens", "0"], "max_tokens=0"),
])
def test_bad_settings_are_refused_before_any_work(src, tmp_path, capsys, args, match):
    assert _export(src, tmp_path / "out", *args) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err, err
    assert list(tmp_path.iterdir()) == [], "OUT or its .out.partial work directory was written"


def test_bad_settings_in_the_library(src, tmp_path):
    with pytest.raises(SystemExit):  # argparse: --bits is 4 or 8
        _export(src, tmp_path / "out", "--bits", "3")
    for kw, match in ((dict(bits=3), "GPTQ bits=3"), (dict(group_size=0), "group_size=0"),
                      (dict(damp_percent=-1.0), "damp_percent=-1.0")):
        with pytest.raises(ValueError, match=match):
            QuantSpec("gptq", "gptq", **({"bits": 4, "group_size": 32} | kw))
    with pytest.raises(ValueError, match="AWQ gemm format holds 4-bit"):
        QuantSpec("awq", "awq", 8, 32, sym=False)
    spec = QuantSpec("rtn", "gptq", 4, -1)  # -1: whole rows
    for kw, match in ((dict(calib_samples=0), "calibration samples: 0"), (dict(max_tokens=-1), "max_tokens=-1"),
                      (dict(quality_samples=-1), "quality_samples=-1")):
        with pytest.raises(ValueError, match=match):
            xq.export_quantized(src, tmp_path / "out", spec, **kw)
    assert list(tmp_path.iterdir()) == []


def test_files_share_one_mode(src, earlier):
    assert {stat.S_IMODE((src / n).stat().st_mode) for n in ODD_MODES} == {0o600, 0o755}
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in earlier.iterdir()}
    assert {"tokenizer.json", "model.safetensors", "config.json", MANIFEST} <= modes.keys()
    assert set(modes.values()) == {umask_mode(0o666)}, modes
    assert stat.S_IMODE(earlier.stat().st_mode) == umask_mode(0o777)
