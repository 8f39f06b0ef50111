"""Peak memory of video prompts against video length: lazy, chunked qvl vs a materialized pass.

Run as ``nice python -m qvl.bench.video_memory [--minutes 1 5 20] [--out bench/results]``.

Videos: ``moving_squares`` at 64x48, 2 fps, h264, generated once with PyAV under
``$QVL_BENCH_CACHE`` (default ``~/.cache/qvl/bench``), outside the repository. Every video item
uses qwen-vl-utils' defaults (2 fps sampling, at most 768 frames, 128..768 tokens per frame
under the 128k-token total-pixels budget), so frames are upscaled to 280x392 and a 20-minute
video becomes 768 frames, 384 frame pairs, ~54k vision tokens.

Each (length, mode) runs in a fresh subprocess (:mod:`qvl.bench.harness`); peak RSS is its own (``VmHWM``), and the
baseline is the RSS after imports and engine load (tiny checkpoint, KV cache sized to fit).
Modes:
* ``qvl``: ``Engine.generate`` end to end (4 new tokens): frames decoded lazily (only sampled
  indices converted), resized as they arrive into uint8, float pixel rows built per chunk of
  frame pairs, vision tower run per chunk, then prefill and decode.
* ``materialized``: what the reference pipeline holds: all sampled frames as float32 (as
  qwen-vl-utils returns them), the whole ``pixel_values_videos`` and one vision-tower pass over
  every patch. No LLM. Same decoder, same frames.
The tiny tower's activations are small (embed 32); a real tower's scale with the chunk in the
qvl mode and with the whole video in the materialized one.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import pathlib
import time

from qvl.bench import fixtures, harness, report
from qvl.bench.probe import peak_rss_kb, status_kb

logger = logging.getLogger(__name__)

WIDTH, HEIGHT, FPS = 64, 48, 2


def _cache() -> pathlib.Path:
    d = fixtures.cache_root()
    d.mkdir(parents=True, exist_ok=True)
    return d


def _video(minutes: float) -> pathlib.Path:
    from qvl.scripts.sample_videos import moving_squares, write_video

    path = _cache() / f"squares_{WIDTH}x{HEIGHT}_{FPS}fps_{minutes:g}min.mp4"
    if not path.exists():
        n = int(minutes * 60 * FPS)
        tmp = path.with_suffix(".tmp.mp4")
        write_video(tmp, moving_squares(n, WIDTH, HEIGHT), fps=FPS)
        tmp.rename(path)
    return path


def _checkpoint() -> pathlib.Path:
    from qvl.scripts.tiny import write_tiny_checkpoint

    return fixtures.build_cached(_cache() / "tiny_video_ckpt", lambda out: write_tiny_checkpoint(out, weights="random"),
                                 {"weights": "random"}, lambda p: fixtures.read_marker(p) is not None)


@harness.worker
def memory_worker(spec: dict, res: dict) -> None:
    """``spec``: {"mode": "qvl" | "materialized", "video": PATH, "ckpt": DIR}."""
    res.update(_measure(spec["mode"], spec["video"], spec["ckpt"]))


def _measure(mode: str, video: str, ckpt: str) -> dict:
    import torch

    import qvl
    from qvl.runtime.video import fetch_video

    torch.manual_seed(0)
    eng = qvl.load(ckpt, max_seq_len=60000, prefix_cache_mb=0, vision_cache_mb=0)  # the request's own memory alone
    item = {"type": "video", "video": video}
    base = status_kb("VmRSS") / 1024
    t0 = time.perf_counter()
    out = {"mode": mode, "baseline_mb": base}
    if mode == "qvl":
        conv = [{"role": "user", "content": [item, {"type": "text", "text": "What happens?"}]}]
        eng.generate_ids(conv, max_new_tokens=4, ignore_eos=True)
        st = eng.last_stats
        out.update(prompt_tokens=st.prompt_tokens, vision_s=st.vision_s)
    else:
        v = fetch_video(item)
        frames = v.frames.float()  # qwen-vl-utils hands the processor float32 frames
        del v
        pv, grid = eng.video_processor([frames])
        with torch.inference_mode():
            emb = eng.model.visual.encode(pv, grid)
        out.update(prompt_tokens=int(emb.shape[0]), pixel_values_mb=pv.numel() * 4 / 2**20)
    out["seconds"] = time.perf_counter() - t0
    out["peak_mb"] = peak_rss_kb() / 1024
    return out


def _run_child(mode: str, video: pathlib.Path, ckpt: pathlib.Path) -> dict:
    res = harness.run(memory_worker, {"mode": mode, "video": str(video), "ckpt": str(ckpt)}, label=mode)
    if "error" in res:
        raise RuntimeError(f"{mode} child failed: {res['error']}\n" + "\n".join(res["log_tail"]))
    return res


def _markdown(rows: list[dict]) -> str:
    lines = [
        "# Video prompt memory vs length",
        "",
        f"Generated {_dt.date.today().isoformat()} by `python -m qvl.bench.video_memory` on "
        f"{os.cpu_count()} CPUs (torch threads default). Video: moving squares, {WIDTH}x{HEIGHT}, "
        f"{FPS} fps, h264; qwen-vl-utils default sampling and sizing (frames upscaled to 280x392, "
        "at most 768 frames). Tiny checkpoint (vision embed 32, text hidden 64). Peak = `VmHWM` "
        "of a fresh process; baseline = RSS after imports + `qvl.load`.",
        "",
    ]
    lines += report.table(
        ["minutes", "source frames", "mode", "vision tokens", "peak RSS MB", "peak - baseline MB", "seconds"],
        [[f"{r['minutes']:g}", r["source_frames"], r["mode"], r["prompt_tokens"], f"{r['peak_mb']:.0f}",
          f"{r['peak_mb'] - r['baseline_mb']:.0f}", f"{r['seconds']:.1f}"] for r in rows], align="rrlrrrr")
    lines += [
        "",
        "`qvl` is the whole request (decode, resize, vision tower in chunks, prefill, 4 tokens); its "
        "prompt tokens include the text. `materialized` holds float32 frames, the whole "
        "`pixel_values_videos` and one tower pass, as the reference pipeline does, and stops there.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, nargs="+", default=[1, 5, 20])
    ap.add_argument("--modes", nargs="+", default=["qvl", "materialized"])
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ckpt = _checkpoint()
    rows = []
    for minutes in args.minutes:
        video = _video(minutes)
        for mode in args.modes:
            r = _run_child(mode, video, ckpt)
            r.update(minutes=minutes, source_frames=int(minutes * 60 * FPS))
            logger.info("%g min %s: peak %.0f MB (baseline %.0f), %d tokens, %.1fs", minutes, mode, r["peak_mb"],
                        r["baseline_mb"], r["prompt_tokens"], r["seconds"])
            rows.append(r)
    out = pathlib.Path(args.out)
    report.write_outputs(rows, _markdown(rows), out, "video_memory")
    logger.info("wrote %s", out / "video_memory.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
