"""bench/quant.py's quantized-head schemes and its KL against the float model, on the tiny checkpoint."""

import json
import shutil

import pytest
import torch

from qvl.bench import fixtures, quant


@pytest.fixture(scope="module")
def int4_dir(tiny_ckpt, tmp_path_factory):
    src = shutil.copytree(tiny_ckpt, tmp_path_factory.mktemp("kl") / "base")
    (src / fixtures.BUILD_MARKER).write_text(json.dumps({"build_version": fixtures.BUILD_VERSION}))
    return src, quant.ensure_quantized(src, "gptq-int4", 32)


def test_head_schemes():
    for name in ("int4-q8head", "int8-q8head"):
        s = quant.SCHEMES[name]
        assert s.head == "int8" and s.dtype == "bfloat16"
        assert quant.SCHEMES[name.split("-")[0]] == s._replace(head="checkpoint")


def test_qvl_worker_loads_the_asked_head(int4_dir, tmp_path):
    _, q4 = int4_dir
    spec = {"ckpt": str(q4), "image": str(fixtures.make_image(tmp_path / "i.png", 112)), "dtype": "bfloat16",
            "new_tokens": 2, "repeats": 1, "threads": torch.get_num_threads()}
    plain, q8 = {}, {}
    quant.qvl_worker(spec, plain)
    quant.qvl_worker(dict(spec, head="int8"), q8)
    assert plain["head"] == "checkpoint" and q8["head"] == "int8" and q8["new_tokens"] == 2
    assert q8["lm_head_bytes"] < 0.6 * plain["lm_head_bytes"]  # int8 rows + scales vs bf16
    import qvl

    assert qvl.load.__module__ == "qvl"  # the head binding is undone


def test_kl_measure(int4_dir):
    src, q4 = int4_dir
    res = quant.kl_measure((str(src), "float32"), {"same": (str(src), "float32"),
                                                   "int4": (str(q4), "float32", "auto", "checkpoint"),
                                                   "int4-q8head": (str(q4), "float32", "auto", "int8")}, chats=2)
    assert res["same"]["kl"] == pytest.approx(0.0, abs=1e-6) and res["same"]["top1"] == 1.0
    assert res["int4"]["tokens"] == res["same"]["tokens"] > 10
    for name in ("int4", "int4-q8head"):
        assert 0 < res[name]["kl"] < 1 and 0 < res[name]["top1"] <= 1
