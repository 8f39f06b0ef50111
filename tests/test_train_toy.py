"""The training script end to end, a few steps, with every supervision on (lookups into the tokens
that hold each answer, all dense facts): the checkpoint it saves is plain Qwen2-VL (SDPA attention
in its config) and qvl loads it."""

import json
from pathlib import Path

import pytest
import torch

import qvl
from qvl.export import synth
from qvl.scripts import toy_card, toy_config, toy_heads, toy_targets, train_toy


def test_two_training_steps_save_a_checkpoint_qvl_loads(tmp_path, monkeypatch):
    seen = []
    real = toy_targets.Encoder.__call__

    def spy(self, s, follow_ups=True):
        e = real(self, s, follow_ups)
        seen.append(len(e.lookups))
        return e

    monkeypatch.setattr(toy_targets.Encoder, "__call__", spy)
    torch.manual_seed(0)
    out = tmp_path / "toy"
    run = train_toy.train(out, train_toy.Settings(steps=2, batch_size=4, eval_n=1, eval_every=1,
                                                  curriculum=False, lookup_weight=1.0, lookup_mode="answer",
                                                  dense_facts=True, more_facts=True))
    assert run["steps"] == 2 and run["lookup_weight"] == 1.0 and run["more_facts"] and sum(seen) > 0
    # the held-out evaluation scores the tower on every dense column the seven tasks have targets
    # for (tens and units only when the one text is a number)
    tower = run["history"][0]["tower"]
    assert set(toy_targets.DENSE_NAMES) - {"tens", "units"} <= set(tower) <= set(toy_targets.DENSE_NAMES)
    assert all(0 <= a <= 1 for a in tower.values())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("_attn_implementation", cfg.get("attn_implementation")) in (None, "sdpa")
    s = synth.make_sample("colour", 0, seed=1)
    assert isinstance(qvl.load(out).generate(s.messages(), max_new_tokens=2), str)


def test_lookup_targets_and_probe_match_transformers_attention():
    """The lookup supervision's targets name the right tokens, and the probe's recomputed
    attention rows (SDPA kept for the model) equal the eager attention probabilities transformers
    returns, fp32: 1e-5 absolute or 2e-6 relative on the mean log-probability of the supervised
    keys (the untrained toy gives some of them e^-34, where eager softmax-then-log loses digits)."""
    from transformers import Qwen2VLForConditionalGeneration

    ckpt = Path(qvl.__file__).parent / "scripts" / "qvl-toy"
    enc = toy_targets.Encoder(ckpt, "sink")
    tok = enc.tok
    start = tok.token_id("<|vision_start|>")
    cmp = enc(synth.make_sample("compare", 3, seed=1), follow_ups=False)
    cnt = enc(synth.make_sample("count", 4, seed=1))
    assert sorted(h for _, h, _ in cmp.lookups) == [0, 1]
    for e, s in ((cmp, synth.make_sample("compare", 3, seed=1)), (cnt, synth.make_sample("count", 4, seed=1))):
        for p, head, where in e.lookups:
            *objs, sink = where
            assert e.ids[sink] == start and all(e.ids[q] == enc.image_id for q in objs) and p > max(where)
    # the count sample's first lookup holds as many object tokens as the answer says
    assert len(cnt.lookups[0][2]) - 1 == int(synth.make_sample("count", 4, seed=1).answer)
    # each compare head looks inside its own picture: sinks differ, objects follow their sink
    (_, _, w0), (_, _, w1) = sorted(cmp.lookups, key=lambda x: x[1])
    assert w0[-1] < min(w0[:-1]) and w0[-1] < w1[-1] < min(w1[:-1]) and max(w0[:-1]) < w1[-1]

    model = Qwen2VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager")
    probe = toy_heads.LookupProbe(model)
    inputs = enc.collate([cmp, cnt])
    inputs.pop("labels")
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions[toy_targets.LOOKUP_LAYER]
        checked = 0
        for b, e in enumerate((cmp, cnt)):
            for p, head, where in e.lookups:
                want = -torch.log(att[b, head, p, where]).mean()
                torch.testing.assert_close(probe.loss(b, p, head, where), want, atol=1e-5, rtol=2e-6)
                mass = -torch.log(att[b, head, p, where].sum())
                torch.testing.assert_close(probe.loss(b, p, head, where, "mass"), mass, atol=1e-5, rtol=2e-6)
                checked += 1
    probe.close()
    assert checked >= 3


def test_tower_accuracy_counts_the_tokens_each_dense_column_gets_right(monkeypatch):
    """tower_accuracy against tokens built to hold their own targets: every column right; with the
    targets moved to another class, none (tokens without a target in a column are not scored)."""
    enc = toy_targets.Encoder(Path(qvl.__file__).parent / "scripts" / "qvl-toy", "answer")
    examples = [enc(s, follow_ups=False) for s in synth.generate(2, seed=7)]
    heads = toy_heads.AuxHeads(sum(toy_targets.DENSE.values()), dense_facts=True, more_facts=True)
    heads.norm = heads.dense = torch.nn.Identity()

    def tokens_for(shift):
        def features(model, inputs):
            inputs.pop("pixel_values", None)
            inputs.pop("pixel_values_videos", None)
            out = []
            ordered = [e for e in examples if e.pixel_values is not None]  # images, then clips
            for e in ordered + [e for e in examples if e.video_values is not None]:
                for _, dense in toy_targets.example_aux(e, True, True):
                    parts = [torch.nn.functional.one_hot((dense[:, k].clamp(min=0) + shift) % n, n).float()
                             for k, n in enumerate(toy_targets.DENSE.values())]
                    out.append(torch.cat(parts, 1))
            return out
        return features

    for shift, want in ((0, 1.0), (1, 0.0)):
        monkeypatch.setattr(toy_card, "visual_features", tokens_for(shift))
        acc = toy_card.tower_accuracy(torch.nn.Module(), heads, enc, examples, more=True,
                                       batch_size=len(examples))
        assert set(acc) == set(toy_targets.DENSE_NAMES) and all(a == want for a in acc.values()), acc


def test_language_loss_scores_only_labelled_positions_as_the_full_logits_do():
    """The training step's language loss, with logits computed only where a label is predicted,
    equals the cross-entropy over the model's full logits (fp32, 1e-5 relative)."""
    from transformers import Qwen2VLForConditionalGeneration

    ckpt = Path(qvl.__file__).parent / "scripts" / "qvl-toy"
    enc = toy_targets.Encoder(ckpt)
    model = Qwen2VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    batch = [enc(synth.make_sample(t, 2, seed=1)) for t in ("colour", "ocr", "compare")]
    inputs = enc.collate(batch)
    labels = inputs.pop("labels")
    with torch.no_grad():
        full = model(**dict(inputs)).logits[:, :-1]
        want = torch.nn.functional.cross_entropy(full.flatten(0, 1), labels[:, 1:].reshape(-1), ignore_index=-100,
                                                 reduction="sum")
        got = train_toy.language_loss(model, dict(inputs), labels)
    assert int((labels != -100).sum()) > 10
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_the_default_recipe_trains_the_counting_heads(tmp_path, monkeypatch):
    """A default training step (``lookup_mode="count"``) supervises head 0's mass and the counting
    heads' spread, with their sinks, on count and compare questions."""
    seen = set()
    real = toy_heads.LookupProbe.loss

    def spy(self, b, p, head, where, mode="sink"):
        seen.add((head, mode))
        return real(self, b, p, head, where, mode)

    monkeypatch.setattr(toy_heads.LookupProbe, "loss", spy)
    torch.manual_seed(0)
    run = train_toy.train(tmp_path / "toy", train_toy.Settings(steps=1, batch_size=6, eval_n=1, eval_every=1000,
                                                                curriculum=False, tasks=("count", "compare")))
    assert run["lookup_mode"] == "count" and run["steps"] == 1
    assert seen == {(0, "mass"), (toy_targets.COUNT_HEADS[0], "sink"), (toy_targets.COUNT_HEADS[1], "sink")}


def test_a_second_stage_trains_on_its_mix_and_its_card_repeats_both_stages(tmp_path, monkeypatch):
    """``--init`` with ``--task-weights``: the stream draws tasks by the changed mix, the run keeps
    the first stage's record, and the card's two commands parse back into both runs' settings."""
    import shlex

    drawn = []
    real = train_toy.Stream.batch

    def spy(self, size):
        drawn.append(dict(zip(self.tasks, self.weights)))
        return real(self, size)

    monkeypatch.setattr(train_toy.Stream, "batch", spy)
    torch.manual_seed(0)
    small = {"steps": 1, "batch_size": 2, "eval_n": 1, "eval_every": 1000}
    first = train_toy.train(tmp_path / "s1", train_toy.Settings(**small))
    toy_card.write_model_card(tmp_path / "s1", first, {})
    assert drawn[-1]["shape"] == toy_config.TASK_WEIGHTS["shape"]  # the curriculum's first phase, default mix
    st2 = train_toy.Settings(**small, seed=1, lr=3e-4, curriculum=False, init=str(tmp_path / "s1"),
                             task_weights={"count": 4.0})
    second = train_toy.train(tmp_path / "s2", st2)
    assert drawn[-1] == {**toy_config.TASK_WEIGHTS, "count": 4.0}
    assert second["init_run"]["seed"] == 0 and "history" not in second["init_run"]
    toy_card.write_model_card(tmp_path / "s2", second, {})
    card = (tmp_path / "s2" / "README.md").read_text()
    commands = [c for c in card.split("`") if c.startswith("python -m qvl.scripts.train_toy")]
    assert len(commands) == 2 and "in two stages" in card, card
    for command, run in zip(commands, (first, second), strict=True):
        _, st = train_toy.parse_args(shlex.split(command)[3:])
        assert (st.seed, st.steps, st.lr, st.curriculum, st.lookup_mode, st.task_weights or {}) == (
            run["seed"], run["planned_steps"], run["lr"], run["curriculum"], run["lookup_mode"], run["task_weights"])
        assert st.init == (None if run is first else "STAGE1")
    with pytest.raises(SystemExit):
        train_toy.parse_args(["out", "--task-weights", "counting=2"])
