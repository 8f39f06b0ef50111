"""The loops benchmark runs end to end on the tiny checkpoint: every row, the cache counts it reports."""

import json

from qvl.bench import loops


def test_loops_bench_reports_loop_and_chat(tmp_path):
    rc = loops.main(["--config", "tiny", "--scheme", "bf16", "--frames", "3", "--turns", "3", "--side", "56",
                     "--instruction-tokens", "80", "--max-seq-len", "1024", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "loops-tiny-bf16.json").read_text())
    runs = result["run"]["runs"]
    on, off, alone = (runs[k] for k in ("loop, caches on", "loop, caches off", "frame alone"))
    assert len(on) == len(off) == len(alone) == 3
    assert all(r["cached_tokens"] >= 80 for r in on)  # warm: the instructions cached from the first frame
    assert all(r["cached_tokens"] == 0 for r in off + alone)
    assert all(r["vision_s"] > 0 for r in on)  # every frame is new
    chat = runs["chat, caches on"]
    assert chat[0]["cached_tokens"] < chat[1]["cached_tokens"] < chat[2]["cached_tokens"]
    assert chat[1]["vision_s"] == 0  # the picture of turn 0 lies inside the cached prefix
    md = (tmp_path / "loops-tiny-bf16.md").read_text()
    assert "## Loop" in md and "## Chat" in md and "goal <= 1.10" in md
