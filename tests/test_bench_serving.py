"""The serving benchmark runs end to end on the tiny checkpoint and reports every stream count."""

import json

from qvl.bench import serving


def test_serving_bench_reports_each_stream_count(tmp_path):
    rc = serving.main(["--config", "tiny", "--schemes", "bf16", "--streams", "1,3", "--max-batch", "2",
                       "--new-tokens", "4", "--repeats", "1", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "serving.json").read_text())
    rows = result["engines"]["bf16"]["rows"]
    assert [r["streams"] for r in rows] == [1, 3]
    for r in rows:
        for mode in ("concurrent", "sequential"):
            assert r[mode]["requests"] == r["streams"] and r[mode]["tokens"] == 4 * r["streams"]
            assert 0 < r[mode]["ttft_p50_s"] <= r[mode]["ttft_p99_s"]
        conc = r["concurrent"]
        # every token after a request's first comes from a decode step: rows x steps adds up to them
        assert sum(int(k) * v for k, v in conc["steps_by_rows"].items()) == 3 * r["streams"]
        assert conc["full_rows"] == min(r["streams"], 2) and conc["full_steps"] >= 1 and conc["full_tok_s"] > 0
    assert "| bf16 | 3 |" in (tmp_path / "serving.md").read_text()
