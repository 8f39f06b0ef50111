"""Smoke test of the core benchmark: the whole pipeline on the tiny config, both engines."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")


def test_bench_core_tiny(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, QVL_BENCH_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "qvl.bench.core", "--config", "tiny", "--new-tokens", "4", "--repeats", "1", "--rounds", "1",
         "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    result = json.loads((out / "core-tiny-bfloat16.json").read_text())
    assert set(result["engines"]) == {"qvl", "transformers"}
    for name, r in result["engines"].items():
        assert "error" not in r, (name, r.get("error"), r.get("log_tail"))
        for key in ("load_s", "first_token_s", "decode_tok_s", "peak_rss_gb", "achieved_gb_s"):
            assert r[key] > 0, (name, key, r[key])
        assert r["new_tokens"] == 4
    # same inputs for both engines
    assert result["engines"]["qvl"]["prompt_tokens"] == result["engines"]["transformers"]["prompt_tokens"]
    assert result["bandwidth"]["bandwidth_gb_s"] > 0
    assert result["roofline"]["decode_tok_s_upper_bound"] > 0
    assert {"cpu_model", "cores", "torch", "transformers", "date"} <= set(result["machine"])

    md = (out / "core-tiny-bfloat16.md").read_text()
    assert "| qvl |" in md and "| transformers (" in md and "qvl/transformers" in md and "Roofline" in md
    # the checkpoint was built atomically into the cache, nothing partial left behind
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["qwen2vl-tiny-random"]


def test_merge_rounds_takes_best_timings_and_largest_rss():
    from qvl.bench.core import merge_rounds

    def rnd(ft, dec, load, rss, runs):
        return {"kind": "qvl", "first_token_s": ft, "prefill_s": ft, "vision_s": 1.0, "preprocess_s": 0.0,
                "decode_s": 31 / dec, "decode_tok_s": dec, "load_s": load, "peak_rss_gb": rss,
                "vmhwm_gb": rss, "rss_after_load_gb": 0.3, "other_cpu_share": 0.1,
                "runs": [{"first_token_s": ft, "decode_tok_s": dec}] * runs}

    m = merge_rounds([rnd(5.0, 3.0, 2.0, 4.0, 2), {"kind": "qvl", "error": "child killed"},
                      rnd(6.0, 4.0, 1.0, 5.0, 2)])
    assert (m["first_token_s"], m["decode_tok_s"], m["load_s"], m["peak_rss_gb"]) == (5.0, 4.0, 1.0, 5.0)
    assert len(m["runs"]) == 4 and m["decode_tok_s_median"] == 3.5 and len(m["rounds"]) == 3
    assert "error" not in m
    failed = merge_rounds([{"kind": "qvl", "error": "a"}, {"kind": "qvl", "error": "b"}])
    assert failed["error"] == "a"
