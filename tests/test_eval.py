"""``qvl eval``: metrics against hand-computed values, and the harness on tiny checkpoints."""

import json
import subprocess
import sys

import pytest

from qvl.bench import eval as ev
from qvl.export import tasks


def test_exact_match_normalizes_case_space_and_a_final_period():
    assert tasks.exact_match("  Red. ", ["red"]) == 1.0
    assert tasks.exact_match("top   left", ["Top Left"]) == 1.0
    assert tasks.exact_match("reddish", ["red"]) == 0.0
    assert tasks.exact_match("blue", ["red", "blue"]) == 1.0


def test_levenshtein():
    assert tasks.levenshtein("kitten", "sitting") == 3
    assert tasks.levenshtein("", "abc") == 3
    assert tasks.levenshtein("abc", "abc") == 0


@pytest.mark.parametrize("pred, answers, expected", [
    ("hello", ["hello"], 1.0),
    ("helo", ["hello"], 1 - 1 / 5),            # one deletion, longer string 5
    ("Hello  World", ["hello world"], 1.0),     # case and whitespace do not count
    ("abcxy", ["abcde"], 1 - 2 / 5),            # NL 0.4 < 0.5: kept
    ("abxy", ["abcd"], 0.0),                    # NL 0.5: at the threshold, scored 0
    ("xyz", ["abc"], 0.0),
    ("kitten", ["sitting", "kitchen"], 1 - 2 / 7),  # best answer: kitchen (2 edits, length 7)
    ("", [""], 1.0),
])
def test_anls_by_its_definition(pred, answers, expected):
    assert tasks.anls(pred, answers) == pytest.approx(expected)


def test_multiple_choice_reads_letters_and_option_texts():
    opts = {"A": "cat", "B": "dog", "C": "bird"}
    assert tasks.mc_letter("B") == "B"
    assert tasks.mc_letter("(C) bird") == "C"
    assert tasks.mc_letter("A. cat") == "A"
    assert tasks.mc_letter("dog", opts) == "B"
    assert tasks.mc_letter("I think so", opts) is None
    assert tasks.multiple_choice("B.", ["B"], opts) == 1.0
    assert tasks.multiple_choice("bird", ["C"], opts) == 1.0
    assert tasks.multiple_choice("C", ["bird"], ["cat", "dog", "bird"]) == 1.0  # answer given as text
    assert tasks.multiple_choice("A", ["B"], opts) == 0.0


def test_records_resolve_paths_and_build_mc_prompts(tmp_path):
    lines = [
        {"id": "1", "task": "t", "image": "a.png", "question": "Q?", "answers": ["x"]},
        {"id": "2", "task": "m", "images": ["a.png", "/abs/b.png"], "question": "Pick.", "answer": "B",
         "metric": "mc", "options": ["cat", "dog"]},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    recs = tasks.load_records(tmp_path / "d.jsonl")
    assert recs[0]["messages"][0]["content"][0]["image"] == str(tmp_path / "a.png")
    assert recs[1]["messages"][0]["content"][1]["image"] == "/abs/b.png"
    assert recs[1]["messages"][0]["content"][-1]["text"] == "Pick.\nA. cat\nB. dog\n" + tasks.MC_PROMPT
    assert recs[1]["answers"] == ["B"]
    assert len(tasks.load_records(tmp_path / "d.jsonl", limit=1)) == 1
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "answers": ["a"], "metric": "bleu"}))
    with pytest.raises(ValueError, match="unknown metric"):
        tasks.load_records(tmp_path / "bad.jsonl")


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory):
    from qvl.export import synth

    return synth.write_dataset(tmp_path_factory.mktemp("synth"), n=1, seed=1)


@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory):
    """Same tokenizer and shapes as ``tiny_ckpt``, other weights."""
    from qvl.scripts.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("other"), weights="transformers", seed=1)


def test_kl_and_top1_against_the_reference(tiny_ckpt, other_ckpt, synth_set, tmp_path):
    summary = ev.evaluate([str(tiny_ckpt), str(tiny_ckpt), str(other_ckpt)], synth_set, out=tmp_path,
                          max_new_tokens=4, in_process=True)
    ref, same, other = summary["models"]
    assert same["kl"] == pytest.approx(0.0, abs=1e-9) and same["top1"] == 1.0
    assert same["kl_tokens"] > 0
    assert other["kl"] > 1e-4 and other["kl_tokens"] == same["kl_tokens"]
    assert [r.get("prediction") for r in same["rows"]] == [r.get("prediction") for r in ref["rows"]]
    assert set(ref["tasks"]) == set(summary["tasks"])
    assert ref["weights_mb"] > 0 and ref["decode_tok_s"] > 0
    for name in ("results.json", "results.md", "accuracy_vs_size.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| task | n |" in (tmp_path / "results.md").read_text()


def test_qvl_eval_command(tiny_ckpt, synth_set, tmp_path):
    r = subprocess.run([sys.executable, "-m", "qvl.cli", "eval", str(tiny_ckpt), f"{tiny_ckpt}@bfloat16",
                        "--data", str(synth_set), "--limit", "2", "--out", str(tmp_path), "--max-new-tokens", "3",
                        "--no-plot", "--text-kl"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "top-1 vs ref" in r.stdout and "@bfloat16" in r.stdout and "KL text" in r.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["n"] == 2 and [m["dtype"] for m in res["models"]] == ["float32", "bfloat16"]
    assert all(m["peak_rss_mb"] > m["model_rss_mb"] > 0 for m in res["models"])
    assert res["models"][1]["kl"] is not None
    bf16 = res["models"][1]
    # bf16 against fp32 over every text token: a positive KL, on more tokens than the answers hold
    assert bf16["kl_text"] > 0 and 0.5 < bf16["top1_text"] <= 1 and bf16["kl_text_tokens"] > bf16["kl_tokens"]



def test_a_worker_reports_its_own_peak_memory_not_its_parents(tiny_ckpt, synth_set, tmp_path):
    """Linux hands a parent's ``ru_maxrss`` to a child spawned by vfork + exec; the worker's peak
    must be its own. This process first peaks 1.5 GB above what a tiny model's worker needs."""
    import resource

    big = bytearray(1536 * 2**20)
    big[::4096] = b"x" * len(range(0, len(big), 4096))  # touch every page
    del big
    parent_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = ev.evaluate([str(tiny_ckpt)], synth_set, out=tmp_path, limit=1, max_new_tokens=2, plot=False)
    worker = summary["models"][0]
    assert 0 < worker["model_rss_mb"] < worker["peak_rss_mb"] < parent_peak - 1000, (worker["peak_rss_mb"],
                                                                                       parent_peak)

def test_eval_refuses_a_missing_model(synth_set, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        ev.evaluate([str(tmp_path / "nope")], synth_set, out=tmp_path)


def test_engine_score_is_teacher_forced_greedy_and_matches_transformers(tiny_ckpt):
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    import qvl

    eng = qvl.load(tiny_ckpt)
    msgs = [{"role": "user", "content": "Count the objects: one, two"}]
    ids = eng.generate_ids(msgs, max_new_tokens=6, ignore_eos=True)
    lp = eng.score(msgs, ids)
    assert lp.shape == (6, eng.model.cfg.text.vocab_size)
    assert lp.argmax(-1).tolist() == ids
    torch.testing.assert_close(lp.logsumexp(-1), torch.zeros(6), atol=1e-5, rtol=0)
    prompt = eng.tokenizer.encode(eng.tokenizer.apply_chat_template(msgs))
    hf = Qwen2VLForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([prompt + ids[:-1]])).logits[0, len(prompt) - 1:]
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1), atol=1e-4, rtol=1e-4)
