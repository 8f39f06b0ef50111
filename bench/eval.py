"""``qvl eval``: accuracy and fidelity of checkpoints on a JSONL task set, side by side.

    qvl eval MODEL_A [MODEL_B ...] --data FILE.jsonl [--limit N] [--out DIR]

A model is a checkpoint directory, optionally ``DIR@dtype`` (``DIR@bfloat16``) to compare one
checkpoint at several precisions. Each dataset line is a JSON object::

    {"id": "...", "task": "...", "answers": ["..."], "metric": "exact" | "anls" | "mc",
     "question": "...", "image": PATH | "images": [PATH, ...] | "video": PATH or [frame PATHs],
     "options": ["...", ...] or {"A": "...", ...}}        # options: "mc" only
or with ``"messages"`` (a qwen-vl-utils conversation ending in a user turn) in place of
``question``/``image(s)``/``video``. Relative paths are relative to the JSONL file.

Metrics (all in [0, 1], averaged per task; the headline is the mean over tasks):
  exact  normalized string equality with any answer (lowercase, whitespace collapsed, a trailing
         period dropped);
  anls   DocVQA's Average Normalized Levenshtein Similarity: max over answers of 1 - NL, where
         NL = edit distance / longer length, counted as 0 when NL >= 0.5;
  mc     the option letter read from the answer ("B", "(B)", "B. text" or the option's text),
         MMBench-style prompt appended from ``options``.

The first model is the reference. It answers greedily; every model, the reference included, is
then scored teacher-forced on the reference's answer tokens (``Engine.score``), giving the
token-level KL(reference || model) averaged over answer tokens, and top-1 agreement (how often
the two argmaxes agree). Log-probs are exchanged through ``--out``/ref as float32 .npy files,
``answer tokens x vocab`` each (the reason to use ``--limit`` with 150k-token vocabularies).
``--text-kl`` adds the same two figures over every text token of each chat (system prompt,
question, chat markup and the reference's answer; ``Engine.text_logprobs``, one causal pass):
hundreds of positions where the answers give a few, at the cost of storing them.

Each model runs in its own subprocess (:mod:`qvl.bench.harness`), so ``peak RSS`` is that
process's own peak (``VmHWM``) and ``model RSS`` its peak minus the RSS it had after imports,
before loading the model (weights, KV cache and activations; CUDA runs report
``torch.cuda.max_memory_allocated`` as well).
``--in-process`` skips the subprocesses (faster; memory figures then accumulate across models).
Speed: decode tok/s = (new tokens - 1) / decode time summed over the set, first-token latency
averaged, after one warm-up answer; batch 1, greedy. Size: the weight files on disk, and the
model's tensors as loaded (what ``@dtype`` changes; the plot's x axis).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from qvl.bench import harness, report
from qvl.bench.probe import peak_rss_kb, status_kb
from qvl.export.tasks import load_records, score

log = logging.getLogger(__name__)

# --- one model -------------------------------------------------------------------------------

def weights_mb(model_dir) -> float:
    files = [f for pat in ("*.safetensors", "*.onnx", "*.bin", "*.pt") for f in Path(model_dir).glob(pat)]
    return sum(f.stat().st_size for f in files) / 1e6


def loaded_weights_mb(model) -> float:
    """Bytes of the model's persistent tensors as loaded (tied weights once, no KV cache)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 1e6


def parse_model(spec: str) -> tuple[str, str | None]:
    """``DIR`` or ``DIR@dtype``."""
    if "@" in spec and not Path(spec).exists():
        path, dtype = spec.rsplit("@", 1)
        return path, dtype
    return spec, None


def _progress(items, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(items, desc=desc, mininterval=1.0, file=sys.stderr)
        return
    step = max(1, len(items) // 10)
    for i, item in enumerate(items):
        if i % step == 0:
            log.info("%s: %d/%d", desc, i, len(items))
        yield item


def run_model(spec: str, records: list[dict], ref_dir: Path, is_reference: bool, device: str = "cpu",
              dtype: str = "float32", max_new_tokens: int = 32, max_seq_len: int = 4096,
              text_kl: bool = False) -> dict:
    """Answer and score every record with one model; the reference also writes ``ref_dir``."""
    import numpy as np
    import torch

    import qvl

    path, spec_dtype = parse_model(spec)
    dtype = spec_dtype or dtype
    rss_before = status_kb("VmRSS")
    t0 = time.perf_counter()
    # every record prefilled in full: a score must not depend on which records ran before it
    engine = qvl.load(path, device=device, dtype=dtype, max_seq_len=max_seq_len, prefix_cache_mb=0)
    load_s = time.perf_counter() - t0
    engine.generate(records[0]["messages"], max_new_tokens=max_new_tokens)  # warm-up, not timed
    answers_file = ref_dir / "answers.json"
    ref_answers = None if is_reference else json.loads(answers_file.read_text())
    rows, own_answers = [], {}
    new_tok = decode_s = first_s = 0.0
    kl_sum = agree = n_tok = 0
    tkl_sum = tagree = t_tok = 0
    kl_ok = True
    for i, rec in enumerate(_progress(records, Path(path).name)):
        row = {"id": rec["id"], "task": rec["task"]}
        try:
            ids = engine.generate_ids(rec["messages"], max_new_tokens=max_new_tokens)
        except (ValueError, NotImplementedError, ImportError) as e:  # e.g. a video this build cannot read
            row.update(skipped=str(e))
            rows.append(row)
            continue
        s = engine.last_stats
        new_tok += max(s.new_tokens - 1, 0)
        decode_s += s.decode_s
        first_s += s.prefill_s
        pred = engine.tokenizer.decode(ids)
        row.update(prediction=pred, score=score(rec["metric"], pred, rec["answers"], rec["options"]))
        if is_reference:
            own_answers[rec["id"]] = ids
            lp = engine.score(rec["messages"], ids)
            np.save(ref_dir / f"lp{i}.npy", lp.numpy())
            if text_kl:
                np.save(ref_dir / f"text{i}.npy", engine.text_logprobs(rec["messages"], ids)[0].numpy())
        elif ref_answers is not None and rec["id"] in ref_answers and kl_ok:
            ref_lp = torch.from_numpy(np.load(ref_dir / f"lp{i}.npy"))
            lp = engine.score(rec["messages"], ref_answers[rec["id"]])
            if lp.shape != ref_lp.shape:
                log.warning("%s: vocabulary of %d vs the reference's %d: no KL / top-1", path, lp.shape[1],
                            ref_lp.shape[1])
                kl_ok = False
            else:
                kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1)  # KL(ref || model) per answer token
                kl_sum += float(kl.sum())
                agree += int((ref_lp.argmax(-1) == lp.argmax(-1)).sum())
                n_tok += len(kl)
                if text_kl:
                    ref_t = torch.from_numpy(np.load(ref_dir / f"text{i}.npy"))
                    lt = engine.text_logprobs(rec["messages"], ref_answers[rec["id"]])[0]
                    tkl_sum += float((ref_t.exp() * (ref_t - lt)).sum())
                    tagree += int((ref_t.argmax(-1) == lt.argmax(-1)).sum())
                    t_tok += len(lt)
        rows.append(row)
    if is_reference:
        answers_file.write_text(json.dumps(own_answers))
        kl_mean, top1 = 0.0, 1.0  # by construction: the reference scored against itself
        text = (0.0, 1.0) if text_kl else (None, None)
    else:
        kl_mean = kl_sum / n_tok if (kl_ok and n_tok) else None
        top1 = agree / n_tok if (kl_ok and n_tok) else None
        text = (tkl_sum / t_tok, tagree / t_tok) if (text_kl and kl_ok and t_tok) else (None, None)
    answered = [r for r in rows if "score" in r]
    result = {
        "model": spec, "path": str(path), "dtype": dtype, "device": device,
        "weights_mb": weights_mb(path), "loaded_weights_mb": loaded_weights_mb(engine.model), "load_s": load_s,
        "peak_rss_mb": peak_rss_kb() / 1024,
        "model_rss_mb": None, "kl": kl_mean, "top1": top1, "kl_tokens": n_tok,
        "kl_text": text[0], "top1_text": text[1], "kl_text_tokens": t_tok,
        "decode_tok_s": new_tok / decode_s if (decode_s > 0 and new_tok) else None,
        "first_token_ms": 1000 * first_s / len(answered) if answered else None,
        "rows": rows,
    }
    if rss_before is not None:
        result["model_rss_mb"] = result["peak_rss_mb"] - rss_before / 1024
    if torch.device(device).type == "cuda":
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if is_reference:
        # the reference's own score must reproduce its greedy choices; if not, generate and
        # score disagree and every KL below would be meaningless
        for i, rec in enumerate(records):
            if rec["id"] in own_answers:
                lp = np.load(ref_dir / f"lp{i}.npy")
                if list(lp.argmax(-1)) != own_answers[rec["id"]]:
                    log.warning("reference: teacher-forced argmax differs from its greedy answer on %s", rec["id"])
    return result


@harness.worker
def model_worker(spec: dict, res: dict) -> None:
    """:func:`run_model` in a fresh process; ``spec`` holds its arguments and the set's path."""
    spec = dict(spec)
    logging.getLogger().setLevel(logging.INFO if spec.pop("verbose") else logging.WARNING)
    records = load_records(spec.pop("data"), spec.pop("limit"))
    res.update(run_model(spec.pop("model"), records, Path(spec.pop("ref_dir")), **spec))


# --- side by side ----------------------------------------------------------------------------

def summarize(result: dict, records: list[dict]) -> dict:
    """Per-task mean scores (None for a task whose every record was skipped) and their mean."""
    by_task: dict[str, list] = {}
    skipped: dict[str, int] = {}
    for row in result["rows"]:
        by_task.setdefault(row["task"], [])
        if "score" in row:
            by_task[row["task"]].append(row["score"])
        else:
            skipped[row["task"]] = skipped.get(row["task"], 0) + 1
    tasks = {t: (sum(v) / len(v) if v else None) for t, v in by_task.items()}
    scored = [a for a in tasks.values() if a is not None]
    result["tasks"] = tasks
    result["task_n"] = {t: len(v) for t, v in by_task.items()}
    result["skipped"] = skipped
    result["accuracy"] = sum(scored) / len(scored) if scored else None
    return result


class EvalError(RuntimeError):
    """One or more models failed; ``summary`` holds the models that finished (also on disk)."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def evaluate(models: list[str], data, limit: int | None = None, out="qvl-eval", device: str = "cpu",
             dtype: str = "float32", max_new_tokens: int = 32, max_seq_len: int = 4096,
             in_process: bool = False, verbose: bool = False, plot: bool = True, text_kl: bool = False) -> dict:
    """Run every model on the set; write results.json, results.md and accuracy_vs_size.png to ``out``.

    results.json and results.md are rewritten after each model, so a later failure (or Ctrl-C)
    leaves the finished models on disk. A failed model is listed under ``failed`` and the others
    still run, unless it is the reference, whose answers they are scored against; then
    ``EvalError`` carries the summary.
    """
    from qvl.runtime.loader import check_device

    if not models:
        raise ValueError("name at least one model")
    for m in models:
        if not (Path(parse_model(m)[0]) / "config.json").exists():
            raise FileNotFoundError(f"{parse_model(m)[0]}: not a checkpoint directory (no config.json)")
    check_device(device)  # one line, before any worker: a worker's failure echoes its traceback
    records = load_records(data, limit)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = _names(models)
    summary = {"data": str(data), "n": len(records), "tasks": list(dict.fromkeys(rec["task"] for rec in records)),
               "reference": names[0], "in_process": in_process, "models": [], "failed": []}
    kw = dict(device=device, dtype=dtype, max_new_tokens=max_new_tokens, max_seq_len=max_seq_len, text_kl=text_kl)
    with tempfile.TemporaryDirectory(prefix="ref-", dir=out) as ref_dir:
        for k, (model, name) in enumerate(zip(models, names)):
            if in_process:
                res = _run_in_process(model, records, Path(ref_dir), k == 0, verbose, kw)
            else:
                res = _run_subprocess(model, data, limit, Path(ref_dir), k == 0, verbose, kw)
            if "error" in res:
                summary["failed"].append({"name": name, "model": model, "error": res["error"]})
            else:
                summary["models"].append(dict(summarize(res, records), name=name))
            _write_results(summary, out)
            if k == 0 and "error" in res:
                break
    if plot and summary["models"]:
        try:
            plot_results(summary, out / "accuracy_vs_size.png")
        except ImportError:
            log.warning("matplotlib is not installed (pip install 'qvl[eval]'): no plot")
    if summary["failed"]:
        msg = "; ".join(f"{f['name']} failed: {f['error']}" for f in summary["failed"])
        if summary["models"]:
            msg += f"; results of the {len(summary['models'])} that finished: {out / 'results.json'}"
        elif len(models) > 1:
            msg += "; the others did not run: they are scored against the reference's answers"
        raise EvalError(msg, summary)
    return summary


def _write_results(summary: dict, out: Path) -> None:
    report.write_atomic(out / "results.json", json.dumps(summary, indent=1) + "\n")
    report.write_atomic(out / "results.md", markdown(summary))


def _run_in_process(model, records, ref_dir: Path, is_reference: bool, verbose: bool, kw: dict) -> dict:
    try:
        return run_model(model, records, ref_dir, is_reference, **kw)
    except Exception as e:  # noqa: BLE001 - reported as the model's failure, as a worker's is
        log.error("%s: %s", model, e, exc_info=verbose)
        return {"error": f"{type(e).__name__}: {e}"}


def _run_subprocess(model, data, limit, ref_dir: Path, is_reference: bool, verbose: bool, kw: dict) -> dict:
    """The worker's result; ``error`` when it failed (the harness has echoed its output)."""
    return harness.run(model_worker, {"model": model, "data": str(data), "limit": limit, "ref_dir": str(ref_dir),
                                      "is_reference": is_reference, "verbose": verbose, **kw},
                       label=Path(parse_model(model)[0]).name)


def _names(models: list[str]) -> list[str]:
    names = []
    for m in models:
        path, dtype = parse_model(m)
        name = Path(path).resolve().name + (f"@{dtype}" if dtype else "")
        names.append(name if name not in names else f"{name}#{len(names)}")
    return names


def _fmt(x, spec: str, none: str = "n/a") -> str:
    return report.fmt(x, "{:" + spec + "}", none)


def markdown(summary: dict) -> str:
    models = summary["models"]
    text = any(r.get("kl_text") is not None for r in models)
    lines = [f"## qvl eval: {summary['data']} ({summary['n']} items; reference {summary['reference']})", "",
             "| model | accuracy | KL vs ref | top-1 vs ref | " + ("KL text | top-1 text | " if text else "")
             + "weights MB (disk / loaded) | peak RSS MB | model RSS MB | decode tok/s | first token ms |",
             "|---|---|---|---|" + ("---|---|" if text else "") + "---|---|---|---|---|"]
    for r in models:
        tcols = f"{_fmt(r.get('kl_text'), '.2e')} | {_fmt(r.get('top1_text'), '.4f')} | " if text else ""
        lines.append(f"| {r['name']} | {_fmt(r['accuracy'], '.3f')} | {_fmt(r['kl'], '.2e')} | "
                     f"{_fmt(r['top1'], '.3f')} | {tcols}"
                     f"{_fmt(r['weights_mb'], '.1f')} / {_fmt(r['loaded_weights_mb'], '.1f')} | "
                     f"{_fmt(r['peak_rss_mb'], '.0f')} | "
                     f"{_fmt(r['model_rss_mb'], '.0f')} | {_fmt(r['decode_tok_s'], '.1f')} | "
                     f"{_fmt(r['first_token_ms'], '.1f')} |")
    lines += ["", "| task | n | " + " | ".join(r["name"] for r in models) + " |",
              "|---|---|" + "---|" * len(models)]
    for t in summary["tasks"]:
        cells = []
        for r in models:
            a = r["tasks"].get(t)
            skipped = r["skipped"].get(t, 0)
            note = f" ({skipped} skipped)" if skipped and a is not None else ""
            cells.append(_fmt(a, ".3f", none="skipped") + note)
        n = max((r["task_n"].get(t, 0) + r["skipped"].get(t, 0) for r in models), default=0)
        lines.append(f"| {t} | {n} | " + " | ".join(cells) + " |")
    notes = []
    if text:
        n_text = max(r.get("kl_text_tokens") or 0 for r in models)
        notes.append(f"KL / top-1 text: over every text token of each chat (prompt and the reference's answer, "
                     f"{n_text} tokens), one teacher-forced pass; the other columns: answer tokens only")
    if summary["in_process"]:
        notes.append("all models ran in one process: RSS figures include the models before them")
    for f in summary.get("failed", []):
        notes.append(f"{f['name']} failed: {f['error']}"[:300])
    skipped = {t for r in models for t in r["skipped"]}
    if skipped:
        reasons = {row["skipped"] for r in models for row in r["rows"] if "skipped" in row}
        notes.append(f"skipped items ({', '.join(sorted(skipped))}): " + "; ".join(sorted(reasons))[:300])
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"


def plot_results(summary: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = summary["models"]
    tasks = summary["tasks"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5 + 0.22 * len(models)), gridspec_kw={"width_ratios": [1, 1.6]})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*X"
    for k, r in enumerate(models):
        if r["accuracy"] is None:
            continue
        if k == 0:
            label = r["name"]
        elif r.get("kl_text") is not None:  # the steadier figure when it was measured
            label = f"{r['name']}  (KL text {_fmt(r['kl_text'], '.1e')}, top-1 {_fmt(r['top1_text'], '.3f')})"
        else:
            label = f"{r['name']}  (KL {_fmt(r['kl'], '.1e')}, top-1 {_fmt(r['top1'], '.3f')})"
        # shrinking markers keep models that land on the same point (one checkpoint, two
        # precisions of the same accuracy) visible
        ax1.scatter(r["loaded_weights_mb"], 100 * r["accuracy"], s=max(160 - 30 * k, 25), zorder=3 + k,
                    color=colours[k % len(colours)], marker=markers[k % len(markers)], label=label)
    sizes = [r["loaded_weights_mb"] for r in models if r["loaded_weights_mb"]]
    if sizes and max(sizes) / max(min(sizes), 1e-9) > 20:
        ax1.set_xscale("log")
    ax1.set_xlabel("weights as loaded (MB)")
    ax1.set_ylabel("accuracy, mean over tasks (%)")
    ax1.set_title(f"accuracy vs size (reference: {models[0]['name']})")
    ax1.grid(alpha=0.3)
    # below the axes: inside, it hid points that land near a corner
    ax1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    width = 0.8 / max(len(models), 1)
    for k, r in enumerate(models):
        vals = [100 * r["tasks"][t] if r["tasks"].get(t) is not None else 0 for t in tasks]
        ax2.bar([i + k * width for i in range(len(tasks))], vals, width, label=r["name"],
                color=colours[k % len(colours)])
    ax2.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(tasks))], tasks, rotation=20)
    ax2.set_ylabel("accuracy (%)")
    ax2.set_ylim(0, 105)
    ax2.set_title("per task")
    ax2.legend(fontsize=8, loc="lower right")
    ax2.grid(axis="y", alpha=0.3)
    fig.suptitle(f"qvl eval: {Path(summary['data']).name}, {summary['n']} items", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- command line ----------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="checkpoint dirs (DIR or DIR@dtype); the first is the reference")
    p.add_argument("--data", required=True, help="JSONL task set (see `python -m qvl.export.synth`)")
    p.add_argument("--limit", type=int, help="first N items only")
    p.add_argument("--out", default="qvl-eval", help="directory for results.json, results.md, accuracy_vs_size.png")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="for models given without @dtype")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--in-process", action="store_true", help="no subprocess per model (memory figures accumulate)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--text-kl", action="store_true",
                   help="also KL / top-1 over every text token of each chat, not just the answer (the reference "
                   "stores tokens x vocab float32 a chat: ~0.6 MB a token at Qwen2-VL's 152k vocabulary)")


def register(sub) -> argparse.ArgumentParser:
    """Add ``eval`` to the top-level ``qvl`` subparsers ``sub``."""
    p = sub.add_parser("eval", help="accuracy, KL and speed of checkpoints on a JSONL task set, side by side")
    add_arguments(p)
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args) -> int:
    try:
        summary = evaluate(args.models, args.data, args.limit, args.out, args.device, args.dtype,
                           args.max_new_tokens, args.max_seq_len, args.in_process, getattr(args, "verbose", False),
                           plot=not args.no_plot, text_kl=args.text_kl)
    except EvalError as e:
        if e.summary["models"]:
            print(markdown(e.summary), end="")
        print(f"qvl eval: {e}", file=sys.stderr)
        return 1
    print(markdown(summary), end="")
    print(f"\nwrote {Path(args.out) / 'results.json'}, results.md" + ("" if args.no_plot else ", accuracy_vs_size.png"))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qvl.bench.eval", description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return cmd_eval(args)


if __name__ == "__main__":
    sys.exit(main())
