"""What the 8-bit vision tower and the 8-bit KV cache save and cost, on qvl-toy and the 2B shapes.

Run as ``python -m qvl.bench.int8_memory [--models toy,2b-int4] [--chats 8] [--steps 16]``.

Memory: one fresh process per configuration (float, ``vision_quant="int8"``,
``kv_cache_dtype="int8"``, both) loads the model with ``max_batch`` slots of ``max_seq_len`` and
answers one picture; its peak RSS, the tower's bytes (``vision_quant.tower_bytes``) and the
cache's (``KVCache.bytes_for``). Quality, in one process (one decoder, the float and the int8
tower and both caches swapped in turn): vision-feature error (relative L2 and the lowest
per-token cosine) on a 448x448 picture, and teacher-forced KL(float || int8) per answer token
and top-1 agreement over synthetic chats (the ``qvl.export.synth`` tasks, their reference
answers appended). On the 2B shapes the weights are random: the KL says what the rounding does to
tensors of that size, not to a trained model; qvl-toy is trained. Speed, interleaved in that
process: the tower on the picture, float vs int8; decode steps of one sequence at several
cache lengths, the float and int8 caches alternating step by step ("live": the step reads the
cache up to its length). Results: bench/results/int8_memory.md.
"""

from __future__ import annotations

import argparse
import copy
import logging
import pathlib
import statistics
import time

from qvl.bench import fixtures, harness, probe, report
from qvl.bench.report import fmt

log = logging.getLogger("qvl.bench.int8_memory")

CONFIGS = {"float": {}, "vision int8": {"vision_quant": "int8"}, "kv int8": {"kv_cache_dtype": "int8"},
           "both int8": {"vision_quant": "int8", "kv_cache_dtype": "int8"}}
KV_LENS = (256, 1024, 4096)


def _picture(size: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # blocks, not noise: a picture's statistics
    return Image.fromarray(np.kron(base, np.ones((size // 8, size // 8, 1), dtype=np.uint8)))


@harness.worker(memory=True)
def memory_worker(spec: dict, res: dict) -> None:
    import torch

    import qvl
    from qvl.model.kv_cache import KVCache
    from qvl.model.vision import VisionTower
    from qvl.runtime import vision_quant

    eng = qvl.load(spec["ckpt"], dtype=spec["dtype"], max_seq_len=spec["max_seq_len"], max_batch=spec["max_batch"],
                   prefix_cache_mb=0, vision_cache_mb=0, **spec["options"])
    res["rss_after_load_gb"] = probe.rss_now_gb()
    cfg = eng.model.cfg
    with torch.device("meta"):
        meta = VisionTower(cfg.vision)
    res["tower_mb"] = vision_quant.tower_bytes(meta, eng.dtype, spec["options"].get("vision_quant", "none")) / 2**20
    t = cfg.text
    kv_dtype = torch.int8 if spec["options"].get("kv_cache_dtype") == "int8" else eng.dtype
    res["kv_mb"] = KVCache.bytes_for(spec["max_batch"], t.num_key_value_heads, spec["max_seq_len"], t.head_dim,
                                     t.num_hidden_layers, kv_dtype) / 2**20
    held = sum(b.numel() * b.element_size() for c in eng._core.runner.caches for b in c.tensors())
    assert held == res["kv_mb"] * 2**20, (held, res["kv_mb"])
    conv = [{"role": "user", "content": [{"type": "image", "image": _picture(spec["image"])},
                                         {"type": "text", "text": "Describe this picture."}]}]
    t0 = time.perf_counter()
    eng.generate_ids(conv, max_new_tokens=8, ignore_eos=True)
    res["request_s"] = time.perf_counter() - t0
    eng.close()


def _use(eng, tower, caches) -> None:
    """Point the engine's model and runner at one tower and one set of layer caches."""
    runner = eng._core.runner
    eng.model.visual = runner.tower = tower
    for layer, c in zip(eng.model.layers, caches):
        layer.self_attn.kv_cache = c
    runner.caches = list(caches)


@harness.worker(memory=True)
def quality_worker(spec: dict, res: dict) -> None:
    import torch
    import torch.nn.functional as F

    import qvl
    from qvl.export.synth import TASKS, make_sample
    from qvl.model.kv_cache import KVCache
    from qvl.runtime import vision_quant

    eng = qvl.load(spec["ckpt"], dtype=spec["dtype"], max_seq_len=spec["max_seq_len"], prefix_cache_mb=0,
                   vision_cache_mb=0)
    t = eng.model.cfg.text
    tower_f = eng.model.visual
    tower_q = copy.deepcopy(tower_f)
    vision_quant.quantize_vision(tower_q, "int8", spec.get("quant_kernel", "auto"))
    caches = {name: [KVCache(1, t.num_key_value_heads, spec["max_seq_len"], t.head_dim, dt) for _ in eng.model.layers]
              for name, dt in (("float", eng.dtype), ("int8", torch.int8))}
    setups = {"float": (tower_f, caches["float"]), "vision int8": (tower_q, caches["float"]),
              "kv int8": (tower_f, caches["int8"]), "both int8": (tower_q, caches["int8"])}

    # vision features on one picture; tower time interleaved
    req = eng._request([{"role": "user", "content": [{"type": "image", "image": _picture(spec["image"])},
                                                     {"type": "text", "text": "x"}]}], False)
    pv, grid = req.pixel_values, torch.tensor(req.grids)
    times = {"float": [], "int8": []}
    feats = {}
    with torch.inference_mode():
        for rep in range(spec["tower_reps"] + 1):
            for name, tower in (("float", tower_f), ("int8", tower_q)):
                t0 = time.perf_counter()
                feats[name] = tower.encode(pv, grid).float()
                if rep:  # the first round warms up
                    times[name].append(time.perf_counter() - t0)
    a, b = feats["float"], feats["int8"]
    res["patches"] = int(pv.shape[0])
    res["features"] = {"rel_l2": float((b - a).norm() / a.norm()), "min_cos": float(F.cosine_similarity(a, b, -1).min()),
                       "max_rel": float((b - a).abs().max() / a.abs().max())}
    res["tower_s"] = {k: statistics.median(v) for k, v in times.items()}

    # answers: teacher-forced log-probs of every setup against the float one
    samples = [make_sample(TASKS[i % len(TASKS)], i, seed=7) for i in range(spec["chats"])]
    kl = {k: 0.0 for k in setups if k != "float"}
    top1 = dict.fromkeys(kl, 0)
    n_tok = 0
    for s in samples:
        answer = eng.tokenizer.encode(s.answer)
        rows = {}
        for name, (tower, cs) in setups.items():
            _use(eng, tower, cs)
            rows[name], targets = eng.text_logprobs(s.messages(), answer)
        n_tok += len(targets)
        ref = rows["float"]
        for name in kl:
            kl[name] += float((ref.exp() * (ref - rows[name])).sum())
            top1[name] += int((ref.argmax(-1) == rows[name].argmax(-1)).sum())
    res["tokens"] = n_tok
    res["quality"] = {k: {"kl": kl[k] / n_tok, "top1": top1[k] / n_tok} for k in kl}

    # decode steps at several cache lengths, float and int8 caches alternating
    _use(eng, tower_f, caches["float"])
    runner = eng._core.runner
    steps = {}
    with torch.inference_mode():
        for n in [x for x in KV_LENS if x < spec["max_seq_len"]]:
            for cs in caches.values():  # values written up to n: a real cache's rows, not zeros
                for c in cs:
                    for buf in c.tensors():
                        buf[:, :, :n].copy_(torch.randn(buf[:, :, :n].shape).to(buf.dtype) if buf.is_floating_point()
                                            else torch.randint(-127, 128, buf[:, :, :n].shape, dtype=buf.dtype))
                    if c.quantized:
                        c.k_scale.fill_(0.02)
                        c.v_scale.fill_(0.02)
            per = {k: [] for k in caches}
            for step in range(spec["steps"] + 2):
                for name, cs in caches.items():
                    _use(eng, tower_f, cs)
                    mask = torch.ones(1, 1, 1, n + 1, dtype=torch.bool)
                    t0 = time.perf_counter()
                    runner.step(torch.tensor([100 + step]), torch.full((3, 1, 1), n), torch.tensor([[n]]), mask)
                    if step >= 2:
                        per[name].append(time.perf_counter() - t0)
            steps[n] = {k: 1000 * statistics.median(v) for k, v in per.items()}
    res["step_ms"] = steps
    eng.close()


def render(result: dict) -> str:
    lines = ["# 8-bit vision tower and 8-bit KV cache: bytes, peak memory, error, speed", "",
             f"{probe.cpu_model()}, {result['threads']} threads. Memory: a fresh process per configuration loads the "
             "model and answers one picture (8 tokens); peak RSS is its VmHWM. Feature error: relative L2 "
             "||int8 - float|| / ||float|| of the tower's output and the lowest per-token cosine, one picture. "
             "KL(float || int8) per answer token and top-1 agreement, teacher-forced over synthetic chats with their "
             "reference answers, everything else float. Times: medians, the compared configurations interleaved "
             "in one process.", ""]
    for name, r in result["models"].items():
        lines += [f"## {name}", ""]
        mem = r.get("memory", {})
        rows = []
        base = mem.get("float", {})
        for cfg in CONFIGS:
            m = mem.get(cfg, {})
            if "error" in m:
                rows.append([cfg, "error: " + str(m["error"])[:80], "", "", "", ""])
                continue
            q = r.get("quality", {}).get("quality", {}).get(cfg, {})
            saved = (base.get("tower_mb", 0) + base.get("kv_mb", 0)) - (m.get("tower_mb", 0) + m.get("kv_mb", 0))
            rows.append([cfg, fmt(m.get("tower_mb"), "{:.1f}"), fmt(m.get("kv_mb"), "{:.1f}"), fmt(saved, "{:.1f}"),
                         fmt(m.get("vmhwm_gb"), "{:.2f}"),
                         fmt(q.get("kl"), "{:.2e}") if q else "0 (reference)",
                         fmt(100 * q["top1"], "{:.2f}%") if q else "100%"])
        spec = r.get("spec", {})
        lines += [f"max_seq_len {spec.get('max_seq_len')}, max_batch {spec.get('max_batch')}, "
                  f"{spec.get('dtype')} activations, picture {spec.get('image')}x{spec.get('image')}.", ""]
        lines += report.table(["config", "tower MB", "KV MB", "MB saved", "peak RSS GB", "KL / token", "top-1 agree"],
                              rows)
        qr = r.get("quality", {})
        if "error" in qr:
            lines += ["", "quality run: error: " + str(qr["error"])[:200]]
        elif qr:
            f = qr["features"]
            ts = qr["tower_s"]
            lines += ["", f"Vision features, int8 vs float tower ({qr['patches']} patches): relative L2 "
                      f"{f['rel_l2']:.2e}, lowest cosine {f['min_cos']:.6f}, max |diff| / max |float| {f['max_rel']:.2e}. "
                      f"Tower time: float {ts['float']:.3f} s, int8 {ts['int8']:.3f} s "
                      f"(x{ts['float'] / ts['int8']:.2f}). {qr['tokens']} answer tokens. Other processes used "
                      f"{fmt(100 * (qr.get('other_cpu_share') or 0), '{:.0f}')}% of the CPUs meanwhile.", ""]
            srows = [[n, fmt(s["float"], "{:.2f}"), fmt(s["int8"], "{:.2f}"), fmt(s["int8"] - s["float"], "{:+.2f}")]
                     for n, s in qr["step_ms"].items()]
            lines += report.table(["cache length", "step ms float KV", "step ms int8 KV", "int8 costs ms"], srows)
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="toy,2b-int4", help="comma-separated subset of toy, tiny, 2b-int4, 2b-bf16")
    ap.add_argument("--chats", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--tower-reps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    harness.setup()
    result = {"threads": probe.usable_cores(), "machine": probe.machine_info(), "models": {}}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        try:
            ckpt, dtype = fixtures.bench_model(name)
        except ValueError as e:
            ap.error(str(e))
        seq, batch = (1024, 2) if name == "tiny" else (4096, 4)
        probe.warm_page_cache(ckpt)
        spec = {"ckpt": str(ckpt), "dtype": dtype, "max_seq_len": seq, "max_batch": batch, "image": 448}
        out = result["models"][name] = {"spec": spec, "memory": {}}
        for cfg, options in CONFIGS.items():
            out["memory"][cfg] = harness.run(memory_worker, {**spec, "options": options}, timeout=args.timeout,
                                             label=f"{name} {cfg}")
        qspec = {**spec, "max_seq_len": max(KV_LENS) + 64, "chats": args.chats, "steps": args.steps,
                 "tower_reps": args.tower_reps}
        out["quality"] = harness.run(quality_worker, qspec, timeout=args.timeout, label=f"{name} quality")
        report.write_partial(lambda: (result, render(result)), pathlib.Path(args.out), "int8_memory")
    md = render(result)
    report.write_outputs(result, md, pathlib.Path(args.out), "int8_memory")
    report.remove_partial(pathlib.Path(args.out), "int8_memory")
    print(md)
    ok = all("error" not in m for r in result["models"].values() for m in [*r["memory"].values(), r["quality"]])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
