"""What a quantized output head costs and buys: KL and top-1 against the checkpoint's head, and
the decode step's time, on qvl-toy and on the 2B shapes.

Run as ``python -m qvl.bench.head [--models toy,2b-int4] [--chats 24] [--steps 24]``.

Quality: teacher-forced log-probabilities over every text token of synthetic chats (the
``qvl.export.synth`` tasks: a picture and a question, the reference answer appended), the same
model loaded with ``head="checkpoint"`` (the reference), ``"int8"`` and ``"int4"``; KL(reference ||
quantized head) averaged over tokens, and how often the two agree on the top token. On the 2B
shapes the weights are random, so its KL says what the rounding does to a head of that size, not
to a trained one; qvl-toy is trained. Speed: decode steps of one sequence, the three heads
interleaved step by step in one process, median step time. Results: bench/results/head.md.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import statistics
import time

from qvl.bench import fixtures, harness, probe, report
from qvl.bench.report import fmt

log = logging.getLogger("qvl.bench.head")

HEADS = ("checkpoint", "int8", "int4")


@harness.worker(memory=True)
def head_worker(spec: dict, res: dict) -> None:
    import torch

    import qvl
    from qvl.export.synth import TASKS, make_sample

    engines = {h: qvl.load(spec["ckpt"], dtype=spec["dtype"], max_seq_len=1024, head=h, prefix_cache_mb=0)
               for h in HEADS}
    samples = [make_sample(TASKS[i % len(TASKS)], i, seed=7) for i in range(spec["chats"])]
    ref_eng = engines["checkpoint"]
    kl = {h: [] for h in HEADS[1:]}
    top1 = {h: [] for h in HEADS[1:]}
    n_tok = 0
    for s in samples:
        answer = ref_eng.tokenizer.encode(s.answer)
        ref, targets = ref_eng.text_logprobs(s.messages(), answer)
        n_tok += len(targets)
        for h in HEADS[1:]:
            got, t2 = engines[h].text_logprobs(s.messages(), answer)
            assert torch.equal(targets, t2)
            kl[h].append(float((ref.exp() * (ref - got)).sum(-1).sum()))
            top1[h].append(float((ref.argmax(-1) == got.argmax(-1)).sum()))
    res["quality"] = {h: {"kl": sum(kl[h]) / n_tok, "top1": sum(top1[h]) / n_tok} for h in HEADS[1:]}
    res["tokens"] = n_tok
    # decode steps, interleaved: one token fed at a growing position, the same for every head
    runners = {h: e._core.runner for h, e in engines.items()}
    times = {h: [] for h in HEADS}
    bytes_head = {h: (e.model.lm_head.nbytes() if h != "checkpoint"  # QuantLinear: what its forward reads
                      else e.model.lm_head.weight.numel() * e.model.lm_head.weight.element_size())
                  for h, e in engines.items()}
    with torch.inference_mode():
        for step in range(spec["steps"] + 2):
            for h, r in runners.items():
                pos = torch.full((3, 1, 1), 10 + step)
                write = torch.tensor([[10 + step]])
                mask = torch.ones(1, 1, 1, 11 + step, dtype=torch.bool)
                t0 = time.perf_counter()
                r.step(torch.tensor([100 + step]), pos, write, mask)
                if step >= 2:  # two warm-up steps
                    times[h].append(time.perf_counter() - t0)
    res["step_ms"] = {h: 1000 * statistics.median(v) for h, v in times.items()}
    res["head_mb"] = {h: b / 2**20 for h, b in bytes_head.items()}
    for e in engines.values():
        e.close()


def render(result: dict) -> str:
    lines = ["# The quantized output head: KL, top-1 and decode step time", "",
             f"{probe.cpu_model()}, {result['threads']} threads. KL(checkpoint head || quantized head) and top-1 "
             "agreement per text token, teacher-forced over synthetic chats with their reference answers; step = "
             "one decode step of one sequence, the three heads interleaved, median. Each model runs in a fresh "
             "process.", ""]
    rows = []
    for name, r in result["models"].items():
        if "error" in r:
            rows.append([name, "error: " + str(r["error"])[:80], "", "", "", "", ""])
            continue
        base = r["step_ms"]["checkpoint"]
        for h in HEADS:
            q = r["quality"].get(h, {})
            rows.append([name, h, fmt(r["head_mb"][h], "{:.1f}"), fmt(q.get("kl"), "{:.2e}") if q else "0 (reference)",
                         fmt(100 * q["top1"], "{:.2f}%") if q else "100%", fmt(r["step_ms"][h], "{:.1f}"),
                         fmt(base / r["step_ms"][h], "x{:.2f}")])
    lines += report.table(["model", "head", "head MB", "KL / token", "top-1 agree", "step ms", "speed vs checkpoint"],
                          rows)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="toy,2b-int4", help="comma-separated subset of toy, 2b-bf16, 2b-int4, tiny")
    ap.add_argument("--chats", type=int, default=24)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    harness.setup()
    result = {"threads": probe.usable_cores(), "machine": probe.machine_info(), "models": {}}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        try:
            ckpt, dtype = fixtures.bench_model(name)
        except ValueError as e:
            ap.error(str(e))
        probe.warm_page_cache(ckpt)
        spec = {"ckpt": str(ckpt), "dtype": dtype, "chats": args.chats, "steps": args.steps}
        result["models"][name] = harness.run(head_worker, spec, timeout=args.timeout, label=name)
    md = render(result)
    report.write_outputs(result, md, pathlib.Path(args.out), "head")
    print(md)
    return 0 if all("error" not in r for r in result["models"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
