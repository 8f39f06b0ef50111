"""Vision encode latency: the ONNX tower in onnxruntime (CPU) vs the torch tower, same process.

Run as ``python -m qvl.bench.vision [--models tiny,2b] [--reps 3] [--out bench/results]``.

Models: ``tiny``, the default model (:func:`qvl.scripts.default_model.default_model_dir`:
qvl-toy, the small model trained by ``qvl.scripts.train_toy``, or a random tiny checkpoint where
qvl-toy does not ship), and ``2b``, a random-weight tower with Qwen2-VL-2B's vision config (depth 32, embed_dim 1280,
16 heads, mlp_ratio 4, hidden 1536; 665M parameters) saved as a tower-only bf16 checkpoint
(config.json + ``visual.*`` tensors) under ``$QVL_BENCH_CACHE`` (default ``~/.cache/qvl/bench``),
with its ONNX exports (fp32, fp16) next to it; all are built once and reused.

Cases: one 448x448 image, two 448x448 images in one encode, one 1280x720 image; pixels come
through the checkpoint's image processor (smart_resize: 1280x720 becomes 1288x728). Per case and
backend: one warm-up call, then ``reps`` rounds of one timed call per backend (round-robin, so
other jobs' load hits all backends alike; one round when a warm-up call took over 20 s, as the
2B tower at 1280x720 does); min and median are reported. Both backends
get the same thread count (torch.set_num_threads, ORT intra_op_num_threads); torch runs the
fp32 tower under inference_mode (per-frame SDPA); ORT runs ``OnnxVision.encode`` (frames
packed into calls of <= 1024 patches) and, for the batch, also one call over both images (the
in-graph block mask then makes attention dense over 2048 patches).

Roofline: GFLOP/s = useful FLOPs of the tower (patch embed, blocks with per-frame attention,
merger; multiply-add = 2) / min time, next to the machine's fp32 matmul peak measured in
the same run (torch 2048^3 matmul, best of 5; :func:`qvl.bench.probe.matmul_peak_gflops`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import pathlib
import statistics
import time

import numpy as np
import torch

from qvl.bench import probe, report
from qvl.bench.fixtures import (BUILD_MARKER, QWEN2_VL_2B_VISION, build_cached, cache_root, init_random_,
                                qwen2vl_2b_config)

log = logging.getLogger("qvl.bench.vision")

# largest last: the fp16 session is released before it, which keeps the 2B run under ~10 GB
CASES = {"448x448": [(448, 448)], "2 x 448x448": [(448, 448), (448, 448)], "1280x720": [(1280, 720)]}
FP16_CASES = ("448x448", "2 x 448x448")


def _image(w: int, h: int, seed: int):
    from PIL import Image

    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(20 * x * y)], -1) + 0.1 * g.standard_normal((h, w, 3))
    return Image.fromarray((rgb.clip(0, 1) * 255).astype(np.uint8), "RGB")


def build_2b_tower(out: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Tower-only checkpoint: 2B config.json, random ``visual.*`` tensors in bf16 (as the release)."""
    return build_cached(out, lambda tmp: _write_2b_tower(tmp, seed),
                        {"seed": seed, "vision_config": QWEN2_VL_2B_VISION}, lambda p: (p / BUILD_MARKER).exists())


def _write_2b_tower(out: pathlib.Path, seed: int) -> None:
    from safetensors.torch import save_file

    from qvl.model.config import VisionConfig
    from qvl.model.vision import VisionTower
    from qvl.scripts.tiny import PREPROCESSOR_CONFIG, SPECIAL_TOKENS, _write_json

    cfg = qwen2vl_2b_config({t: 151643 + i for i, t in enumerate(SPECIAL_TOKENS)})  # the release's ids
    with torch.device("meta"):  # no fp32 copy, no default init pass over 665M parameters
        tower = VisionTower(VisionConfig.from_hf(cfg["vision_config"]))
    tower = tower.to_empty(device="cpu").to(torch.bfloat16)
    init_random_(tower.named_parameters(), seed)  # as bench.fixtures' 2B checkpoint
    state = {"visual." + k.replace("patch_embed.weight", "patch_embed.proj.weight"): v.contiguous()
             for k, v in tower.state_dict().items()}  # official key names
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", cfg)
    _write_json(out / "preprocessor_config.json", PREPROCESSOR_CONFIG)


def ensure_export(src: pathlib.Path, out: pathlib.Path, dtype: str) -> pathlib.Path:
    """An up-to-date ONNX artifact of ``src`` (reused when its manifest still matches)."""
    import shutil

    from qvl.export.onnx import export_onnx
    from qvl.runtime.onnx_vision import OnnxVision, OnnxVisionError

    if out.exists():
        try:
            OnnxVision.from_checkpoint(out, 2, threads=1)
            return out
        except OnnxVisionError as e:
            log.info("rebuilding %s: %s", out, e)
            shutil.rmtree(out)
    return export_onnx(src, out, dtype=dtype)


def tower_flops(cfg, grids) -> float:
    E, D, M, m2 = cfg.embed_dim, cfg.hidden_size, int(cfg.embed_dim * cfg.mlp_ratio), cfg.spatial_merge_size**2
    n = sum(t * h * w for t, h, w in grids)
    frames = [h * w for t, h, w in grids for _ in range(t)]
    linear = 2 * n * (cfg.patch_dim * E + cfg.depth * (4 * E * E + 2 * E * M))
    attention = cfg.depth * sum(4 * f * f * E for f in frames)  # q k^T and p v, all heads
    merger = 2 * (n // m2) * (m2 * E * m2 * E + m2 * E * D)
    return float(linear + attention + merger)


LONG_CALL_S = 20.0  # a case whose warm-up call takes longer is timed once (2B tower at 1280x720)


def _time(fns: dict, reps: int) -> dict:
    """Round-robin over the backends, so load from other jobs on the cores hits them alike."""
    slowest = 0.0
    for fn in fns.values():
        t0 = time.perf_counter()
        fn()  # warm-up: allocations, oneDNN primitive caches
        slowest = max(slowest, time.perf_counter() - t0)
    if slowest > LONG_CALL_S:
        reps = 1
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(t), "min_s": min(t), "times_s": t} for k, t in times.items()}


def bench_model(name: str, src: pathlib.Path, arts: dict, reps: int, threads: int) -> list[dict]:
    from qvl.export.onnx import load_vision_tower
    from qvl.runtime.onnx_vision import OnnxVision, graph_inputs
    from qvl.runtime.processor import ImageProcessor, ImageProcessorConfig

    proc = ImageProcessor(ImageProcessorConfig.from_dir(src))
    tower = load_vision_tower(src, torch.float32)
    merge = tower.cfg.spatial_merge_size
    sessions = {dtype: OnnxVision.from_checkpoint(path, merge, threads=threads) for dtype, path in arts.items()}
    rows = []
    for case, sizes in CASES.items():
        pv, grid = proc([_image(w, h, i) for i, (w, h) in enumerate(sizes)])
        flops = tower_flops(tower.cfg, grid.tolist())
        if case not in FP16_CASES:
            sessions.pop("float16", None)  # a third copy of the weights next to 720p's [16, N, N] scores
        fns = {"torch fp32": lambda: tower.encode(pv, grid)}
        for dtype, sess in sessions.items():
            label = f"onnxruntime {'fp32' if dtype == 'float32' else 'fp16'}"
            fns[label] = lambda sess=sess: sess.encode(pv, grid)
            if len(sizes) > 1 and dtype == "float32":
                fns[label + ", one call"] = lambda sess=sess: sess.run(graph_inputs(pv, grid, merge)[0])
        with torch.inference_mode():
            runs = _time(fns, reps)
        for backend, r in runs.items():
            rows.append({"model": name, "case": case, "grid_thw": grid.tolist(), "patches": int(pv.shape[0]),
                         "backend": backend, "reps": len(r["times_s"]), **r, "gflops": flops / 1e9,
                         "gflop_per_s": flops / r["min_s"] / 1e9})
            log.info("%s %s %s: %.1f ms", name, case, backend, r["median_s"] * 1e3)
    return rows


def _export_info(arts: dict) -> dict:
    from qvl.runtime.manifest import read_manifest

    info = {}
    for dtype, path in arts.items():
        sec = read_manifest(path)["vision_onnx"]
        v = sec["validation"]
        info[dtype] = {"path": str(path), "max_abs": v["max_abs"], "max_rel": v["max_rel"],
                       "tolerance_max_rel": v["tolerance_max_rel"], "parameters": sec["parameters"],
                       "bytes": sum(f["bytes"] for f in sec["files"].values()),
                       "files": sorted(sec["files"]), "opset": sec["opset"], "export_s": sec.get("export_s")}
    return info


def render_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Vision encode: onnxruntime (CPU) vs torch",
        "",
        f"{result['date']}, `python -m qvl.bench.vision` ({result['command']}). {m['cpu']}, "
        f"{m['threads']} threads for both backends, torch {m['torch']}, onnxruntime {m['onnxruntime']}; "
        f"load average {m['loadavg_start'][0]:.1f} at the start, {m['loadavg_end'][0]:.1f} at the end (the cores "
        "are shared). "
        f"fp32 matmul peak (torch, 2048^3, best of the start and end of the run): "
        f"**{m['matmul_peak_gflops']:.0f} GFLOP/s** ({m['matmul_gflops_start']:.0f} at the start, "
        f"{m['matmul_gflops_end']:.0f} at the end). Backends run round-robin, one call each per round. "
        "Timed calls after one warm-up; with other jobs on the cores the minimum is the steadier "
        "figure, so GFLOP/s and the ratio to torch use it. GFLOP counts the tower's useful work "
        "(per-frame attention).",
        "",
        "| model | case | patches | backend | min ms | median ms | GFLOP | GFLOP/s | % of matmul peak | vs torch |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = {(r["model"], r["case"]): r["min_s"] for r in result["rows"] if r["backend"] == "torch fp32"}
    for r in result["rows"]:
        speed = base[(r["model"], r["case"])] / r["min_s"]
        lines.append(f"| {r['model']} | {r['case']} | {r['patches']} | {r['backend']} | {r['min_s'] * 1e3:.1f} "
                     f"| {r['median_s'] * 1e3:.1f} | {r['gflops']:.1f} | {r['gflop_per_s']:.0f} | "
                     f"{100 * r['gflop_per_s'] / m['matmul_peak_gflops']:.0f}% | {speed:.2f}x |")
    peaks = m.get("peak_rss_gb_after", {})
    if peaks:
        lines += ["", "Peak RSS of the process after each model (torch tower + ONNX sessions + the largest "
                  "case's activations): " + ", ".join(f"{k} {v:.1f} GB" for k, v in peaks.items()) + "."]
    lines += ["", "## Exports", "", "| model | dtype | parameters | files | MB | max abs err | max rel err | "
              "tolerance | export s |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for model, per in result["exports"].items():
        for dtype, e in per.items():
            t = e.get("export_s")
            lines.append(f"| {model} | {dtype} | {e['parameters'] / 1e6:.1f}M | {' + '.join(e['files'])} | "
                         f"{e['bytes'] / 1e6:.0f} | {e['max_abs']:.2g} | {e['max_rel']:.2g} | "
                         f"{e['tolerance_max_rel']:g} | {'?' if t is None else f'{t:.0f}'} |")
    lines += ["", "Errors: `qvl export onnx` validation, onnxruntime CPU vs the fp32 torch tower over "
              "3 resolutions + a 3-image batch with a 2-frame video; rel = max|diff| / max|torch|.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,2b")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=probe.usable_cores())
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    import onnxruntime

    from qvl.scripts.default_model import default_model_dir

    root = cache_root()
    result = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["--models", args.models, "--reps", str(args.reps), "--threads", str(args.threads)]),
              "machine": {"cpu": probe.cpu_model(), "threads": args.threads, "torch": torch.__version__,
                          "onnxruntime": onnxruntime.__version__, "matmul_gflops_start": probe.matmul_peak_gflops(),
                          "loadavg_start": os.getloadavg()},
              "rows": [], "exports": {}}
    for name in args.models.split(","):
        if name == "tiny":
            src = default_model_dir()
            arts = {"float32": root / "vision-tiny-onnx-fp32", "float16": root / "vision-tiny-onnx-fp16"}
        elif name == "2b":
            src = build_2b_tower(root / "qwen2vl-2b-vision-random")
            arts = {"float32": root / "qwen2vl-2b-vision-onnx-fp32", "float16": root / "qwen2vl-2b-vision-onnx-fp16"}
        else:
            raise SystemExit(f"unknown model {name!r}: tiny or 2b")
        for dtype, path in arts.items():
            ensure_export(src, path, dtype)
        result["exports"][name] = _export_info(arts)
        result["rows"] += bench_model(name, src, arts, args.reps, args.threads)
        # process-wide high-water mark so far (both backends' weights + the largest case's activations)
        result["machine"].setdefault("peak_rss_gb_after", {})[name] = probe.peak_rss_kb() * 1024 / probe.GB
    m = result["machine"]
    m["loadavg_end"], m["matmul_gflops_end"] = os.getloadavg(), probe.matmul_peak_gflops()
    m["matmul_peak_gflops"] = max(m["matmul_gflops_start"], m["matmul_gflops_end"])
    md = render_markdown(result)
    report.write_outputs(result, md, pathlib.Path(args.out), "vision")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
