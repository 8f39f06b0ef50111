"""What quantization costs in accuracy: every export scheme of one float model, through ``qvl eval``.

    python -m qvl.bench.quant_quality [--model scripts/qvl-toy] [--group-size 128] [--limit N]

Exports the model with GPTQ Int8, GPTQ Int4, AWQ 4-bit and the round-to-nearest baselines of
both 4-bit formats (same group size, same calibration), then runs ``qvl eval`` on the float
model (the reference) and every artifact over the synthetic evaluation set: accuracy per task,
KL divergence and top-1 agreement against the float model on the answer tokens and on every text
token of each chat (``--text-kl``: the answers are one or two tokens, too few to rank schemes whose
KL differs by tens of percent), size, speed. Export times and the
manifests' per-layer errors go in the same report. Writes ``bench/results/quant-quality.{md,json}``
(+ the eval's PNG). Exports are cached under ``$QVL_BENCH_CACHE`` by model fingerprint.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import shutil
import time

from qvl.bench import report
from qvl.bench.fixtures import cache_root
from qvl.scripts.default_model import TOY_MODEL

log = logging.getLogger("qvl.bench.quant_quality")

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCHEMES = {  # name: (exporter, QuantSpec kwargs)
    "gptq-int8": ("gptq", dict(method="gptq", fmt="gptq", bits=8, sym=True)),
    "gptq-int4": ("gptq", dict(method="gptq", fmt="gptq", bits=4, sym=True)),
    "awq": ("awq", dict(method="awq", fmt="awq", bits=4, sym=False)),
    "rtn-int4": ("gptq", dict(method="rtn", fmt="gptq", bits=4, sym=True)),
    "rtn-awq": ("awq", dict(method="rtn", fmt="awq", bits=4, sym=False)),
}


def export_all(model: pathlib.Path, work: pathlib.Path, group: int, calib_samples: int) -> dict:
    from qvl.export.quantize import export_quantized
    from qvl.export.layerwise import QuantSpec
    from qvl.runtime.manifest import checkpoint_fingerprint, read_manifest

    fp = checkpoint_fingerprint(model)[:12]
    out = {}
    for name, (_, kw) in SCHEMES.items():
        d = work / f"{model.name}-{fp}-{name}-g{group}-c{calib_samples}"
        if not (d / "qvl-manifest.json").exists():
            shutil.rmtree(d, ignore_errors=True)
            export_quantized(model, d, QuantSpec(group_size=group, **kw), calib_samples=calib_samples)
        m = read_manifest(d)["quantization"]
        out[name] = {"path": str(d), "export_s": m["export_s"], "quantize_s": m["quantize_s"],
                     "quality": m["quality"],
                     "layer_output_rel_mse": [x["output_rel_mse"] for x in m["layers"]]}
    return out


def render(result: dict) -> str:
    ev = result["eval"]
    lines = [f"# Quantization accuracy: {result['model']} (group size {result['group_size']}, "
             f"{result['calib_samples']} calibration chats)", "",
             f"`python -m qvl.bench.quant_quality` on {result['date']}; evaluation set `{ev['data']}` "
             f"({ev['n']} items), every model run by qvl in float32, KL / top-1 teacher-forced on the float "
             "model's answers.", "", open_table(ev), "", "## Exports", "",
             "| scheme | export s | held-out KL (manifest) | top-1 (manifest) | mean layer output rel. MSE |",
             "|---|---:|---:|---:|---:|"]
    for name, e in result["exports"].items():
        q = e["quality"] or {}
        errs = e["layer_output_rel_mse"]
        lines.append(f"| {name} | {e['export_s']:.1f} | {q.get('kl_mean', float('nan')):.4g} | "
                     f"{100 * q.get('top1_agreement', float('nan')):.1f}% | {sum(errs) / len(errs):.3g} |")
    return "\n".join(lines) + "\n"


def open_table(ev: dict) -> str:
    from qvl.bench.eval import markdown

    return markdown(ev).strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(TOY_MODEL))
    ap.add_argument("--data", default=str(ROOT / "bench" / "data" / "synth-eval" / "data.jsonl"))
    ap.add_argument("--group-size", type=int, default=128, help="the ecosystem's default; qvl-toy's layers take it")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--in-process", action="store_true", help="no subprocess per model (faster; RSS accumulates)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from qvl.bench.eval import evaluate, plot_results

    model = pathlib.Path(args.model)
    work = cache_root() / "quant-quality"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    exports = export_all(model, work, args.group_size, args.calib_samples)
    out = pathlib.Path(args.out)
    ev = evaluate([str(model)] + [e["path"] for e in exports.values()], args.data, args.limit,
                  out / "quant-quality-eval", in_process=args.in_process, text_kl=True)
    for m, name in zip(ev["models"], ["float"] + list(exports)):
        m["name"] = name
    try:  # again, with the schemes' names instead of the artifacts' directory names
        plot_results(ev, out / "quant-quality-eval" / "accuracy_vs_size.png")
    except ImportError:
        pass
    result = {"model": model.name, "group_size": args.group_size, "calib_samples": args.calib_samples,
              "date": time.strftime("%Y-%m-%d"), "exports": exports, "eval": ev,
              "total_s": round(time.perf_counter() - t0, 1)}
    report.write_atomic(out / "quant-quality.json", json.dumps(result, indent=1) + "\n")
    md = render(result)
    report.write_atomic(out / "quant-quality.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
