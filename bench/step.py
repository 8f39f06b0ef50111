"""Where a decode step's time goes: the large matrix products (the quantized linears and the head)
against everything else (norms, rope, attention, the KV write, the embedding, argmax, Python).

Run as ``python -m qvl.bench.step [--models 2b-int4] [--batches 1,4] [--before REV]``.

Each step is ``ModelRunner.decode`` over B live slots at ~``--context`` cached tokens, then the
argmax of its logits (greedy sampling). Three kinds of step run interleaved (rotating order, the
same positions), so host contention hits them alike:

* plain: nothing patched; its median is the step time (with the layers as one C call,
  ``CpuDecodeOps.layers``, where the model allows it).
* timed: the layers' per-operation path (the same C kernels, one call each), every linear, norm,
  attention, MLP, layer, KV write, embedding, rope table and SDPA call wrapped in
  ``perf_counter`` (the CPU kernels are synchronous), each category charged its own time without
  its children's. Linears + head subtracted from the plain step is the overhead.
* noop: the per-operation path with the linears and the head replaced by a zero output of the right shape; the step left is
  a second estimate of the overhead (a lower one: the weights no longer push the activations,
  cache rows and small tensors out of the CPU caches).

``--before REV`` measures REV's model code too: a git worktree of REV under /tmp with this file
copied in, the two trees in alternating fresh processes, each its own model load.
Results: bench/results/step.md and .json.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import shutil
import statistics
import subprocess
import tempfile
import time
from types import SimpleNamespace

from qvl.bench import fixtures, harness, probe, report
from qvl.bench.report import fmt

log = logging.getLogger("qvl.bench.step")

MODES = ("plain", "timed", "noop")
MATMULS = ("linears", "head")
# overhead categories, in the order the report lists them
PARTS = ("norm", "rope_tables", "attention", "sdpa", "kv_cache", "mlp_act", "residual", "embed", "model", "runner")


class _Clock:
    """Exclusive (self) time per category across nested wrapped calls."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.stack: list[float] = []  # children's time of each open call

    def wrap(self, category: str, fn):
        def timed(*args, **kwargs):
            self.stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                children = self.stack.pop()
                self.totals[category] = self.totals.get(category, 0.0) + elapsed - children
                if self.stack:
                    self.stack[-1] += elapsed
        return timed


def _zeros(m):
    out = m.out_features

    def forward(x):
        return x.new_zeros(*x.shape[:-1], out)
    return forward


_ABSENT = object()


class _Patches:
    """Instance-level overrides of ``forward`` (or another method), installed and removed per step."""

    def __init__(self):
        self.undo: list = []

    def set(self, obj, name: str, fn):
        self.undo.append((obj, name, vars(obj).get(name, _ABSENT)))
        setattr(obj, name, fn)

    def remove(self):
        for obj, name, old in reversed(self.undo):
            if old is _ABSENT:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        self.undo.clear()


def _categories(model, runner):
    """(object, method name, category) of everything the timed step wraps."""
    from torch import nn

    from qvl.model.decoder import MLP, Attention, DecoderLayer, RMSNorm
    from qvl.model.rope import MRope
    from qvl.quant.linear import QuantLinear

    out = [(runner, "decode", "runner"), (runner, "step", "runner"), (model, "forward", "model"),
           (model.embed_tokens, "forward", "embed"), (model.lm_head, "forward", "head")]
    kinds = ((QuantLinear, "linears"), (nn.Linear, "linears"), (RMSNorm, "norm"), (Attention, "attention"),
             (MLP, "mlp_act"), (DecoderLayer, "residual"), (MRope, "rope_tables"))
    for m in [model.norm, model.rope, *model.layers.modules()]:
        cat = next((c for t, c in kinds if isinstance(m, t)), None)
        if cat is not None:
            out += [(m, name, cat) for name in ("forward", "decode") if hasattr(m, name)]
        if isinstance(m, Attention) and m.kv_cache is not None:
            out.append((m.kv_cache, "update", "kv_cache"))
        out += [(m, name, "linears") for name in _fused_names(m)]
    ops = getattr(model, "decode_ops", None)  # the fused C calls (qvl.quant.decode_ops), where loaded
    if ops is not None:
        out += [(ops, "rms_norm", "norm"), (ops, "silu_mul", "mlp_act"), (ops, "attention", "attention")]
    return out


def _declined(*args, **kwargs):
    """``CpuDecodeOps.layers`` turned off: the model runs its layers' ``decode`` instead."""
    return None


def _fused_names(m) -> list[str]:
    """The attributes of ``m`` holding fused linears (one kernel call for several, not modules)."""
    return [name for name in ("wqkv", "w_gate_up") if getattr(m, name, None) is not None]


@harness.worker
def step_worker(spec: dict, res: dict) -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from qvl.quant.linear import QuantLinear
    from qvl.runtime.loader import load_model
    from qvl.runtime.runner import ModelRunner

    model = load_model(spec["ckpt"], dtype=spec["dtype"], vision=False, quant_kernel=spec["kernel"])
    batches, ctx, steps = spec["batches"], spec["context"], spec["steps"]
    max_b = max(batches)
    model.setup_caches(max_b, ctx + max_b + steps + 8, model.embed_tokens.weight.dtype)
    cfg = model.cfg
    runner = ModelRunner(model, None, cfg.image_token_id, cfg.video_token_id, "cpu", decode_kv=spec["decode_kv"])
    linears = [m for m in model.layers.modules() if isinstance(m, (nn.Linear, QuantLinear))]
    fused = [(m, name) for m in model.layers.modules() for name in _fused_names(m)]
    joined = {id(p) for m, name in fused for p in getattr(m, name).parts}
    res["linears_per_step"] = len(linears) - len(joined) + len(fused) + 1  # kernel calls, the head's included
    res["kernels"] = sorted({getattr(m, "kernel", "dense") for m in linears})
    wrapped = _categories(model, runner)
    ops = getattr(model, "decode_ops", None)
    res["batches"] = {}
    with torch.inference_mode():
        for b in batches:
            seqs = [SimpleNamespace(slot=i, last=100 + i, length=ctx + i, delta=0) for i in range(b)]
            samples = {mode: [] for mode in MODES}
            for step in range(steps + 2):  # two warm-up steps
                lengths = [s.length for s in seqs] + [0] * (max_b - b)
                order = MODES[step % 3:] + MODES[:step % 3]
                for mode in order:
                    patches, clock = _Patches(), _Clock()
                    if mode != "plain" and hasattr(ops, "layers"):  # per-operation calls, so each is seen
                        patches.set(ops, "layers", _declined)
                    if mode == "timed":
                        for obj, name, cat in wrapped:
                            patches.set(obj, name, clock.wrap(cat, getattr(obj, name)))
                        patches.set(F, "scaled_dot_product_attention", clock.wrap("sdpa", F.scaled_dot_product_attention))
                    elif mode == "noop":
                        for m in [*linears, model.lm_head]:
                            patches.set(m, "forward", _zeros(m))
                        for m, name in fused:
                            patches.set(m, name, _zeros(getattr(m, name)))
                    try:
                        t0 = time.perf_counter()
                        tok = runner.decode(seqs, lengths).argmax(-1)
                        total = time.perf_counter() - t0
                    finally:
                        patches.remove()
                    if mode == "plain":
                        nxt = tok
                    if step >= 2:
                        samples[mode].append(dict(clock.totals, total=total))
                for s in seqs:
                    s.last, s.length = int(nxt[s.slot]), s.length + 1
            res["batches"][str(b)] = samples


def summarize(samples: dict) -> dict:
    """Medians (ms) of one batch size's per-step samples, pooled over runs."""
    def med(mode, key):
        vals = [1e3 * s.get(key, 0.0) for s in samples[mode]]
        return statistics.median(vals) if vals else None

    timed_total = med("timed", "total")
    out = {"step_ms": med("plain", "total"), "timed_step_ms": timed_total, "noop_step_ms": med("noop", "total"),
           "steps": len(samples["plain"])}
    for k in MATMULS:
        out[f"{k}_ms"] = med("timed", k)
    out["matmul_ms"] = out["linears_ms"] + out["head_ms"]
    out["overhead_ms"] = out["step_ms"] - out["matmul_ms"]
    # the timed step's own overhead, part by part; "other" is what no wrapper covers (argmax, the loop)
    parts = {p: med("timed", p) for p in PARTS}
    parts["other"] = timed_total - out["matmul_ms"] - sum(parts.values())
    out["parts_ms"] = parts
    return out


def measure(spec: dict, variants: dict[str, pathlib.Path | None], rounds: int, timeout: float) -> dict:
    """``variants``: name -> the directory holding the ``qvl`` package to import (None: this one),
    run in alternating fresh processes, ``rounds`` each; per batch, samples pooled over the rounds."""
    pooled = {v: {} for v in variants}
    runs = {v: [] for v in variants}
    names = list(variants)
    for r in range(rounds):
        for v in names[r % len(names):] + names[:r % len(names)]:
            env = {"PYTHONPATH": str(variants[v])} if variants[v] is not None else None
            got = harness.run(step_worker, spec, timeout=timeout, env=env, label=f"{v}#{r}")
            runs[v].append({k: got.get(k) for k in ("error", "child_wall_s", "other_cpu_share", "kernels")})
            if "error" in got:
                continue
            pooled[v]["kernels"] = got["kernels"]
            pooled[v]["linears_per_step"] = got["linears_per_step"]
            for b, samples in got["batches"].items():
                acc = pooled[v].setdefault("samples", {}).setdefault(b, {m: [] for m in MODES})
                for m in MODES:
                    acc[m] += samples[m]
    out = {}
    for v in names:
        p = pooled[v]
        out[v] = {"runs": runs[v], "kernels": p.get("kernels"), "linears_per_step": p.get("linears_per_step"),
                  "batches": {b: summarize(s) for b, s in p.get("samples", {}).items()}}
        if not out[v]["batches"]:
            out[v]["error"] = next((x["error"] for x in runs[v] if x.get("error")), "no result")
    return out


def worktree(rev: str) -> pathlib.Path:
    """A checkout of ``rev`` as ``<tmp>/qvl`` with this benchmark copied in; returns ``<tmp>``."""
    repo = pathlib.Path(__file__).resolve().parents[1]
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", rev], check=True, capture_output=True,
                         text=True).stdout.strip()
    root = pathlib.Path(tempfile.gettempdir()) / f"qvl-step-{sha}"
    tree = root / "qvl"
    if not tree.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), sha], check=True,
                       capture_output=True)
    shutil.copy2(__file__, tree / "bench" / "step.py")
    return root


def render(result: dict) -> str:
    lines = ["# The decode step: matrix products and everything else", "",
             f"{probe.cpu_model()}, {result['threads']} threads, {result['model']} ({result['dtype']}, quant_kernel "
             f"{result['kernel']}), decode_kv {result['decode_kv']}, ~{result['context']} cached tokens a row, "
             f"{result['steps']} steps a run x {result['rounds']} runs. Other processes used "
             f"{fmt(result.get('other_cpu_share_max'), '{:.0%}')} of the CPUs at most during a run; load average "
             f"{' / '.join(f'{x:.2f}' for x in result['machine']['loadavg_start'])} at the start.", "",
             "step = `ModelRunner.decode` + argmax, median; matmuls = the quantized linears and the head, each call "
             "timed with perf_counter inside a separately timed step (synchronous kernels); overhead = step - "
             "matmuls; noop step = the step with every linear and the head replaced by a zero output (a lower "
             "bound of the overhead: nothing evicts the small tensors from the caches). The three run interleaved "
             "step by step. The timed and noop steps take the layers' per-operation path; where the plain step "
             "runs them as one C call its kernels follow each other with their threads awake, so it can take "
             "less than the per-operation matmuls and the overhead come out negative.", ""]
    rows = []
    for v, r in result["variants"].items():
        if "error" in r:
            rows.append([v, "error: " + str(r["error"])[:80]] + [""] * 7)
            continue
        for b, s in r["batches"].items():
            rows.append([v, b, fmt(s["step_ms"], "{:.1f}"), fmt(s["linears_ms"], "{:.1f}"), fmt(s["head_ms"], "{:.1f}"),
                         fmt(s["overhead_ms"], "{:.1f}"), fmt(100 * s["overhead_ms"] / s["step_ms"], "{:.0f}%"),
                         fmt(s["noop_step_ms"], "{:.1f}"), fmt(s["timed_step_ms"], "{:.1f}")])
    lines += report.table(["code", "batch", "step ms", "linears ms", "head ms", "overhead ms", "overhead share",
                           "noop step ms", "timed step ms"], rows, "llrrrrrrr")
    lines += ["", "The overhead by part (the timed step, each part without the calls inside it; ms/step): norm = "
              "RMSNorm (with the residual add before it, in the fused C code), rope_tables = the cos/sin of the "
              "step's positions, attention = q/k/v reshapes + rotary + output reshape (in the fused C code also the "
              "KV write and the attention itself), sdpa = scaled_dot_product_attention, kv_cache = the KV write and "
              "read, mlp_act = silu x up, residual = the layers' adds, embed = the token embedding, model = the "
              "layer loop and the last position, runner = the step's inputs (tokens, positions, mask), other = argmax and what "
              "no wrapper covers.", ""]
    rows = []
    for v, r in result["variants"].items():
        for b, s in r.get("batches", {}).items():
            rows.append([v, b] + [fmt(s["parts_ms"].get(p), "{:.2f}") for p in (*PARTS, "other")])
    lines += report.table(["code", "batch", *PARTS, "other"], rows, "ll" + "r" * (len(PARTS) + 1))
    if "saved_ms" in result:
        lines += ["", "Saved per step (before - after, medians): " + "; ".join(
            f"batch {b}: step {fmt(s['step'], '{:.1f}')} ms, overhead {fmt(s['overhead'], '{:.1f}')} ms"
            for b, s in result["saved_ms"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="2b-int4", help=f"one of {', '.join(fixtures.BENCH_MODELS)}")
    ap.add_argument("--kernel", default="auto", help="quant_kernel of the quantized linears")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--context", type=int, default=256, help="cached tokens a row before the first step")
    ap.add_argument("--steps", type=int, default=16, help="timed steps a run (after two warm-up steps)")
    ap.add_argument("--rounds", type=int, default=1, help="fresh processes per code variant, alternating")
    ap.add_argument("--decode-kv", default="live", choices=("live", "full"))
    ap.add_argument("--before", default=None, help="a git revision whose model code is measured too")
    ap.add_argument("--after", default=None, help="with --before: a revision instead of this working tree")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    harness.setup()
    try:
        ckpt, dtype = fixtures.bench_model(args.models)
    except ValueError as e:
        ap.error(str(e))
    probe.warm_page_cache(ckpt)
    spec = {"ckpt": str(ckpt), "dtype": dtype, "kernel": args.kernel, "context": args.context, "steps": args.steps,
            "batches": [int(b) for b in args.batches.split(",")], "decode_kv": args.decode_kv,
            "threads": probe.usable_cores()}
    variants: dict[str, pathlib.Path | None] = {}
    if args.before:
        variants[f"before ({args.before})"] = worktree(args.before)
    if args.before and args.after:
        variants[f"after ({args.after})"] = worktree(args.after)
    else:
        variants["after" if args.before else "tree"] = None
    result = {"threads": spec["threads"], "machine": probe.machine_info(), "model": args.models, "dtype": dtype,
              "kernel": args.kernel, "context": args.context, "steps": args.steps, "rounds": args.rounds,
              "decode_kv": args.decode_kv, "loadavg_end": None}
    result["variants"] = measure(spec, variants, args.rounds, args.timeout)
    result["loadavg_end"] = list(os.getloadavg())
    shares = [x["other_cpu_share"] for r in result["variants"].values() for x in r["runs"]
              if x.get("other_cpu_share") is not None]
    result["other_cpu_share_max"] = max(shares) if shares else None
    if args.before:
        before, after = (result["variants"][v].get("batches", {}) for v in variants)
        result["saved_ms"] = {b: {"step": before[b]["step_ms"] - after[b]["step_ms"],
                                  "overhead": before[b]["overhead_ms"] - after[b]["overhead_ms"]}
                              for b in after if b in before}
    md = render(result)
    report.write_outputs(result, md, pathlib.Path(args.out), "step")
    print(md)
    return 0 if all("error" not in r for r in result["variants"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
