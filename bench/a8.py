"""The 8-bit-activation kernel (quant_kernel "qvl-a8") against the exact one ("qvl").

    python -m qvl.bench.a8 [--schemes int4,int8] [--batch 1,2,4] [--prefill 16,32,64,128]

Speed, per scheme (the 2B shapes' RTN GPTQ checkpoints of :mod:`qvl.bench.quant`, bf16
activations), in one fresh process that loads the model once per kernel and runs them interleaved
(step k of one right after step k of the other), best and median of the rounds:
* decode steps at each ``--batch`` size: every row its own 64-token prompt (untimed), then greedy
  steps of all rows (embed + decoder + lm_head + argmax); the aggregate tok/s is rows / step time;
  achieved GB/s is the bytes a step reads (decoder linears + lm_head) / step time, beside the
  copy bandwidth measured in the same process.
* a short prefill: ``--prefill`` new tokens after a 256-token prefix already in the KV cache (a
  chat turn with the prefix cached). The a8 model runs each length both ways, its kernel and the
  dequantized weight in torch's GEMM, which gives the crossover (``cpu.A8_MAX_M``).
Quality, on qvl-toy (RTN int4 / int8 of scripts/qvl-toy, groups of 128) and the 2B shapes, the
engines prefilling in chunks of 8 so every product goes through the kernels (the exact one's GEMV
covers up to 8 rows; a8's rows answer the same in any chunk): greedy answers identical or not, and
over the prompt + the exact kernel's answer, mean KL(exact || a8) and top-1 agreement per position.
Writes ``bench/results/a8.{json,md}``.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

from qvl.bench import fixtures, harness, probe, report
from qvl.bench.report import fmt

log = logging.getLogger("qvl.bench.a8")

KERNELS = ("qvl", "qvl-a8")
SCHEMES = {"int4": "gptq-int4", "int8": "gptq-int8"}
GROUP = 128  # Qwen's GPTQ releases
PROMPT_LEN, PREFIX = 64, 256
TEXT_PROMPTS = ["Describe a quiet harbour at dawn.", "List three uses of a paper clip.",
                "What is the capital of France?", "Write one sentence about robots."]


def _ids(n: int, seed: int):
    import torch

    return ((torch.arange(n) + 31 * seed) * 7919 % 400 + 3)[None]  # inside the tiny vocabularies too


def _prefill(m, ids, start: int, row: int = 0):
    import torch

    t = ids.shape[1]
    pos = torch.arange(start, start + t)
    mask = None
    if start:  # causal over the cached prefix and the new tokens
        mask = (torch.arange(start + t)[None] <= pos[:, None])[None, None]
    return m(m.embed_tokens(ids), pos.expand(3, 1, -1), pos, mask, start + t, row)


@harness.worker(memory=True)
def speed_worker(spec: dict, res: dict) -> None:
    import torch

    from qvl.bench.quant import weight_bytes
    from qvl.quant import cpu
    from qvl.runtime.head import quantize_head
    from qvl.runtime.loader import load_model

    batches, steps, lengths, rounds = spec["batch"], spec["steps"], spec["prefill"], spec["rounds"]
    res["bandwidth"] = [probe.copy_bandwidth(1 << 30, tries=3)["bandwidth_gb_s"]]
    models = {}
    with torch.inference_mode():
        for k in KERNELS:
            models[k] = m = load_model(spec["ckpt"], dtype="bfloat16", quant_kernel=k)
            quantize_head(m, spec["head"], k)
            m.setup_caches(max(batches), max(PROMPT_LEN + steps + 1, PREFIX + max(lengths)), torch.bfloat16)
        res["bytes_per_token"] = weight_bytes(models["qvl"])["bytes_per_token"]
        res["decode"] = {}
        for b in batches:
            tok, times = {}, {k: [] for k in KERNELS}
            for k, m in models.items():
                last = [m.logits(_prefill(m, _ids(PROMPT_LEN, r), 0, r)[:, -1]).argmax(-1) for r in range(b)]
                tok[k] = torch.cat(last)
            for step in range(steps):
                slot = PROMPT_LEN + step
                mask = torch.ones(b, 1, 1, slot + 1, dtype=torch.bool)
                for k in KERNELS[step % 2:] + KERNELS[:step % 2]:
                    m = models[k]
                    t0 = time.perf_counter()
                    h = m(m.embed_tokens(tok[k][:, None]), torch.full((3, b, 1), slot), torch.full((b, 1), slot),
                          mask, slot + 1)
                    tok[k] = m.logits(h[:, -1]).argmax(-1)
                    times[k].append(time.perf_counter() - t0)
            res["decode"][b] = {k: _stats(ts[2:]) for k, ts in times.items()}  # 2 warm-up steps
            log.info("batch %d: %s", b, {k: round(v["ms_best"], 1) for k, v in res["decode"][b].items()})
        for m in models.values():
            _prefill(m, _ids(PREFIX, 7), 0)
        ways = [("qvl", None), ("qvl-a8", 1 << 30), ("qvl-a8", 0)]  # a8: its kernel, then W dequantized
        times = {(k, lim, t): [] for k, lim in ways for t in lengths}
        default = cpu.A8_MAX_M
        try:
            for _ in range(rounds):
                for t in lengths:
                    for k, lim in ways:
                        cpu.A8_MAX_M = default if lim is None else lim
                        t0 = time.perf_counter()
                        _prefill(models[k], _ids(t, 3), PREFIX)
                        times[(k, lim, t)].append(time.perf_counter() - t0)
        finally:
            cpu.A8_MAX_M = default
        name = {None: "qvl", 1 << 30: "a8 kernel", 0: "a8 dequant"}
        res["prefill"] = {t: {name[lim]: 1e3 * min(times[(k, lim, t)]) for k, lim in ways} for t in lengths}
    res["bandwidth"].append(probe.copy_bandwidth(1 << 30, tries=3)["bandwidth_gb_s"])


def _stats(ts: list[float]) -> dict:
    return {"ms_best": 1e3 * min(ts), "ms_median": 1e3 * statistics.median(ts), "steps": len(ts)}


@harness.worker
def quality_worker(spec: dict, res: dict) -> None:
    import torch

    import qvl

    engines = {k: qvl.load(spec["ckpt"], dtype="bfloat16", quant_kernel=k, prefill_chunk=8, max_seq_len=1024,
                           prefix_cache_mb=0, vision_cache_mb=0) for k in KERNELS}
    prompts = [[{"role": "user", "content": [{"type": "text", "text": p}]}] for p in TEXT_PROMPTS]
    if spec.get("image"):
        prompts.append(fixtures.messages_for(spec["image"]))
    same, kl, top1, n = 0, 0.0, 0.0, 0
    for msgs in prompts:
        ans = {k: list(e.generate_ids(msgs, max_new_tokens=spec["new_tokens"])) for k, e in engines.items()}
        same += ans["qvl"] == ans["qvl-a8"]
        lp = {k: e.text_logprobs(msgs, ans["qvl"])[0].double() for k, e in engines.items()}
        kl += float((lp["qvl"].exp() * (lp["qvl"] - lp["qvl-a8"])).sum(-1).sum())
        top1 += float((lp["qvl"].argmax(-1) == lp["qvl-a8"].argmax(-1)).sum())
        n += lp["qvl"].shape[0]
    res.update(answers=len(prompts), same_answers=same, positions=n, kl=kl / n, top1=top1 / n,
               new_tokens=spec["new_tokens"])


def _toy(kind: str, group: int) -> pathlib.Path:
    """The RTN ``kind`` quantization of qvl-toy, cached beside the benchmarks' checkpoints."""
    from qvl.bench.quant import ensure_quantized
    from qvl.scripts.default_model import TOY_MODEL

    stamp = {"files": sorted((f.name, f.stat().st_size) for f in TOY_MODEL.iterdir() if f.is_file())}
    copy = fixtures.build_cached(fixtures.cache_root() / "qvl-toy", lambda out: shutil.copytree(
        TOY_MODEL, out, dirs_exist_ok=True), {"stamp": stamp},
        lambda p: (fixtures.read_marker(p) or {}).get("stamp") == stamp)
    return ensure_quantized(copy, kind, group)


def render(result: dict) -> str:
    m = result["machine"]
    lines = [f"# qvl-a8 (8-bit activations) against the exact kernel, {result['config']}", "",
             f"{m['cpu_model']}, {m['usable_cores']} cores ({m['cpu_capability']}), torch {m['torch']}; "
             f"{m['date']}; bf16 activations, head {result.get('head', 'checkpoint')}, {result['threads']} threads; the kernels interleaved step by step in "
             f"one process per scheme, best of the steps (median in brackets), {result['steps']} steps a batch size.",
             "", "## Decode", ""]
    rows = []
    for s, r in result["speed"].items():
        if "error" in r:
            rows.append([s, "ERROR: " + str(r["error"])[:150]] + [""] * 6)
            continue
        bw = max(r["bandwidth"])
        one = {k: r["decode"]["1"][k]["ms_best"] for k in KERNELS}
        for b, d in r["decode"].items():
            for k in KERNELS:
                ms = d[k]["ms_best"]
                rows.append([s, k, b, f"{ms:.1f} ({d[k]['ms_median']:.1f})", f"{1e3 * int(b) / ms:.2f}",
                             f"{int(b) * one[k] / ms:.2f}x", f"{r['bytes_per_token'] / ms / 1e6:.1f}",
                             f"{100 * r['bytes_per_token'] / ms / 1e6 / bw:.0f}%"])
    lines += report.table(["scheme", "kernel", "batch", "step ms", "tok/s (all rows)", "vs batch 1 aggregate",
                           "GB/s", "of copy bw"], rows, "lllrrrrr")
    bws = [f"{s} {', '.join(f'{b:.1f}' for b in r['bandwidth'])}" for s, r in result["speed"].items()
           if "bandwidth" in r]
    lines += ["", "GB/s: the bytes one step reads (decoder linears + lm_head, as held) / step time; copy bandwidth "
              "(GB/s, read + write, measured before and after in the same process): " + "; ".join(bws) + ".", "",
              f"## Short prefill: new tokens after a {PREFIX}-token cached prefix, ms (best of {result['rounds']})",
              ""]
    rows = []
    for s, r in result["speed"].items():
        for t, p in (r.get("prefill") or {}).items():
            rows.append([s, t, fmt(p["qvl"], "{:.0f}"), fmt(p["a8 kernel"], "{:.0f}"), fmt(p["a8 dequant"], "{:.0f}"),
                         f"{p['qvl'] / min(p['a8 kernel'], p['a8 dequant']):.2f}x"])
    lines += report.table(["scheme", "new tokens", "qvl (GEMV up to 8 rows, else dequant + GEMM)", "a8 kernel",
                           "a8: W dequantized + GEMM", "qvl / best a8"], rows, "lrrrrr")
    lines += ["", "## Answers against the exact kernel", "",
              "Engines prefill in chunks of 8, so every product runs in the kernels (a worst case for a8: at the "
              "default chunk of 256 a long prompt's chunks use the dequantized weight). KL(exact || a8) and top-1 "
              "agreement over every position of the prompts + the exact kernel's greedy answer.", ""]
    rows = []
    for name, r in result["quality"].items():
        if "error" in r:
            rows.append([name, "ERROR: " + str(r["error"])[:150], "", "", ""])
        else:
            rows.append([name, f"{r['same_answers']}/{r['answers']} ({r['new_tokens']} tokens)", r["positions"],
                         f"{r['kl']:.2e}", f"{100 * r['top1']:.1f}%"])
    lines += report.table(["model", "identical greedy answers", "positions", "mean KL", "top-1 agreement"], rows,
                          "llrrr")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=tuple(fixtures.CONFIGS), default="qwen2vl-2b")
    ap.add_argument("--schemes", default="int4,int8")
    ap.add_argument("--batch", default="1,2,4")
    ap.add_argument("--prefill", default="16,32,64,128")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3, help="prefill repeats (best shown)")
    ap.add_argument("--new-tokens", type=int, default=24, help="greedy answer length in the quality runs")
    ap.add_argument("--group", type=int, default=GROUP, help="weight group size of the RTN checkpoints")
    ap.add_argument("--head", default="checkpoint", choices=("checkpoint", "int8", "int4"),
                    help="the output head in the speed runs (int8 / int4: rounded at load, run by the same kernel)")
    ap.add_argument("--quality", default="toy,config", help="models of the quality runs: toy (qvl-toy), config")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: speed, quality")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    harness.setup()
    threads = args.threads or probe.usable_cores()
    schemes = [s for s in args.schemes.split(",") if s]
    skip = set(args.skip.split(","))
    base = fixtures.ensure_checkpoint(args.config)
    from qvl.bench.quant import ensure_quantized

    ckpts = {s: ensure_quantized(base, SCHEMES[s], args.group) for s in schemes}
    result = {"config": args.config, "group": args.group, "head": args.head, "threads": threads, "steps": args.steps, "rounds": args.rounds,
              "machine": probe.machine_info(), "speed": {}, "quality": {}}
    spec = {"head": args.head, "threads": threads, "steps": args.steps, "rounds": args.rounds, "new_tokens": args.new_tokens,
            "batch": [int(b) for b in args.batch.split(",")], "prefill": [int(t) for t in args.prefill.split(",")]}
    with tempfile.TemporaryDirectory(prefix="qvl-a8-") as work:
        image = fixtures.make_image(pathlib.Path(work) / "bench.png")
        if "speed" not in skip:
            for s, ckpt in ckpts.items():
                r = harness.run(speed_worker, dict(spec, ckpt=str(ckpt)), timeout=3600, label=f"speed-{s}")
                r["decode"] = {str(b): v for b, v in r.get("decode", {}).items()}  # JSON keys
                r["prefill"] = {str(t): v for t, v in r.get("prefill", {}).items()}
                result["speed"][s] = r
        if "quality" not in skip:
            for s in schemes:
                models = [("toy", f"qvl-toy {s}", lambda: _toy(SCHEMES[s], args.group), str(image)),
                          ("config", f"{args.config} {s}", lambda: ckpts[s], None)]
                for _, name, ckpt, img in [m for m in models if m[0] in args.quality.split(",")]:
                    result["quality"][name] = harness.run(quality_worker, dict(spec, ckpt=str(ckpt()), image=img),
                                                          timeout=3600, label=f"quality-{name}")
    md = render(result)
    stem = "a8" if args.config == "qwen2vl-2b" else f"a8-{args.config}"
    report.write_outputs(result, md, pathlib.Path(args.out), stem + ("" if args.head == "checkpoint" else f"-head-{args.head}"))
    print(md)
    return 0 if all("error" not in r for part in ("speed", "quality") for r in result[part].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
