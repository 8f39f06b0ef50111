"""The committed default model, qvl-toy: it sees, and transformers agrees with qvl."""

import pytest

from qvl.runtime.cli import TOY_MODEL

pytestmark = pytest.mark.skipif(not (TOY_MODEL / "config.json").exists(), reason="qvl-toy is not in this copy")


def test_toy_answers_correctly_and_as_transformers_does():
    from qvl.scripts.train_toy import evaluate_checkpoint

    table = evaluate_checkpoint(TOY_MODEL, n=3, hf_n=3)
    for task, r in table.items():
        assert r["same_answer"] == 1.0, (task, r)
        assert r["qvl_fp32"] >= 2 / 3, (task, r)


def test_toy_fits_the_budget():
    size = sum(f.stat().st_size for f in TOY_MODEL.glob("*.safetensors"))
    assert size <= 25e6
    assert (TOY_MODEL / "README.md").exists()
