"""A robot's perception loop: the same instructions, a new camera frame each step.

    python -m qvl.scripts.robot_loop MODEL --video clip.mp4 [--every 5] [--budget-ms 500]
    python -m qvl.scripts.robot_loop MODEL --camera /dev/video0 --frames 100

Frames come from a video file or a V4L2 camera through PyAV (``pip install av``). Each step asks
the session's question about one frame and prints the time to first token, the total latency
and whether the step fit the frame budget. The instructions are prefilled once (the engine's
prefix cache keeps them), so from the second frame on a step costs the vision tower on the new
frame plus the prefill of its own few tokens.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time


import qvl
from qvl.runtime.options import LoadOptions

INSTRUCTIONS = ("You are the perception module of a mobile robot. Look at the camera frame and report, in one "
                "short line, the nearest obstacle and whether the path ahead is clear.")


def frames(video: str | None, camera: str | None, every: int, limit: int):
    """PIL images from a video file or a camera, every ``every``-th one, at most ``limit``."""
    import av

    container = av.open(camera, format="v4l2") if camera else av.open(video)
    try:
        n = 0
        for i, frame in enumerate(container.decode(video=0)):
            if i % every:
                continue
            yield frame.to_image()
            n += 1
            if n >= limit:
                return
    finally:
        container.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="checkpoint directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", help="a video file to read frames from")
    src.add_argument("--camera", help="a V4L2 camera device, e.g. /dev/video0")
    p.add_argument("--question", default="What is ahead?")
    p.add_argument("--instructions", default=INSTRUCTIONS)
    p.add_argument("--every", type=int, default=1, help="use every N-th frame")
    p.add_argument("--frames", type=int, default=10, help="frames to answer")
    p.add_argument("--budget-ms", type=float, default=1000.0, help="the latency one step may take")
    p.add_argument("--max-pixels", type=int, default=448 * 448, help="resize frames to at most this many pixels")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--device", default=LoadOptions.device)
    args = p.parse_args(argv)
    if args.every < 1 or args.frames < 1:
        p.error("--every and --frames must be >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    engine = qvl.load(args.model, device=args.device, max_batch=1)
    session = engine.session(system=args.instructions, warm=True, max_new_tokens=args.max_new_tokens)
    ttfts, totals = [], []
    print(f"{'frame':>5} {'ttft ms':>8} {'total ms':>9} {'cached':>7} {'fits':>5}  answer")
    for i, image in enumerate(frames(args.video, args.camera, args.every, args.frames)):
        t0 = time.perf_counter()
        answer = session.ask(args.question, [{"image": image, "max_pixels": args.max_pixels}])
        total = (time.perf_counter() - t0) * 1000
        st = session.last_stats
        ttfts.append(st.ttft_s * 1000)
        totals.append(total)
        fits = "yes" if total <= args.budget_ms else "NO"
        print(f"{i:>5} {ttfts[-1]:>8.0f} {total:>9.0f} {st.cached_tokens:>7} {fits:>5}  {answer!r}", flush=True)
    if not totals:
        print("no frames read", file=sys.stderr)
        return 1
    print(f"median: time to first token {statistics.median(ttfts):.0f} ms, total {statistics.median(totals):.0f} ms; "
          f"{sum(t <= args.budget_ms for t in totals)}/{len(totals)} steps within {args.budget_ms:g} ms")
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
