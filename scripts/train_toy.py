"""Train "qvl-toy": a small Qwen2-VL (the real architecture, via transformers) on synthetic tasks.

    python -m qvl.scripts.train_toy OUT_DIR [--minutes 40] [--seed 0]

The result is an ordinary Hugging Face checkpoint (``save_pretrained``, fp16 safetensors, tokenizer,
chat template, preprocessor and generation configs, model card) that transformers and qvl both
load. Data come from ``qvl.export.synth``: an endless seeded stream for training, a held-out
stream for the periodic evaluation that can stop the run early, and the ``synth`` test seed for
the final accuracy table, measured through qvl (fp32) and cross-checked against transformers.

Reproducibility: initialisation and data order derive from ``--seed``, the learning-rate
schedule (warm-up, cosine) from the step count. Without ``--steps`` the run times its first steps
and plans as many as ``--minutes`` holds, and logs the number: passing it as ``--steps``, with a
``--minutes`` wide enough for them, repeats the run's data order and schedule. If the machine
falls behind the box, the schedule follows the clock instead, so the run still anneals before
the time box closes (the log says where it stopped and why).
On a machine shared with other jobs, ``--threads 1`` avoids oversubscribing the cores.

The examples and their targets are in ``toy_targets``, the training-only heads in ``toy_heads``,
the evaluation and the model card in ``toy_card``; the toy's shape in ``toy_config``.

A run can continue another's weights (``--init``) with a different mix (``--task-weights``):
qvl-toy is trained that way in two stages, and its model card gives both commands.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from qvl.export import synth
from qvl.scripts import tiny
from qvl.scripts.toy_card import evaluate_checkpoint, size_mb, teacher_forced_accuracy, tower_accuracy, write_model_card
from qvl.scripts.toy_config import (HELDOUT_SEED, MAX_PIXELS, MIN_PIXELS, MROPE_SECTION, TASK_WEIGHTS, TEXT_DIMS,
                                    TRAIN_SEED, VISION_DIMS, VOCAB_SIZE)
from qvl.scripts.toy_heads import AuxHeads, LookupProbe, visual_features
from qvl.scripts.toy_targets import Encoder, Example, aux_rows, example_aux, lookup_kind

log = logging.getLogger("qvl.train_toy")


def task_mix(overrides: dict | None) -> dict[str, float]:
    """TASK_WEIGHTS with ``overrides`` (task -> weight) applied."""
    bad = sorted(set(overrides or {}) - set(TASK_WEIGHTS))
    if bad:
        raise ValueError(f"unknown task(s) {bad}; tasks are {', '.join(TASK_WEIGHTS)}")
    if any(w < 0 for w in (overrides or {}).values()):
        raise ValueError(f"task weights must be >= 0, got {overrides}")
    return {**TASK_WEIGHTS, **(overrides or {})}


# Curriculum: (fraction of the planned steps, tasks from then on). Mixed from the start, the
# decoder learns the answer priors and leaves the tower untrained (the model card's notes);
# one-object scenes first make the picture the only way to lower the loss.
CURRICULUM = ((0.0, ("shape", "colour")), (0.12, ("shape", "colour", "position", "count")), (0.25, None))


def language_loss(model, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """The summed next-token cross-entropy of ``labels`` (-100: not scored) for one forward pass.

    The vocabulary projection runs only at the positions that predict a label (``logits_to_keep``):
    most of a sequence is prompt and picture, and the full [batch, length, vocab] logits cost a
    few percent of a step."""
    keep = (labels[:, 1:] != -100).any(0).nonzero()[:, 0]
    logits = model(**inputs, logits_to_keep=keep).logits.float()
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:][:, keep].reshape(-1), ignore_index=-100,
                           reduction="sum")


class Stream:
    """Endless training examples: tasks drawn by ``mix`` (default ``TASK_WEIGHTS``), each task's
    samples in index order."""

    def __init__(self, enc: Encoder, seed: int, tasks=synth.TASKS, mix: dict | None = None):
        self.enc, self.seed = enc, seed
        self.mix = mix or TASK_WEIGHTS
        self.rng = random.Random(f"qvl-train-order:{seed}")
        self.tasks = list(tasks)
        self.weights = [self.mix[t] for t in self.tasks]
        self.next_index = {t: 0 for t in self.tasks}

    def set_tasks(self, tasks) -> None:
        self.tasks = list(tasks)
        self.weights = [self.mix[t] for t in self.tasks]
        for t in self.tasks:
            self.next_index.setdefault(t, 0)

    def batch(self, size: int) -> list[Example]:
        out = []
        for task in self.rng.choices(self.tasks, self.weights, k=size):
            out.append(self.enc(synth.make_sample(task, self.next_index[task], self.seed)))
            self.next_index[task] += 1
        # similar lengths together waste less compute on padding inside the two micro-batches
        return sorted(out, key=lambda e: len(e.ids))


def build_checkpoint_files(out: Path) -> tuple[dict, dict]:
    """Tokenizer, chat template, preprocessor and generation configs; returns (flat config, ids)."""
    ids = tiny.build_tokenizer(out, corpus=synth.VOCAB_TEXT + "\n" + tiny._CORPUS, vocab_size=VOCAB_SIZE)
    tok = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tiny._padded_vocab(len(tok["model"]["vocab"]) + len(tok["added_tokens"]))
    flat = tiny.make_config(ids, vocab, tie_word_embeddings=True, mrope_section=MROPE_SECTION, layout="flat",
                            text_dims=TEXT_DIMS, vision_dims=VISION_DIMS)
    tiny._write_chat_template(out, "chat_template.json")
    tiny._write_json(out / "preprocessor_config.json",
                     {**tiny.PREPROCESSOR_CONFIG, "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS})
    return flat, ids


WARMUP_STEPS = 100
CALIBRATION_STEPS = 40  # steps timed (after 10 more of warm-up) to size the run from --minutes


def lr_at(step: int, total: int | None, peak: float, floor: float = 0.05) -> float:
    """Linear warm-up over WARMUP_STEPS, then a cosine from ``peak`` to ``floor * peak`` at ``total``."""
    if step < WARMUP_STEPS:
        return peak * (step + 1) / WARMUP_STEPS
    if total is None:
        return peak
    p = min(1.0, (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


@dataclass
class Settings:
    """One training run; the command-line flags of the same names."""

    minutes: float = 40.0
    steps: int | None = None
    seed: int = 0
    batch_size: int = 16  # pictures a step
    lr: float = 1e-3  # peak; the model card's notes give the runs that chose it and the batch size
    eval_every: int = 300
    eval_n: int = 50
    target: float = 0.99
    threads: int | None = None
    tasks: tuple = synth.TASKS
    init: str | None = None
    curriculum: bool = True
    aux_weight: float = 1.0  # auxiliary vision heads (AuxHeads); 0 trains on the language loss alone
    # Lookup supervision (LookupProbe): heads of one decoder layer are trained to look, from the
    # position that predicts an answer, at the vision tokens the question is about; lookup_mode
    # picks which tokens and how (lookup_targets). The model card's notes record the runs that
    # chose these defaults.
    lookup_weight: float = 1.0
    lookup_mode: str = "count"  # lookup_targets
    dense_facts: bool = True  # corner / motion targets on each object's token (token_targets)
    more_facts: bool = False  # edge, count and text targets too (token_targets)
    task_weights: dict | None = None  # overrides of TASK_WEIGHTS (task -> weight) for this run


def train(out: Path, st: Settings) -> dict:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    if st.threads:
        torch.set_num_threads(st.threads)
    out.mkdir(parents=True, exist_ok=True)
    flat, ids = build_checkpoint_files(out)
    enc = Encoder(out, st.lookup_mode)
    torch.manual_seed(st.seed)
    init_run = None
    if st.init:  # continue from an earlier run's weights (same tokenizer: it is rebuilt identically)
        model = Qwen2VLForConditionalGeneration.from_pretrained(st.init, dtype=torch.float32)
        # the earlier stage's record travels on, so the card can say how to repeat both stages
        log_path = Path(st.init) / "train_log.json"
        if log_path.exists():
            init_run = json.loads(log_path.read_text(encoding="utf-8"))
            init_run.pop("history", None)
    else:
        config = Qwen2VLConfig(**{k: v for k, v in flat.items() if k != "architectures"})
        model = Qwen2VLForConditionalGeneration(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters (vision %.2fM), vocab %d", n_params / 1e6,
             sum(p.numel() for p in model.model.visual.parameters()) / 1e6, flat["vocab_size"])

    heads = (AuxHeads(model.config.text_config.hidden_size, st.dense_facts, st.more_facts)
             if st.aux_weight > 0 else None)
    probe = LookupProbe(model) if st.lookup_weight > 0 else None
    named = list(model.named_parameters()) + (list(heads.named_parameters(prefix="aux")) if heads else [])
    params = [p for _, p in named]
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=st.lr, betas=(0.9, 0.98), eps=1e-8, fused=True)  # fused: a cheaper step
    first = [t for t in CURRICULUM[0][1] if t in st.tasks] if st.curriculum else []
    stream = Stream(enc, TRAIN_SEED + st.seed, first or st.tasks, task_mix(st.task_weights))
    heldout = [enc(s, follow_ups=False) for s in synth.generate(st.eval_n, HELDOUT_SEED + st.seed, st.tasks)]
    minutes, steps, lr, batch_size = st.minutes, st.steps, st.lr, st.batch_size

    budget_s = minutes * 60
    t0 = time.perf_counter()
    ema, aux_acc, best, history = None, None, None, []
    step, total, t_cal = 0, steps, None
    reason = "step budget"
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= budget_s:
            reason = "time box"
            break
        if total is not None and step >= total:
            break
        if total is None and step == 10:
            t_cal = time.perf_counter()
        if total is None and step == 10 + CALIBRATION_STEPS:
            rate = CALIBRATION_STEPS / (time.perf_counter() - t_cal)
            # 8% of the box is left for the periodic evaluations and slower stretches
            total = step + int(rate * (budget_s - elapsed) * 0.92)
            log.info("%.2f steps/s: the %g-minute box holds %d steps; `--steps %d --minutes 120` repeats "
                     "this run (data order and schedule) on a machine that is not much slower", rate, minutes,
                     total, total)
        # on a machine that slows down later, the schedule follows the clock, so it still anneals
        # before the box closes
        eff = step if total is None else max(step, int(elapsed / budget_s * total))
        for g in opt.param_groups:
            g["lr"] = lr_at(eff, total, lr)
        if st.curriculum and total is not None:
            phase = [tasks for start, tasks in CURRICULUM if eff >= start * total][-1]
            phase = [t for t in (phase or st.tasks) if t in st.tasks] or list(st.tasks)
            if phase != stream.tasks:
                log.info("step %d: training on %s", step, ", ".join(phase))
                stream.set_tasks(phase)
        batch = stream.batch(batch_size)
        opt.zero_grad(set_to_none=True)
        loss_sum, aux_sum, aux_hits, n_tok = 0.0, 0.0, 0, sum(sum(1 for x in e.labels if x != -100) for e in batch)
        n_look, look_sum = sum(len(e.lookups) for e in batch) or 1, 0.0
        # two micro-batches of similar length: half the padding of one batch of mixed lengths
        half = len(batch) // 2
        n_aux = sum(sum(t != -100 for t in row) + (dense is not None)
                    for e in batch for row, dense in example_aux(e, st.dense_facts, st.more_facts)) or 1
        for part in (batch[:half], batch[half:]):
            inputs = enc.collate(part)
            labels = inputs.pop("labels")
            loss = torch.zeros(())
            if heads is not None:
                rows = aux_rows(part, st.dense_facts, st.more_facts)
                for tokens, (row, dense) in zip(visual_features(model, inputs), rows, strict=True):
                    l_aux, hit = heads(tokens, row, dense)
                    loss = loss + st.aux_weight * l_aux / n_aux
                    aux_hits += hit
            lm = language_loss(model, inputs, labels) / n_tok
            if probe is not None:
                for b, e in enumerate(part):
                    for p, head, where in e.lookups:
                        l_look = probe.loss(b, p, head, where, lookup_kind(st.lookup_mode, head))
                        loss = loss + st.lookup_weight * l_look / n_look
                        look_sum += l_look.item() / n_look
            (loss + lm).backward()
            loss_sum += lm.item()
            aux_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        ema = loss_sum if ema is None else 0.95 * ema + 0.05 * loss_sum
        aux_acc = aux_hits / n_aux if aux_acc is None else 0.95 * aux_acc + 0.05 * aux_hits / n_aux
        if step % 20 == 0:
            el = time.perf_counter() - t0
            rate = step / el
            eta = budget_s - el if total is None else min((total - step) / rate, budget_s - el)
            log.info("step %d/%s  loss %.4f (ema %.4f)  aux %.3f (ema acc %.3f)  lookup %.3f  lr %.2e  %.2f steps/s  "
                     "%.0f samples/s  elapsed %.1f min  ETA %.1f min", step, total or "?", loss_sum, ema, aux_sum,
                     aux_acc or 0, look_sum, opt.param_groups[0]["lr"], rate, rate * batch_size, el / 60, eta / 60)
        if step % st.eval_every == 0:
            acc = teacher_forced_accuracy(model, enc, heldout)
            worst = min(acc.values())
            tower = tower_accuracy(model, heads, enc, heldout, st.more_facts) if heads is not None else {}
            history.append({"step": step, "minutes": (time.perf_counter() - t0) / 60, "loss_ema": ema, **acc,
                            "tower": tower})
            log.info("held-out exact match at step %d: %s  (worst %.3f)", step,
                     "  ".join(f"{t} {a:.3f}" for t, a in acc.items()), worst)
            if tower:
                log.info("held-out tower tokens right: %s", "  ".join(f"{t} {a:.3f}" for t, a in tower.items()))
            mean = sum(acc.values()) / len(acc)
            if best is None or mean >= best[0]:
                best = (mean, step, copy.deepcopy(model.state_dict()))
            if worst >= st.target:
                reason = f"held-out target {st.target} reached"
                break
    el = time.perf_counter() - t0
    log.info("training stopped after %d steps, %.1f min (%s)", step, el / 60, reason)
    acc = teacher_forced_accuracy(model, enc, heldout)
    history.append({"step": step, "minutes": el / 60, "loss_ema": ema, **acc})
    log.info("final held-out exact match: %s", "  ".join(f"{t} {a:.3f}" for t, a in acc.items()))
    kept_step = step
    # by the mean over tasks: choosing by the worst task can give up a task the model has
    # mastered for a small gain on its weakest
    if best is not None and best[0] > sum(acc.values()) / len(acc):
        log.info("keeping the step-%d weights (mean accuracy %.3f > %.3f)", best[1], best[0],
                 sum(acc.values()) / len(acc))
        model.load_state_dict(best[2])
        kept_step = best[1]

    if probe is not None:
        probe.close()
    model.eval()
    # fp16 rather than bf16: 3 more mantissa bits, and every weight here is far inside fp16's range
    model.to(torch.float16)
    for sub in (model.config.text_config, model.config.vision_config):
        sub.dtype = torch.float16  # else a run from --init (loaded in fp32) labels fp16 weights float32
    model.save_pretrained(out)
    # written after save_pretrained, so these files (not transformers' defaults) describe the model
    tiny._write_json(out / "generation_config.json", {
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"], "do_sample": False})
    return {"steps": step, "kept_step": kept_step, "planned_steps": total, "minutes": el / 60, "stopped_by": reason,
            "batch_size": batch_size, "lr": lr, "seed": st.seed, "init": st.init, "curriculum": st.curriculum,
            "aux_weight": st.aux_weight, "lookup_weight": st.lookup_weight, "lookup_mode": st.lookup_mode,
            "dense_facts": st.dense_facts, "more_facts": st.more_facts,
            "task_weights": dict(st.task_weights or {}), "init_run": init_run, "params": n_params,
            "history": history}


def parse_args(argv=None) -> tuple[argparse.Namespace, Settings]:
    """The command line: its arguments, and the Settings of the run they ask for."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--minutes", type=float, default=40, help="time box for the training loop")
    ap.add_argument("--steps", type=int, help="steps the learning-rate schedule spans (default: as many as the "
                    "--minutes box holds, timed over the first steps; the log prints the number)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=Settings.batch_size, help="pictures a step")
    ap.add_argument("--lr", type=float, default=Settings.lr, help="peak learning rate")
    ap.add_argument("--eval-every", type=int, default=Settings.eval_every, help="steps between held-out evaluations")
    ap.add_argument("--eval-n", type=int, default=50, help="held-out samples per task")
    ap.add_argument("--target", type=float, default=0.99, help="stop once every task reaches this held-out accuracy")
    ap.add_argument("--test-n", type=int, default=200, help="final test samples per task (0: skip)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--tasks", nargs="+", default=list(synth.TASKS), choices=synth.TASKS,
                    help="train on these tasks only (smoke tests)")
    ap.add_argument("--no-curriculum", dest="curriculum", action="store_false",
                    help="all tasks from the first step (see CURRICULUM)")
    ap.add_argument("--aux-weight", type=float, default=Settings.aux_weight,
                    help="weight of the auxiliary vision-head loss (0: language loss only)")
    ap.add_argument("--lookup-weight", type=float, default=Settings.lookup_weight,
                    help="weight of the decoder lookup supervision (0: off; see Settings)")
    ap.add_argument("--lookup-mode", choices=("sink", "mass", "answer", "count"), default=Settings.lookup_mode,
                    help="lookup targets: named objects + <|vision_start|> evenly (sink), the mass on the "
                    "named objects (mass), on every token holding the answer (answer), or mass plus counting "
                    "heads with the sink for count and compare (count, the default); see lookup_targets")
    ap.add_argument("--no-dense-facts", dest="dense_facts", action="store_false",
                    help="do not train object tokens on their corner (pictures) and motion (clips)")
    ap.add_argument("--more-facts", action="store_true",
                    help="also train tokens on their canvas edges, objects on their shape's count, text cells on "
                         "the text (token_targets)")
    ap.add_argument("--init", help="start from this checkpoint's weights instead of a fresh initialisation")
    ap.add_argument("--task-weights", nargs="+", default=[], metavar="TASK=W",
                    help=f"change the training mix (defaults: {' '.join(f'{t}={w}' for t, w in TASK_WEIGHTS.items())})")
    args = ap.parse_args(argv)
    try:
        args.task_weights = {t: float(w) for t, w in (kv.split("=", 1) for kv in args.task_weights)} or None
        task_mix(args.task_weights)
    except ValueError as e:
        ap.error(f"--task-weights: {e} (give TASK=WEIGHT pairs)")
    return args, Settings(**{f.name: getattr(args, f.name) for f in fields(Settings) if f.name != "tasks"},
                          tasks=tuple(args.tasks))


def main(argv=None) -> None:
    args, st = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out_dir)
    run = train(out, st)
    table = evaluate_checkpoint(out, args.test_n, hf_n=min(args.test_n, 50)) if args.test_n else {}
    for task, r in table.items():
        log.info("test %-9s qvl %s  transformers %.3f  same answer %s", task, r["qvl_fp32"], r["transformers"],
                 r["same_answer"])
    write_model_card(out, run, table)
    log.info("wrote %s (%.1f MB of weights)", out, size_mb(out))


if __name__ == "__main__":
    main()
