"""Bad input to the command line ends in one line that names what is wrong, never a traceback:
a device this torch lacks, a checkpoint's broken JSON, a chat outgrowing the KV cache, and
``qvl eval``'s limits, broken models and multiple-choice records without options."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

import qvl
from qvl.bench import eval as ev
from qvl.export import tasks
from qvl.model.config import ConfigError
from qvl.runtime.loader import DeviceError, check_device

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")


def _qvl(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "qvl.cli", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=300)


def _one_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.fixture
def data(tmp_path):
    f = tmp_path / "set.jsonl"
    f.write_text(json.dumps({"question": "Say hi.", "answer": "hi"}) + "\n")
    return f


@pytest.fixture
def copy_of(tiny_ckpt, tmp_path):
    def copy(name):
        return shutil.copytree(tiny_ckpt, tmp_path / name)
    return copy


# --- devices ---------------------------------------------------------------------------------

@no_cuda
@pytest.mark.parametrize("cmd", ["run", "chat", "serve", "eval"])
def test_cuda_on_a_torch_without_it_is_one_line(cmd, tiny_ckpt, data, tmp_path):
    extra = {"run": ["hi"], "eval": ["--data", data, "--out", tmp_path / "out"]}.get(cmd, [])
    r = _qvl(cmd, tiny_ckpt, "--device", "cuda", *extra, stdin="hi\n")
    assert r.returncode == 2
    line = _one_line(r)
    assert line == (f"qvl: error: device 'cuda': this torch has no CUDA (torch {torch.__version__}); use device "
                    "'cpu', or a CUDA build of torch on a machine with an NVIDIA GPU")
    assert r.stdout == ""


def test_an_unknown_device_is_one_line(tiny_ckpt):
    r = _qvl("run", tiny_ckpt, "--device", "gpu", "hi")
    assert r.returncode == 2
    assert _one_line(r).startswith("qvl: error: device 'gpu' is not a torch device: Expected one of cpu, cuda")


@pytest.mark.parametrize("device, says", [
    ("meta", "holds no data"),
    ("xpu", "not available"),
    ("cuda:x", "is not a torch device"),
])
def test_check_device_names_the_device(device, says):
    with pytest.raises(DeviceError, match=f"device '{device}'.*{says}"):
        check_device(device)
    assert check_device("cpu") == torch.device("cpu")


@no_cuda
def test_load_model_checks_the_device_itself(tiny_ckpt):
    from qvl.runtime.loader import load_model

    with pytest.raises(DeviceError, match="this torch has no CUDA"):
        load_model(tiny_ckpt, device="cuda")


# --- checkpoint JSON -------------------------------------------------------------------------

@pytest.mark.parametrize("content, says", [
    (b"{not json", "is not valid JSON: Expecting property name"),
    (b"\xff\xfe\x00garbage", "is not valid JSON: 'utf-8' codec can't decode"),
    (b"[1, 2]", "is not a JSON object: it holds an array"),
    (b"", "is not valid JSON: Expecting value"),
])
def test_a_broken_config_json_is_named(copy_of, content, says):
    ckpt = copy_of("broken")
    (ckpt / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match="^" + re.escape(f"{ckpt / 'config.json'} {says}")):
        qvl.load(ckpt)


def test_a_broken_config_json_through_the_cli(copy_of):
    ckpt = copy_of("broken")
    (ckpt / "config.json").write_text("garbage")
    r = _qvl("run", ckpt, "hi")
    assert r.returncode == 2
    assert _one_line(r).startswith(f"qvl: error: {ckpt / 'config.json'} is not valid JSON: Expecting value")


# --- chat and the KV cache -------------------------------------------------------------------

def test_chat_drops_the_oldest_exchanges_when_the_cache_is_full(tiny_ckpt):
    # the tiny chat template's system prompt and one short turn take ~45 of the 64 positions:
    # the second turn does not fit with the first exchange before it
    script = "hello there\nhow are you\nwhat now\n/reset\nagain\n"
    r = _qvl("chat", tiny_ckpt, "--max-seq-len", 64, "--max-new-tokens", 8, stdin=script)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    notes = [ln for ln in r.stderr.splitlines() if "outgrew" in ln]
    assert notes and notes[0] == ("qvl chat: the conversation outgrew the KV cache (64 tokens, --max-seq-len): "
                                  "dropped the oldest 1 of 1 exchanges; /reset starts afresh")
    assert len(notes) == 2  # "how are you" and "what now"; "again" follows /reset
    assert r.stderr.count("prompt tokens") == 4  # every turn answered


def test_chat_reports_a_message_too_long_on_its_own_and_goes_on(tiny_ckpt):
    script = " ".join(["word"] * 80) + "\nhi\n"
    r = _qvl("chat", tiny_ckpt, "--max-seq-len", 64, "--max-new-tokens", 4, stdin=script)
    assert r.returncode == 0, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "does not fit the KV cache (max_seq_len=64)" in errors[0], r.stderr
    assert r.stderr.count("prompt tokens") == 1 and "outgrew" not in r.stderr


# --- qvl eval --------------------------------------------------------------------------------

@pytest.fixture
def broken_ckpt(copy_of):
    """A checkpoint that passes eval's up-front checks and fails as its weights load."""
    ckpt = copy_of("broken")
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 4)
    return ckpt


def test_eval_keeps_the_finished_models_when_a_later_one_fails(tiny_ckpt, broken_ckpt, data, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ev.EvalError, match="^broken failed: CheckpointError: .*; results of the 2 that finished: "):
        ev.evaluate([str(tiny_ckpt), str(broken_ckpt), f"{tiny_ckpt}@bfloat16"], data, out=out, max_new_tokens=2,
                    in_process=True, plot=False)
    res = json.loads((out / "results.json").read_text())
    assert [m["dtype"] for m in res["models"]] == ["float32", "bfloat16"]
    assert all(m["accuracy"] is not None for m in res["models"])
    assert [f["name"] for f in res["failed"]] == ["broken"]
    assert "broken failed: CheckpointError" in (out / "results.md").read_text()


def test_eval_stops_when_the_reference_fails(tiny_ckpt, broken_ckpt, data, tmp_path):
    with pytest.raises(ev.EvalError, match="the others did not run") as e:
        ev.evaluate([str(broken_ckpt), str(tiny_ckpt)], data, out=tmp_path, in_process=True, plot=False)
    assert e.value.summary["models"] == [] and len(e.value.summary["failed"]) == 1


def test_qvl_eval_reports_a_failed_model_and_exits_non_zero(tiny_ckpt, broken_ckpt, data, tmp_path):
    r = _qvl("eval", tiny_ckpt, broken_ckpt, "--data", data, "--out", tmp_path, "--max-new-tokens", 2, "--no-plot")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("qvl eval: broken failed: CheckpointError: ") and \
        last.endswith(f"results of the 1 that finished: {tmp_path / 'results.json'}"), r.stderr
    assert f"| {tiny_ckpt.name} |" in r.stdout  # the finished model's row
    assert len(json.loads((tmp_path / "results.json").read_text())["models"]) == 1


@pytest.mark.parametrize("limit", [0, -1])
def test_eval_refuses_a_limit_below_one_up_front(tiny_ckpt, data, tmp_path, limit):
    r = _qvl("eval", tiny_ckpt, "--data", data, "--limit", limit, "--out", tmp_path / "out")
    assert r.returncode == 2
    assert _one_line(r) == f"qvl: error: limit must be a positive number of records, got {limit}"
    assert not (tmp_path / "out").exists()  # no model ran


@pytest.mark.parametrize("options, got", [(None, "it has none"), ([], "got []"), ("A or B", 'got "A or B"')])
def test_an_mc_record_without_options_names_file_and_line(tmp_path, options, got):
    f = tmp_path / "mc.jsonl"
    rec = {"question": "Which?", "answer": "A", "metric": "mc", **({} if options is None else {"options": options})}
    f.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n\n" + json.dumps(rec) + "\n")
    with pytest.raises(ValueError) as e:
        tasks.load_records(f)
    assert str(e.value) == (f"{f}:3: metric 'mc' needs 'options', a non-empty list or {{letter: text}} object; "
                            f"{got}")


def test_qvl_eval_refuses_an_mc_record_without_options(tiny_ckpt, tmp_path):
    f = tmp_path / "mc.jsonl"
    f.write_text(json.dumps({"question": "Which?", "answer": "A", "metric": "mc"}) + "\n")
    r = _qvl("eval", tiny_ckpt, "--data", f, "--out", tmp_path / "out")
    assert r.returncode == 2
    assert _one_line(r).startswith(f"qvl: error: {f}:1: metric 'mc' needs 'options'")


def test_a_jsonl_line_that_is_not_an_object_is_named(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("42\n")
    with pytest.raises(ValueError, match="^" + re.escape(f"{f}:1: expected a JSON object, got 42") + "$"):
        tasks.load_records(f)
