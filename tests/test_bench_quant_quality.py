"""bench/quant_quality.py end to end on the tiny checkpoint: exports, eval, report."""

import json

from qvl.bench import quant_quality


def test_quant_quality_report(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("QVL_BENCH_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data.jsonl"
    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 20, 20)).save(img)
    data.write_text("\n".join(json.dumps({"id": str(i), "task": t, "image": "a.png", "question": "What colour?",
                                          "answers": ["red"]}) for i, t in enumerate(["colour", "shape"])) + "\n")
    assert quant_quality.main(["--model", str(tiny_ckpt), "--data", str(data), "--group-size", "32",
                               "--calib-samples", "4", "--out", str(tmp_path / "out"), "--in-process"]) == 0
    res = json.loads((tmp_path / "out" / "quant-quality.json").read_text())
    assert set(res["exports"]) == set(quant_quality.SCHEMES)
    names = [m["name"] for m in res["eval"]["models"]]
    assert names == ["float", *quant_quality.SCHEMES]
    md = (tmp_path / "out" / "quant-quality.md").read_text()
    assert "| gptq-int8 |" in md and "| rtn-awq |" in md
    # cached: a second run re-exports nothing
    before = {p: p.stat().st_mtime for p in (tmp_path / "cache").rglob("qvl-manifest.json")}
    quant_quality.main(["--model", str(tiny_ckpt), "--data", str(data), "--group-size", "32", "--calib-samples", "4",
                        "--out", str(tmp_path / "out"), "--in-process"])
    assert {p: p.stat().st_mtime for p in (tmp_path / "cache").rglob("qvl-manifest.json")} == before
