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
    assert s["tokens"] == 24 and s["ttft_seen"] == 6 and s["ttft_p50_s"] <= s["latency_p50_s"]
    assert "Every request got its full answer: yes." in (tmp_path / "serve-tiny.md").read_text()


def test_full_vocab_view_gives_every_id_text(tiny_ckpt, tmp_path, monkeypatch):
    import shutil

    from qvl.bench import fixtures
    from qvl.runtime.tokenizer import Tokenizer

    src = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, src)
    cfg = json.loads((src / "config.json").read_text())
    key = "vocab_size" if "vocab_size" in cfg else None
    cfg[key or "text_config"] = 600 if key else {**cfg["text_config"], "vocab_size": 600}
    (src / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("QVL_BENCH_CACHE", str(tmp_path / "cache"))
    view = fixtures.full_vocab_view(src)
    assert fixtures.full_vocab_view(src) == view  # cached
    old, new = Tokenizer.from_dir(src), Tokenizer.from_dir(view)
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this picture, mount me.<|im_end|>"
    assert new.encode(text) == old.encode(text)
    tok = json.loads((src / "tokenizer.json").read_text())
    taken = set(tok["model"]["vocab"].values()) | {a["id"] for a in tok["added_tokens"]}
    assert all(old.decode([i]) == "" and new.decode([i]).strip() for i in range(600) if i not in taken)
    assert len(taken) < 600
