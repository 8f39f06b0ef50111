"""Decode steps of several checkpoints loaded in one process, timed interleaved step by step.

Separate runs on a shared machine meet different contention; here step k of every model runs
right after step k of the others (in a rotating order), so their ratios are fair even when the
absolute speed is not. Each model prefills the same fixed 64-token text prompt (untimed), then
decodes greedily one token per step; a step is embed + decoder + lm_head + argmax, batch 1.

Run through :mod:`qvl.bench.harness` (``decode_worker``), or by hand as
``python -m qvl.bench.interleave SPEC.json`` with SPEC {"models": {name: [path, dtype] or
[path, dtype, quant_kernel]}, "steps": N, "threads": T, "result": OUT.json}.
"""

from __future__ import annotations

import json
import logging
import pathlib
import statistics
import sys
import time

from qvl.bench import harness

log = logging.getLogger("qvl.bench.interleave")

PROMPT_LEN = 64


def measure(models: dict[str, tuple], steps: int) -> dict:
    import torch

    from qvl.runtime.loader import load_model

    loaded, tok, times = {}, {}, {}
    ids = (torch.arange(PROMPT_LEN) * 7919 % 400 + 3)[None]  # fixed tokens inside the tiny vocab too
    with torch.inference_mode():
        for name, (path, dtype, *kernel) in models.items():
            log.info("loading %s (%s)", name, dtype)
            m = load_model(path, dtype=dtype, quant_kernel=kernel[0] if kernel else "auto")
            m.setup_caches(1, PROMPT_LEN + steps + 1, m.embed_tokens.weight.dtype)
            pos = torch.arange(PROMPT_LEN)
            hidden = m(m.embed_tokens(ids), pos.expand(3, 1, -1), pos, None, PROMPT_LEN)
            loaded[name], tok[name], times[name] = m, m.logits(hidden[:, -1]).argmax(-1), []
        names = list(loaded)
        for step in range(steps):
            slot = PROMPT_LEN + step
            for name in names[step % len(names):] + names[:step % len(names)]:
                m = loaded[name]
                t0 = time.perf_counter()
                hidden = m(m.embed_tokens(tok[name][:, None]), torch.full((3, 1, 1), slot),
                           torch.tensor([slot]), None, slot + 1)
                tok[name] = m.logits(hidden[:, -1]).argmax(-1)
                times[name].append(time.perf_counter() - t0)
    out = {}
    for name, ts in times.items():
        ts = ts[2:] if len(ts) > 4 else ts  # first steps warm caches and allocators
        med = statistics.median(ts)
        out[name] = {"step_ms_median": 1e3 * med, "step_ms_min": 1e3 * min(ts), "tok_s_median": 1 / med,
                     "tok_s_best": 1 / min(ts), "steps": len(ts)}
    return out


@harness.worker
def decode_worker(spec: dict, res: dict) -> None:
    """``spec``: {"models": {name: [path, dtype] or [path, dtype, quant_kernel]}, "steps": N, "threads": T}."""
    res["models"] = measure({k: tuple(v) for k, v in spec["models"].items()}, spec["steps"])


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    spec_path = (argv or sys.argv[1:])[0]
    result = json.loads(pathlib.Path(spec_path).read_text())["result"]
    return harness.child_main(harness.kind_of(decode_worker), spec_path, result)


if __name__ == "__main__":
    sys.exit(main())
