"""The training script end to end, a few steps, with the opt-in experiments on (lookup
supervision, object facts): the checkpoint it saves is plain Qwen2-VL (SDPA attention in its
config) and qvl loads it."""

import json

import torch

import qvl
from qvl.scripts import synth, train_toy


def test_two_training_steps_save_a_checkpoint_qvl_loads(tmp_path, monkeypatch):
    seen = []
    real = train_toy.Encoder.__call__

    def spy(self, s, follow_ups=True):
        e = real(self, s, follow_ups)
        seen.append(len(e.lookups))
        return e

    monkeypatch.setattr(train_toy.Encoder, "__call__", spy)
    torch.manual_seed(0)
    out = tmp_path / "toy"
    run = train_toy.train(out, train_toy.Settings(steps=2, batch_size=4, eval_n=1, eval_every=1000,
                                                  curriculum=False, lookup_weight=1.0, object_facts=True))
    assert run["steps"] == 2 and run["lookup_weight"] == 1.0 and run["object_facts"] and sum(seen) > 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("_attn_implementation", cfg.get("attn_implementation")) in (None, "sdpa")
    s = synth.make_sample("colour", 0, seed=1)
    assert isinstance(qvl.load(out).generate(s.messages(), max_new_tokens=2), str)
