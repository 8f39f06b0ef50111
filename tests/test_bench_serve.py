"""bench/serve.py on a tiny checkpoint: the load test runs, stops by itself and reports every answer."""

import json

import pytest

pytest.importorskip("openai")
pytest.importorskip("fastapi")


def test_serve_bench_smoke(tiny_ckpt, tmp_path):
    from qvl.bench import serve

    rc = serve.main(["--ckpt", str(tiny_ckpt), "--config", "tiny", "--clients", "3", "--requests", "2",
                     "--new-tokens", "4", "--image", "--max-batch", "2", "--deadline", "60", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "serve-tiny.json").read_text())
    s = result["summary"]
    assert rc == 0 and s["all_answered"] and s["errors"] == 0 and s["full_answers"] == 6
    assert s["tokens"] == 24 and s["ttft_p50_s"] <= s["latency_p50_s"]
    assert "Every request got its full answer: yes." in (tmp_path / "serve-tiny.md").read_text()
