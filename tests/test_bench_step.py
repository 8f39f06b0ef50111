"""The decode-step benchmark runs on the tiny checkpoint and its parts add up to the step."""

import json

import pytest

from qvl.bench import step


def test_step_bench_splits_the_step(tmp_path):
    assert step.main(["--models", "tiny", "--batches", "1,2", "--steps", "3", "--context", "8",
                      "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "step.json").read_text())["variants"]["tree"]
    assert set(r["batches"]) == {"1", "2"} and r["linears_per_step"] == 2 * 7 + 1
    for s in r["batches"].values():
        assert s["steps"] == 3 and min(s["step_ms"], s["linears_ms"], s["head_ms"], s["noop_step_ms"]) > 0
        assert s["matmul_ms"] + s["overhead_ms"] == pytest.approx(s["step_ms"])
        parts = sum(v for v in s["parts_ms"].values())
        assert s["matmul_ms"] + parts == pytest.approx(s["timed_step_ms"])
        assert min(v for k, v in s["parts_ms"].items() if k != "other") >= 0
    assert "| tree | 2 |" in (tmp_path / "step.md").read_text()
