"""The a8 kernel benchmark runs end to end on the tiny checkpoint and reports both kernels."""

import json

from qvl.bench import a8


def test_a8_bench_reports_both_kernels(tmp_path):
    args = ["--config", "tiny", "--group", "64", "--schemes", "int4", "--batch", "1,2", "--steps", "4",
            "--rounds", "1", "--prefill", "8,16", "--new-tokens", "3", "--quality", "config", "--out", str(tmp_path)]
    assert a8.main(args) == 0
    r = json.loads((tmp_path / "a8-tiny.json").read_text())
    speed = r["speed"]["int4"]
    assert set(speed["decode"]) == {"1", "2"} and set(speed["decode"]["2"]) == set(a8.KERNELS)
    assert set(speed["prefill"]["16"]) == {"qvl", "a8 kernel", "a8 dequant"}
    q = r["quality"]["tiny int4"]
    assert q["kl"] >= 0 and 0 <= q["top1"] <= 1 and q["answers"] == len(a8.TEXT_PROMPTS)
    md = (tmp_path / "a8-tiny.md").read_text()
    assert "| int4 | qvl-a8 | 2 |" in md and "| tiny int4 |" in md
