"""The memory plan against measured peaks: the vision tower's activation model, and whole engines
loaded under a budget on the 2B shapes.

Run as ``python -m qvl.bench.memory [--fit] [--budgets 2 3 4] [--repeats 2]``.

* ``--fit``: the vision tower's activation peak over patches, towers of several widths, bf16 and
  fp32, each call in a fresh process (:mod:`qvl.bench.harness`): built with random weights, one
  warm-up call, glibc's mmap threshold pinned as a budgeted engine pins it, ``VmHWM`` reset
  (``/proc/self/clear_refs``), then one call; peak = ``VmHWM`` - RSS before it. The least-squares
  units per patch are printed beside ``qvl.runtime.plan.VISION_UNITS``.
* budgets: the 2B GPTQ-int4 checkpoint (``bench/fixtures.py``) loaded with
  ``memory_budget=B``: the plan's choice (max_seq_len, max_batch, caches, largest picture) and
  its planned peak, against the peak RSS of a fresh process that loads it and answers one
  448 x 448 picture (``VmHWM``).
* the smallest footprint: int4 decoder, int8 head, 4k context, the 448 x 448 picture, the caches
  off, and its KL against the bf16 checkpoint over the picture's answer.

Results: bench/results/memory.md and .json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import logging
import pathlib

from qvl.bench import fixtures, harness, probe, report
from qvl.bench.report import fmt

log = logging.getLogger("qvl.bench.memory")

# (embed_dim, heads, dtype, patches)
FIT_GRID = [(e, h, d, n) for e, h in ((320, 4), (640, 8), (1280, 16)) for d in ("bfloat16", "float32")
            for n in (1024, 4096, 16384)]


def _reset_peak() -> None:
    pathlib.Path("/proc/self/clear_refs").write_text("5")


@harness.worker
def vision_worker(spec: dict, res: dict) -> None:
    """Activation peak of one tower call: ``spec`` {embed_dim, heads, dtype, patches, depth, pin}."""
    import ctypes

    import torch

    from qvl.model.config import VisionConfig
    from qvl.model.vision import VisionRotary, VisionTower
    from qvl.runtime.plan import pin_allocator

    if spec.get("pin", True):
        pin_allocator()
    cfg = VisionConfig(depth=spec.get("depth", 2), embed_dim=spec["embed_dim"], num_heads=spec["heads"],
                       hidden_size=spec.get("hidden", 1536))
    dtype = getattr(torch, spec["dtype"])
    with torch.device("meta"):
        tower = VisionTower(cfg)
    tower = tower.to_empty(device="cpu").to(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tower.parameters():
            p.normal_(0.0, 0.02, generator=g)
    tower.rotary = VisionRotary(cfg.head_dim, cfg.rope_theta)
    side = int(spec["patches"] ** 0.5)
    side -= side % 2
    pv = torch.randn(side * side, cfg.patch_dim, generator=g)
    with torch.inference_mode():
        tower.encode(torch.randn(16, cfg.patch_dim), torch.tensor([[1, 4, 4]]))
        gc.collect()
        ctypes.CDLL(None).malloc_trim(0)
        _reset_peak()
        before = probe.status_kb("VmRSS")
        tower.encode(pv, torch.tensor([[1, side, side]]))
        peak = probe.status_kb("VmHWM")
    res.update(patches=side * side, peak_bytes=(peak - before) * 1024)


def fit(grid=FIT_GRID, pin: bool = True) -> dict:
    """Measure the grid; least squares of (peak - VISION_FIXED) = units * patches * E * s."""
    from qvl.runtime import plan

    rows = []
    for e, h, d, n in grid:
        r = harness.run(vision_worker, {"embed_dim": e, "heads": h, "dtype": d, "patches": n, "pin": pin, "threads": 2},
                        timeout=600, label=f"vision-{e}-{d}-{n}")
        if "error" in r:
            raise RuntimeError(f"vision worker failed: {r['error']}")
        s = 2 if d == "bfloat16" else 4
        rows.append(dict(embed_dim=e, dtype=d, patches=r["patches"], peak_bytes=r["peak_bytes"],
                         units=(r["peak_bytes"] - plan.VISION_FIXED) / (r["patches"] * e * s)))
    xs = [r["patches"] * r["embed_dim"] * (2 if r["dtype"] == "bfloat16" else 4) for r in rows]
    ys = [r["peak_bytes"] - plan.VISION_FIXED for r in rows]
    for r in rows:
        r["planned_bytes"] = _planned_call(r["embed_dim"], 2 if r["dtype"] == "bfloat16" else 4, r["patches"])
        r["error"] = r["planned_bytes"] / r["peak_bytes"] - 1
    return {"rows": rows, "fitted_units": sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs),
            "plan_units": plan.VISION_UNITS, "plan_fixed_bytes": plan.VISION_FIXED}


def _planned_call(embed_dim: int, s: int, patches: int) -> int:
    from qvl.runtime import plan

    return int(patches * plan.VISION_UNITS * embed_dim * s + plan.VISION_FIXED)


# --------------------------------------------------------------------------------------------
# engines under a budget


@harness.worker(memory=True)
def engine_worker(spec: dict, res: dict) -> None:
    """Load ``spec["ckpt"]`` with ``spec["options"]`` (memory_budget among them), answer one
    448 x 448 picture; the plan's figures and the engine's choices come back with the peak."""
    import qvl

    eng = qvl.load(spec["ckpt"], **spec["options"])
    plan = eng.plan
    if plan is not None:
        res["plan"] = {k: getattr(plan, k) for k in ("total_bytes", "weights_bytes", "max_seq_len", "max_batch",
                                                     "max_pixels", "prefix_cache_mb", "vision_cache_mb")}
        res["plan"]["parts"] = dict(plan.parts)
    res["max_seq_len"], res["max_batch"] = eng.model.max_seq, eng.model.max_batch
    res["load_rss_gb"] = probe.rss_now_gb()
    res["load_peak_rss_gb"] = probe.peak_rss_kb() * 1024 / 1e9  # loading's own peak (quantizing at load)
    image = fixtures.make_image(pathlib.Path(spec["image"]))
    ids = eng.generate_ids(fixtures.messages_for(image), max_new_tokens=spec.get("new_tokens", 16), ignore_eos=True)
    res["new_tokens"], res["prompt_tokens"] = len(ids), eng.last_stats.prompt_tokens
    if plan is not None:
        from qvl.runtime.plan import peak_for, read_checkpoint

        res["plan"]["peak_for_request_bytes"] = peak_for(plan, read_checkpoint(spec["ckpt"]), res["prompt_tokens"],
                                                         fixtures.IMAGE_SIZE**2, eng.options.prefill_chunk)
    res["answer"] = ids
    res["request_peak_rss_gb"] = probe.peak_rss_kb() * 1024 / 1e9  # before the teacher-forced pass below
    if spec.get("logprobs"):  # KL's rows: over the prompt's text and ``answer`` (default: this answer)
        import torch

        rows, targets = eng.text_logprobs(fixtures.messages_for(image), spec.get("answer") or ids)
        torch.save({"rows": rows, "targets": targets}, spec["logprobs"])


def run_budgets(ckpt: pathlib.Path, budgets, repeats: int, image: pathlib.Path) -> list[dict]:
    rows = []
    for b in budgets:
        for rep in range(repeats):
            opts = {"dtype": "bfloat16", "memory_budget": f"{b}GB"}
            r = harness.run(engine_worker, {"ckpt": str(ckpt), "options": opts, "image": str(image), "threads": 2},
                            timeout=1800, label=f"budget-{b}GB-{rep}")
            r.update(budget_gb=b, repeat=rep, options=opts)
            rows.append(r)
            log.info("budget %s GB: %s", b, {k: r.get(k) for k in ("max_seq_len", "peak_rss_gb", "error")})
    return rows


GOAL_GB = 2.0  # issue #24: the smallest footprint with an int4 decoder, 8-bit head, tower and cache
SMALLEST = {"int4 decoder, int8 head": {"head": "int8"},
            "int4 decoder, int8 head, int8 tower, int8 KV": {"head": "int8", "vision_quant": "int8",
                                                              "kv_cache_dtype": "int8"}}


def smallest(ckpt: pathlib.Path, ref: pathlib.Path, image: pathlib.Path, work: pathlib.Path) -> list[dict]:
    """4k context, the 448 x 448 picture, the caches off: each SMALLEST configuration's planned and
    measured peak (of its own greedy answer), and KL against the bf16 checkpoint, teacher-forced
    over the prompt and the bf16 model's answer."""
    import torch

    from qvl.runtime.options import option_names

    base = {"dtype": "bfloat16", "max_seq_len": 4096, "prefix_cache_mb": 0, "vision_cache_mb": 0}
    ref_path = work / "float.pt"
    f = harness.run(engine_worker, {"ckpt": str(ref), "options": base, "image": str(image), "threads": 2,
                                    "logprobs": str(ref_path)}, timeout=1800, label="float")
    rows = []
    for name, extra in SMALLEST.items():
        row = {"config": name, "options": {**base, **extra}}
        rows.append(row)
        if not set(extra) <= set(option_names()):
            row["error"] = f"awaits {', '.join(sorted(set(extra) - set(option_names())))}"
            continue
        got_path = work / f"small{len(rows)}.pt"
        r = harness.run(engine_worker, {"ckpt": str(ckpt), "options": {**base, **extra, "memory_budget": "8GB"},
                                        "image": str(image), "threads": 2, "answer": f.get("answer"),
                                        "logprobs": str(got_path) if "error" not in f else None},
                        timeout=1800, label=f"smallest-{len(rows)}")
        row.update(r)
        if "error" in r or "error" in f:
            row["kl_error"] = f.get("error")
            continue
        got, want = torch.load(got_path), torch.load(ref_path)
        assert torch.equal(got["targets"], want["targets"])
        lp_ref, lp = want["rows"], got["rows"]
        row["kl"] = float((lp_ref.exp() * (lp_ref - lp)).sum(-1).mean())
        row["top1"] = float((lp_ref.argmax(-1) == lp.argmax(-1)).float().mean())
        row["kl_tokens"] = int(len(want["targets"]))
        row["float_request_peak_rss_gb"] = f.get("request_peak_rss_gb")
    return rows


def replan(result: dict, ckpt: pathlib.Path) -> None:
    """Recompute every row's plan figures from the checkpoint's headers with the plan as it is now,
    keeping the measurements (a plan change is checked against the same peaks without re-running)."""
    from qvl.quant import cpu
    from qvl.runtime.plan import make_plan, peak_for, read_checkpoint

    info = read_checkpoint(ckpt)
    for r in result.get("budgets", []) + result.get("smallest", []):
        if "plan" not in r:
            continue
        opts = dict(r.get("options") or {"dtype": "bfloat16", "memory_budget": f"{r['budget_gb']}GB"})
        budget = opts.pop("memory_budget", "8GB")
        plan = make_plan(info, budget, qvl_kernel=cpu.isa() is not None, **opts)
        r["plan"].update({k: getattr(plan, k) for k in ("total_bytes", "weights_bytes", "max_seq_len", "max_batch",
                                                         "max_pixels", "prefix_cache_mb", "vision_cache_mb")},
                         parts=dict(plan.parts),
                         peak_for_request_bytes=peak_for(plan, info, r["prompt_tokens"], fixtures.IMAGE_SIZE**2))
    result["replanned"] = True


# --------------------------------------------------------------------------------------------
# report


def _markdown(result: dict) -> str:
    lines = [f"# Memory plan vs measured peak", "",
             f"Generated {_dt.date.today().isoformat()} by `python -m qvl.bench.memory` on "
             f"{result['machine']['cpu_model']} ({result['machine']['usable_cores']} cores, torch "
             f"{result['machine']['torch']}). Peaks are `VmHWM` of a fresh process; GB = 10^9 bytes."
             + (" The plan figures were recomputed from the checkpoint's headers after the run "
                "(`--replan-from`); the measurements are the run's." if result.get("replanned") else ""), ""]
    if result.get("fit"):
        f = result["fit"]
        lines += ["## Vision tower activations (one call, fresh process each)", "",
                  f"Peak = units x patches x embed_dim x element size + {f['plan_fixed_bytes'] / 1e6:.0f} MB; "
                  f"least squares over the rows: {f['fitted_units']:.2f} units, the plan uses {f['plan_units']}. "
                  "Towers of depth 2 with random weights (the peak is one block's: depth does not move it), "
                  "glibc's mmap threshold pinned at 1 MiB as a budgeted engine pins it.", ""]
        lines += report.table(["embed_dim", "dtype", "patches", "measured MB", "planned MB", "planned / measured"],
                              [[r["embed_dim"], r["dtype"], r["patches"], f"{r['peak_bytes'] / 1e6:.1f}",
                                f"{r['planned_bytes'] / 1e6:.1f}", f"{1 + r['error']:.2f}"] for r in f["rows"]],
                              align="rlrrrr")
        lines.append("")
    if result.get("budgets"):
        lines += ["## Budgets: the 2B shapes, GPTQ-int4 decoder, bf16 (one 448 x 448 picture, 16 new tokens)", ""]
        rows = []
        for r in result["budgets"]:
            p = r.get("plan") or {}
            rows.append([f"{r['budget_gb']} GB", "refused" if "error" in r else "fits",
                         r.get("max_seq_len", "-"), r.get("max_batch", "-"), fmt(p.get("max_pixels"), "{}"),
                         fmt(p.get("prefix_cache_mb"), "{:.0f}"), fmt(p.get("vision_cache_mb"), "{:.0f}"),
                         fmt(p.get("total_bytes") and p["total_bytes"] / 1e9),
                         fmt(p.get("peak_for_request_bytes") and p["peak_for_request_bytes"] / 1e9),
                         fmt(r.get("request_peak_rss_gb")),
                         fmt(p.get("peak_for_request_bytes") and r.get("request_peak_rss_gb")
                             and r["request_peak_rss_gb"] * 1e9 / p["peak_for_request_bytes"])])
        lines += report.table(["budget", "plan", "max_seq_len", "max_batch", "largest picture (px)", "prefix MB",
                               "vision MB", "planned GB (full context)", "planned GB (this request)",
                               "measured GB", "measured / planned"], rows, align="llrrrrrrrrr")
        lines += ["", "Planned (full context): the plan's peak, the caches counted full and a prompt that fills "
                  "max_seq_len; (this request): the same with this prompt's length, the one the fresh process ran."]
        refusals = [r for r in result["budgets"] if "error" in r]
        for r in refusals[:1]:
            lines += ["", f"Refusal at {r['budget_gb']} GB: `{r['error']}`"]
        lines.append("")
    if result.get("smallest"):
        lines += ["## Smallest footprint: 448 x 448 picture, 4k context, caches off (bf16 activations)", ""]
        rows = []
        for r in result["smallest"]:
            p, m = r.get("plan") or {}, r.get("request_peak_rss_gb")
            this = p.get("peak_for_request_bytes")
            rows.append([r["config"], r.get("error") or fmt(m), fmt(r.get("load_peak_rss_gb")),
                         fmt(p.get("total_bytes") and p["total_bytes"] / 1e9),
                         fmt(this and this / 1e9), fmt(this and m and m * 1e9 / this), fmt(r.get("kl"), "{:.2e}"),
                         fmt(r.get("top1"), "{:.3f}"), r.get("kl_tokens", "-")])
        lines += report.table(["configuration", "measured GB", "peak at load GB", "planned GB (full context)",
                               "planned GB (this request)", "measured / planned", "KL vs bf16", "top-1", "positions"],
                              rows, align="lrrrrrrrr")
        lines += ["", "Measured: the process's peak through loading and one answer; at load: the peak "
                  "when the engine was ready (quantizing the head and tower at load). KL per position (and top-1 "
                  "agreement) over the text of the prompt and the bf16 model's greedy answer, teacher-forced, "
                  "against the bf16 checkpoint the int4 one was rounded from; the weights are random, so it says "
                  "what the rounding does, not a trained model's quality. With tied embeddings and a quantized "
                  "head the token lookup reads the head's rows: the bf16 table (0.47 GB) is not held."]
        peaks = [r["request_peak_rss_gb"] for r in result["smallest"] if r.get("request_peak_rss_gb")]
        if peaks:
            low = min(peaks)
            lines += ["", f"Goal <= {GOAL_GB:.2f} GB: the smallest peak is {low:.3f} GB, "
                      + ("met." if low <= GOAL_GB else f"over by {(low - GOAL_GB) * 1e3:.0f} MB.")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", action="store_true", help="measure the vision tower's activations")
    ap.add_argument("--fit-from", metavar="JSON", help="the fit's rows from an earlier memory.json (not re-measured)")
    ap.add_argument("--no-engines", action="store_true", help="only the fit")
    ap.add_argument("--replan-from", metavar="JSON", help="an earlier memory.json's measurements, planned anew")
    ap.add_argument("--budgets", type=float, nargs="+", default=[2, 3, 4])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    harness.setup()
    out = pathlib.Path(args.out)
    result = {"machine": probe.machine_info()}
    if args.fit:
        result["fit"] = fit()
        log.info("fitted units %s (plan: %s)", result["fit"]["fitted_units"], result["fit"]["plan_units"])
    elif args.fit_from:
        import json

        result["fit"] = json.loads(pathlib.Path(args.fit_from).read_text())["fit"]
    if args.replan_from:
        import json

        from qvl.bench.quant import ensure_quantized

        result = json.loads(pathlib.Path(args.replan_from).read_text())
        replan(result, ensure_quantized(fixtures.ensure_checkpoint("qwen2vl-2b"), "gptq-int4", 128))
    elif not args.no_engines:
        from qvl.bench.quant import ensure_quantized

        ref = fixtures.ensure_checkpoint("qwen2vl-2b")
        ckpt = ensure_quantized(ref, "gptq-int4", 128)
        work = fixtures.cache_root() / "memory"
        work.mkdir(parents=True, exist_ok=True)
        image = work / "picture.png"
        result["budgets"] = run_budgets(ckpt, args.budgets, args.repeats, image)
        result["smallest"] = smallest(ckpt, ref, image, work)
    report.write_outputs(result, _markdown(result), out, "memory")
    log.info("wrote %s", out / "memory.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
