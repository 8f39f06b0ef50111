"""Robot loops and chats: time to first token with the prefix and vision caches on and off.

Run as ``python -m qvl.bench.loops [--scheme int4] [--frames 10] [--turns 5]``.

Loop: the same ~500-token instructions and a new 224x224 camera frame each step, through
``engine.session(warm=True)``. With the caches on, a step should cost what the frame alone
costs: the reference row runs each frame with no instructions at all (caches off), so it pays for
the vision tower on the frame and the prefill of the frame's own tokens and nothing else.
Chat: five turns re-sending the whole history, one picture in the first turn. One fresh process
(:mod:`qvl.bench.harness`) holds an engine with the caches and one without, their requests
interleaved, on the benchmarks' random-weight Qwen2-VL-2B (:mod:`qvl.bench.fixtures`), int4 by
default; answers are 16 tokens, eos ignored.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import statistics

from qvl.bench import fixtures, harness, probe, report
from qvl.bench.report import fmt

log = logging.getLogger("qvl.bench.loops")

SCHEMES = {"bf16": None, "int4": "gptq-int4", "int8": "gptq-int8"}
NEW_TOKENS = 16
QUESTION = "Where is the nearest obstacle, and is the path ahead clear?"


def _frame(i: int, side: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(1000 + i).integers(0, 256, (side, side, 3), dtype=np.uint8))


def _instructions(tokenizer, tokens: int) -> str:
    rules, k = [], 0
    while len(tokenizer.encode(" ".join(rules))) < tokens:
        k += 1
        rules.append(f"Rule {k}: report obstacles closer than {k * 10} centimetres by their direction and distance, "
                     "and say whether the arm may move.")
    return " ".join(rules)


def _row(stats) -> dict:
    return {"ttft_s": stats.ttft_s, "vision_s": stats.vision_s, "prefill_s": stats.prefill_s,
            "prompt_tokens": stats.prompt_tokens, "cached_tokens": stats.cached_tokens}


@harness.worker(memory=True)
def loop_worker(spec: dict, res: dict) -> None:
    """Both engines (caches on, caches off) in one process, their requests interleaved frame by
    frame and turn by turn, so the host's changing speed falls on every row alike."""
    import qvl

    engines = {caches: qvl.load(spec["ckpt"], dtype="bfloat16", max_seq_len=spec["max_seq_len"], max_batch=1,
                                quant_kernel=spec.get("quant_kernel", "auto"),
                                **({} if caches else {"prefix_cache_mb": 0, "vision_cache_mb": 0}))
               for caches in (True, False)}
    on, off = engines[True], engines[False]
    system = _instructions(on.tokenizer, spec["instruction_tokens"])
    item = {"max_pixels": spec["side"] ** 2}
    for e in engines.values():
        e.generate([{"role": "user", "content": "Warm up."}], max_new_tokens=2)  # kernels built, pages touched
    gen = {"max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    sessions = {"loop, caches on": on.session(system=system, warm=True, **gen),
                "loop, caches off": off.session(system=system, **gen),
                "frame alone": off.session(**gen)}
    res["runs"] = {name: [] for name in (*sessions, "chat, caches on", "chat, caches off")}
    for i in range(spec["frames"]):
        for name, session in sessions.items():
            session.ask(QUESTION, [{"image": _frame(i, spec["side"]), **item}])
            res["runs"][name].append(_row(session.last_stats))
        log.info("frame %d: TTFT %s", i, ", ".join(f"{k} {v[-1]['ttft_s']:.2f}s" for k, v in res["runs"].items()
                                                 if v and k in sessions))
    chats = {"chat, caches on": on.session(history=True, **gen), "chat, caches off": off.session(history=True, **gen)}
    for turn in range(spec["turns"]):
        for name, chat in chats.items():
            pictures = [{"image": _frame(0, spec["side"]), **item}] if turn == 0 else []
            chat.ask(f"Turn {turn}: what changed?" if turn else "Describe the scene.", pictures)
            res["runs"][name].append(_row(chat.last_stats))
        log.info("turn %d: TTFT %s", turn, ", ".join(f"{k} {res['runs'][k][-1]['ttft_s']:.2f}s" for k in chats))
    for e in engines.values():
        e.close()


def _median_after_first(rows: list[dict], key: str = "ttft_s") -> float:
    return statistics.median(r[key] for r in rows[1:]) if len(rows) > 1 else float("nan")


def render(result: dict) -> str:
    runs = {k: {"frames": v} for k, v in result["run"].get("runs", {}).items()}
    if "error" in result["run"]:
        runs = {"all": result["run"]}
    kernel = result.get("quant_kernel", "auto")
    lines = [f"# Robot loops and chats: the prefix and vision caches ({result['config']} {result['scheme']}"
             f"{'' if kernel == 'auto' else ' ' + kernel}, {result['device']})", "",
             f"{probe.cpu_model()}, {result['threads']} threads. Loop: {result['frames']} frames of "
             f"{result['side']}x{result['side']} under ~{result['instruction_tokens']} tokens of instructions; "
             f"chat: {result['turns']} turns re-sending the history, one picture in turn 0. {NEW_TOKENS} new tokens "
             "a request. TTFT = submit -> first token. One process, the engines' requests interleaved.", ""]
    if any("error" in r for r in runs.values()):
        lines += [f"- {k}: error {str(r['error'])[:200]}" for k, r in runs.items() if "error" in r] + [""]
    ok = {k: r for k, r in runs.items() if "error" not in r}
    if {"loop, caches on", "loop, caches off", "frame alone"} <= ok.keys():
        on, off, alone = (ok[k]["frames"] for k in ("loop, caches on", "loop, caches off", "frame alone"))
        lines += ["## Loop: time to first token per frame (s)", ""]
        rows = [[i, fmt(a["ttft_s"], "{:.3f}"), a["cached_tokens"], fmt(b["ttft_s"], "{:.3f}"),
                 fmt(c["ttft_s"], "{:.3f}"), fmt(a["vision_s"], "{:.3f}")] for i, (a, b, c) in enumerate(zip(on, off, alone))]
        lines += report.table(["frame", "caches on", "cached tokens", "caches off", "frame alone (reference)",
                               "vision tower (on)"], rows)
        m_on, m_off, m_alone = (_median_after_first(x) for x in (on, off, alone))
        lines += ["", f"Median from frame 1 on: caches on {m_on:.3f} s, caches off {m_off:.3f} s, the frame alone "
                  f"{m_alone:.3f} s: caches on = {m_on / m_alone:.2f} x the frame alone (goal <= 1.10), "
                  f"{m_off / m_on:.2f}x faster than caches off.", ""]
    if {"chat, caches on", "chat, caches off"} <= ok.keys():
        on, off = ok["chat, caches on"]["frames"], ok["chat, caches off"]["frames"]
        lines += ["## Chat: time to first token per turn (s)", ""]
        rows = [[i, a["prompt_tokens"], a["cached_tokens"], fmt(a["ttft_s"], "{:.3f}"), fmt(b["ttft_s"], "{:.3f}"),
                 fmt(b["ttft_s"] / a["ttft_s"], "x{:.2f}")] for i, (a, b) in enumerate(zip(on, off))]
        lines += report.table(["turn", "prompt tokens", "cached tokens", "caches on", "caches off", "speed-up"], rows)
        later = [b["ttft_s"] / a["ttft_s"] for a, b in list(zip(on, off))[1:]]
        if later:
            lines += ["", f"From turn 1 on: {min(later):.2f}x to {max(later):.2f}x lower time to first token "
                      "(goal >= 3x).", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scheme", default="int4", choices=list(SCHEMES))
    ap.add_argument("--config", choices=("qwen2vl-2b", "tiny"), default="qwen2vl-2b")
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--side", type=int, default=224, help="frame width and height in pixels")
    ap.add_argument("--instruction-tokens", type=int, default=500)
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--quant-kernel", default="auto",
                    help="quant_kernel of the quantized schemes (qvl-a8: prefills of up to 64 new tokens run in "
                         "the kernel instead of dequantizing every weight)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    harness.setup()
    from qvl.bench.quant import ensure_quantized

    base = fixtures.ensure_checkpoint(args.config)
    kind = SCHEMES[args.scheme]
    ckpt = base if kind is None else ensure_quantized(base, kind, 128 if args.config == "qwen2vl-2b" else 32)
    probe.warm_page_cache(ckpt)
    spec = {"ckpt": str(ckpt), "max_seq_len": args.max_seq_len, "side": args.side, "frames": args.frames,
            "turns": args.turns, "instruction_tokens": args.instruction_tokens, "quant_kernel": args.quant_kernel}
    result = {"config": args.config, "scheme": args.scheme, "device": "cpu", "threads": probe.usable_cores(),
              "machine": probe.machine_info(), **{k: v for k, v in spec.items() if k != "ckpt"}}
    result["run"] = harness.run(loop_worker, spec, timeout=args.timeout, label="loops")
    md = render(result)
    stem = f"loops-{args.config}-{args.scheme}" + ("" if args.quant_kernel == "auto" else f"-{args.quant_kernel}")
    report.write_outputs(result, md, pathlib.Path(args.out), stem)
    print(md)
    return 0 if "error" not in result["run"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
