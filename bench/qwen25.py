"""Qwen2.5-VL on 3B-shaped random weights: vision tower and decode, qvl next to transformers.

Run as ``python -m qvl.bench.qwen25 [--steps 16] [--rounds 3] [--out bench/results]``.

One ``Qwen2_5_VLForConditionalGeneration`` with Qwen2.5-VL-3B-Instruct's config (bf16 as the
release; matrices normal(0, 0.02), norm scales 1, biases 0) is built in memory, and qvl's model
is assigned the very same tensors, so both engines compute with identical weights and the
process holds one copy (7.5 GB). Everything runs in this one process, the engines alternating
call by call (who goes first alternates too): the host's speed moves by 2x within minutes, and
alternation exposes both engines to the same load.

* vision: random pixel rows for one picture through each tower (transformers'
  ``model.visual(pixel_values, grid_thw)``, qvl's ``VisionTower.encode``), one warm-up call each,
  then ``--rounds`` alternating timed calls. Cases: 448x448 (1024 patches, 16 windows of
  112 px) and 1288x728 (4784 patches). GFLOP counts the tower's useful work (window attention
  in the windowed blocks, per-frame attention in the others; multiply-add = 2).
* decode: both prefill the same 64 text tokens (untimed), then ``--steps`` greedy steps, batch
  1; step k of one engine right after step k of the other. transformers runs its own
  ``DynamicCache``; qvl its static cache. Achieved GB/s = bf16 bytes of the decoder's linears
  and the head read per token / step time, next to the machine's copy bandwidth.

Agreement is recorded as a check that both engines compute the same function: the towers'
max |diff| / max |transformers| and how many greedy tokens match.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import statistics
import time

import torch

from qvl.bench import probe, report
from qvl.bench.fixtures import init_random_

log = logging.getLogger("qvl.bench.qwen25")

# Qwen/Qwen2.5-VL-3B-Instruct config.json (text fields and vision_config)
TEXT_3B = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1000000.0,
               max_position_embeddings=128000, max_window_layers=70, sliding_window=32768,
               use_sliding_window=False, hidden_act="silu", tie_word_embeddings=True)
VISION_3B = dict(depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16, in_chans=3,
                 out_hidden_size=2048, patch_size=14, spatial_merge_size=2, spatial_patch_size=14, window_size=112,
                 fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, temporal_patch_size=2)
MROPE_3B = [16, 24, 24]
CASES = {"448x448": (1, 32, 32), "1288x728": (1, 52, 92)}
PROMPT_LEN = 64


def config_3b() -> dict:
    """The release's config.json, with its special token ids."""
    return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", **TEXT_3B,
            "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
            "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
            "video_token_id": 151656, "rope_scaling": {"type": "mrope", "mrope_section": MROPE_3B},
            "torch_dtype": "bfloat16", "vision_config": dict(VISION_3B)}


def build_pair(raw: dict, seed: int = 0):
    """(transformers model, qvl model) of config.json ``raw``, sharing one set of random bf16 weights."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from qvl.model.config import Qwen2VLConfig
    from qvl.model.qwen2_vl import Qwen2VL
    from qvl.runtime.loader import IGNORED, hf_to_qvl

    hf_cfg = Qwen2_5_VLConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    hf_cfg._attn_implementation = "sdpa"
    with torch.device("meta"):  # no fp32 copy, no default init pass over 3.75B parameters
        hf = Qwen2_5_VLForConditionalGeneration(hf_cfg).to(torch.bfloat16)
    hf = hf.to_empty(device="cpu")
    hf.tie_weights()
    # to_empty leaves the computed rotary tables uninitialised: rebuild them
    for name, mod in list(hf.named_modules()):
        if type(mod).__name__ in ("Qwen2_5_VLRotaryEmbedding", "Qwen2_5_VLVisionRotaryEmbedding"):
            parent, _, leaf = name.rpartition(".")
            setattr(hf.get_submodule(parent), leaf, type(mod)(mod.config))
    t0 = time.perf_counter()
    init_random_(hf.named_parameters(), seed)
    log.info("random 3B weights in %.0f s", time.perf_counter() - t0)
    hf.eval()

    cfg = Qwen2VLConfig.from_hf(raw)
    with torch.device("meta"):
        ours = Qwen2VL(cfg)
    state = {hf_to_qvl(k): v for k, v in hf.state_dict().items() if not IGNORED.search(k)}
    state.pop("lm_head.weight", None)  # tied: the embedding
    missing, unexpected = ours.load_state_dict(state, assign=True, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"name map: missing {missing[:5]}, unexpected {unexpected[:5]}")
    ours.tie_weights()
    ours.init_buffers("cpu")
    return hf, ours.eval()


def tower_gflop(cfg, grid) -> float:
    """Useful FLOPs of one tower call (GFLOP): linears, attention inside windows or frames, merger."""
    from qvl.model.vision import window_index

    t, h, w = grid
    n, e, i = t * h * w, cfg.embed_dim, cfg.intermediate_size
    _, cu = window_index(torch.tensor([grid]), cfg.spatial_merge_size, cfg.window_units)
    win = float((cu.diff().double() ** 2).sum())
    frame = float(t * (h * w) ** 2)
    # multiply-adds: per block and patch qkv + proj (4 e^2) and the gated MLP (3 e i); per segment
    # of L patches QK^T and AV (2 L^2 e); the patch embed and the merger's two linears
    blocks = cfg.depth * (4 * e * e + 3 * e * i) * n
    attn = sum(2 * e * (frame if b in cfg.fullatt_block_indexes else win) for b in range(cfg.depth))
    m = e * cfg.spatial_merge_size**2
    merger = n // cfg.spatial_merge_size**2 * (m * m + m * cfg.hidden_size)
    return 2 * (blocks + attn + cfg.patch_dim * e * n + merger) / 1e9


def bench_vision(hf, ours, rounds: int, cases: dict = CASES) -> list[dict]:
    rows = []
    for case, grid in cases.items():
        g = torch.Generator().manual_seed(1)
        pv = torch.randn(grid[0] * grid[1] * grid[2], ours.cfg.vision.patch_dim, generator=g)
        grid_t = torch.tensor([grid])
        engines = {"transformers": lambda: hf.model.visual(pv, grid_thw=grid_t).pooler_output,
                   "qvl": lambda: ours.visual.encode(pv, grid_t)}
        times = {k: [] for k in engines}
        with torch.inference_mode():
            outs = {k: f() for k, f in engines.items()}  # warm-up, and the agreement check
            names = list(engines)
            for r in range(rounds):
                for k in names[r % 2:] + names[:r % 2]:
                    t0 = time.perf_counter()
                    engines[k]()
                    times[k].append(time.perf_counter() - t0)
                log.info("vision %s round %d/%d: %s", case, r + 1, rounds,
                         ", ".join(f"{k} {1e3 * v[-1]:.0f} ms" for k, v in times.items()))
        ref = outs["transformers"].float()
        rel = float((outs["qvl"].float() - ref).abs().max() / ref.abs().max())
        gflop = tower_gflop(ours.cfg.vision, grid)
        for k, ts in times.items():
            rows.append({"case": case, "patches": int(pv.shape[0]), "engine": k, "min_ms": 1e3 * min(ts),
                         "median_ms": 1e3 * statistics.median(ts), "gflop": gflop,
                         "gflop_s": gflop / min(ts), "max_rel_diff": rel, "times_s": ts})
    return rows


def bench_decode(hf, ours, steps: int) -> dict:
    from transformers import DynamicCache

    vocab = ours.cfg.text.vocab_size
    ids = (torch.arange(PROMPT_LEN) * 7919 % (vocab - 16) + 3)[None]  # fixed tokens, inside any vocab
    ours.setup_caches(1, PROMPT_LEN + steps + 1, torch.bfloat16)
    times, toks = {"transformers": [], "qvl": []}, {"transformers": [], "qvl": []}
    with torch.inference_mode():
        cache = DynamicCache(config=hf.config)
        out = hf(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        hf_tok = out.logits[:, -1].argmax(-1)
        pos = torch.arange(PROMPT_LEN)
        our_tok = ours.logits(ours(ours.embed_tokens(ids), pos.expand(3, 1, -1), pos, None, PROMPT_LEN)[:, -1]).argmax(-1)

        def hf_step():
            nonlocal hf_tok
            o = hf(input_ids=hf_tok[:, None], cache=cache, use_cache=True)
            hf_tok = o.logits[:, -1].argmax(-1)
            return hf_tok

        def our_step(slot):
            nonlocal our_tok
            h = ours(ours.embed_tokens(our_tok[:, None]), torch.full((3, 1, 1), slot), torch.tensor([slot]), None,
                     slot + 1)
            our_tok = ours.logits(h[:, -1]).argmax(-1)
            return our_tok

        toks["transformers"].append(int(hf_tok))
        toks["qvl"].append(int(our_tok))
        for step in range(steps):
            order = [("transformers", hf_step), ("qvl", lambda: our_step(PROMPT_LEN + step))]
            for k, f in order[step % 2:] + order[:step % 2]:
                t0 = time.perf_counter()
                toks[k].append(int(f()))
                times[k].append(time.perf_counter() - t0)
            if (step + 1) % 4 == 0:
                log.info("decode step %d/%d: %s", step + 1, steps,
                         ", ".join(f"{k} {1e3 * v[-1]:.0f} ms" for k, v in times.items()))
    linear_bytes = sum(m.weight.numel() * m.weight.element_size() for n, m in ours.named_modules()
                       if n.startswith("layers.") and isinstance(m, torch.nn.Linear))
    read = linear_bytes + ours.lm_head.weight.numel() * ours.lm_head.weight.element_size()
    out = {"decode_bytes_per_token": read, "tokens": toks,
           "tokens_agree": sum(a == b for a, b in zip(toks["qvl"], toks["transformers"])),
           "tokens_total": len(toks["qvl"])}
    for k, ts in times.items():
        ts = ts[2:] if len(ts) > 4 else ts  # the first steps warm caches and allocators
        out[k] = {"step_ms_min": 1e3 * min(ts), "step_ms_median": 1e3 * statistics.median(ts),
                  "tok_s_median": 1 / statistics.median(ts), "gb_s_best": read / min(ts) / probe.GB,
                  "steps": len(ts), "times_s": ts}
    return out


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# Qwen2.5-VL-3B shapes: qvl vs transformers (vision tower, decode)", "",
             f"{m['date']}, `python -m qvl.bench.qwen25` (--rounds {res['rounds']} --steps {res['steps']} "
             f"--cases {','.join(dict.fromkeys(r['case'] for r in res['vision']))}). "
             f"{m['cpu_model']}, {res['threads']} threads, torch {m['torch']}, transformers {m['transformers']}; "
             f"load average {m['loadavg_start'][0]:.1f} at the start, {res['loadavg_end']:.1f} at the end (the cores "
             f"are shared). Random bf16 weights with the release's config, the same tensors in both engines, one "
             f"process, engines alternating call by call. Copy bandwidth {res['copy_gb_s']:.1f} GB/s.", "",
             "## Vision tower (bf16)", ""]
    rows = []
    for r in res["vision"]:
        base = next(x for x in res["vision"] if x["case"] == r["case"] and x["engine"] == "transformers")
        rows.append([r["case"], r["patches"], r["engine"], report.fmt(r["min_ms"], "{:.0f}"),
                     report.fmt(r["median_ms"], "{:.0f}"), report.fmt(r["gflop"], "{:.0f}"),
                     report.fmt(r["gflop_s"], "{:.0f}"), report.fmt(base["min_ms"] / r["min_ms"], "{:.2f}x"),
                     report.fmt(r["max_rel_diff"], "{:.1e}")])
    lines += report.table(["case", "patches", "engine", "min ms", "median ms", "GFLOP", "GFLOP/s",
                           "speed vs transformers", "max rel diff"], rows, "llrrrrrrr")
    d = res["decode"]
    lines += ["", f"## Decode (bf16, batch 1, {PROMPT_LEN}-token prompt, {res['steps']} steps)", ""]
    rows = []
    for k in ("transformers", "qvl"):
        r = d[k]
        rows.append([k, report.fmt(r["step_ms_min"], "{:.0f}"), report.fmt(r["step_ms_median"], "{:.0f}"),
                     report.fmt(r["tok_s_median"], "{:.2f}"), report.fmt(r["gb_s_best"], "{:.1f}"),
                     report.fmt(d["transformers"]["step_ms_median"] / r["step_ms_median"], "{:.2f}x")])
    lines += report.table(["engine", "min ms/step", "median ms/step", "tok/s (median)", "achieved GB/s (best)",
                           "speed vs transformers"], rows, "lrrrrr")
    lines += ["", f"Bytes read per token: {d['decode_bytes_per_token'] / probe.GB:.2f} GB (decoder linears + head, "
              f"bf16). Greedy tokens equal in {d['tokens_agree']} of {d['tokens_total']} steps (bf16 on both sides; "
              "sums in other orders can flip near-ties). max rel diff: max |qvl - transformers| / max |transformers| "
              "of the merged vision features.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=probe.usable_cores())
    ap.add_argument("--cases", default=",".join(CASES), help=f"vision cases, of {', '.join(CASES)}")
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    machine = probe.machine_info()
    copy = probe.copy_bandwidth()
    hf, ours = build_pair(config_3b())
    res = {"machine": machine, "rounds": args.rounds, "steps": args.steps, "threads": args.threads,
           "copy_gb_s": copy["bandwidth_gb_s"], "config": config_3b()}
    res["vision"] = bench_vision(hf, ours, args.rounds, {c: CASES[c] for c in args.cases.split(",")})
    res["decode"] = bench_decode(hf, ours, args.steps)
    import os

    res["loadavg_end"] = os.getloadavg()[0]
    res["peak_rss_gb"] = probe.peak_rss_kb() / 2**20
    paths = report.write_outputs(res, markdown(res), args.out, "qwen25-3b")
    log.info("wrote %s", ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
