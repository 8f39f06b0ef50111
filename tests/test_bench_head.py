"""The head benchmark runs end to end on the tiny checkpoint and reports every head."""

import json

from qvl.bench import head


def test_head_bench_reports_each_head(tmp_path):
    assert head.main(["--models", "tiny", "--chats", "2", "--steps", "3", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "head.json").read_text())["models"]["tiny"]
    assert set(r["step_ms"]) == {"checkpoint", "int8", "int4"}
    for h in ("int8", "int4"):
        assert r["quality"][h]["kl"] >= 0 and 0 <= r["quality"][h]["top1"] <= 1
    assert r["head_mb"]["int8"] < r["head_mb"]["checkpoint"] and r["tokens"] > 0
    assert "| tiny | int8 |" in (tmp_path / "head.md").read_text()
