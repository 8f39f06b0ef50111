"""Core CPU benchmark: qvl vs transformers on a random-weight checkpoint shaped like Qwen2-VL-2B.

Run as ``python -m qvl.bench.core [--dtype bfloat16] [--new-tokens 32] [--out bench/results]``.

The checkpoint (random weights with the exact Qwen2-VL-2B-Instruct config, bf16 safetensors, the
tiny tokenizer of :mod:`qvl.scripts.tiny`) is built once and cached outside the repository under
``$QVL_BENCH_CACHE`` (default ``~/.cache/qvl/bench``; :mod:`qvl.bench.fixtures`). ``--config tiny``
uses the toy dims of ``qvl.scripts.tiny`` instead, so the whole pipeline can be smoke-tested in
seconds.

Each engine runs in its own fresh subprocess (:mod:`qvl.bench.harness`, so peak RSS is per
engine), on the same inputs: one deterministic 448x448 picture plus a short prompt, greedy, a
fixed number of new tokens (eos ignored), torch threads = number of usable cores. Each engine
runs in ``--rounds`` fresh processes interleaved with the other engine's (qvl, transformers, qvl,
...), each warmed up with one short generation and then timed ``--repeats`` times; the table
shows the best timings (the JSON keeps every run and the medians), because on a shared machine
other processes only ever make a run slower. Other processes' CPU share and major page faults
are recorded per engine; ``--omp-wait-policy passive`` keeps multi-threaded runs usable on a busy
machine, ``--wait-idle`` waits for quiet. An engine that would not fit in the available memory is
skipped (reported as an error) rather than started. Snapshots after every child go to
``core-*.partial.*.tmp``. Measured per engine:

* load s: the engine's load call (weights, tokenizer, image processor); imports excluded.
* first token s: from the messages to the first new token: image load + preprocessing,
  tokenization, vision encoder, prefill and the first sampling step.
* decode tok/s: (new_tokens - 1) / time from the first to the last new token, batch 1.
* peak RSS GB: the child process's ``VmHWM`` (``ru_maxrss`` where there is no /proc).
* achieved GB/s: decode tok/s * bytes of decoder weights read per token.

The roofline line divides the machine's memory copy bandwidth (1 GiB ``dst.copy_(src)``, read +
write bytes, best of 5) by the bytes of decoder weights read per generated token: the text
decoder's linear layers plus the lm_head, in the benchmark dtype. The vision tower is not read
during decode; norms, the one embedding row and the KV cache are left out (well under 1%).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import statistics
import sys
import tempfile
import time

from qvl.bench import harness, probe, report
from qvl.bench.fixtures import CONFIGS, IMAGE_SIZE, PROMPT, ensure_checkpoint, make_image, messages_for
from qvl.bench.probe import GB
from qvl.bench.report import fmt as _f

log = logging.getLogger("qvl.bench.core")

ENGINES = ("qvl", "transformers")
MAX_SEQ_LEN = 1024
WARMUP_NEW_TOKENS = 2


# --------------------------------------------------------------------------------------------
# roofline


def _text_dims(raw: dict) -> dict:
    t = raw.get("text_config") or raw
    return {k: t.get(k, raw.get(k)) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "num_key_value_heads", "vocab_size")}


def decoder_bytes_per_token(raw_config: dict, dtype: str) -> dict:
    """Bytes of weights one decode step reads: the decoder's linears (+ q/k/v biases) and lm_head."""
    d = _text_dims(raw_config)
    H, I, L = d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"]
    kv = d["num_key_value_heads"] * (H // d["num_attention_heads"])
    per_layer = (H * H + H) + 2 * (kv * H + kv) + H * H + 3 * H * I
    lm_head = d["vocab_size"] * H
    elsize = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    params = L * per_layer + lm_head
    return {"decoder_linear_params": L * per_layer, "lm_head_params": lm_head, "params": params,
            "bytes": params * elsize, "bytes_per_element": elsize}


def bandwidth_bytes(config: str) -> int:
    """Bytes copied to measure the bandwidth: 1 GiB, well past any cache; 128 MiB for the smoke test."""
    return (1 << 30) if config == "qwen2vl-2b" else (128 << 20)


def weights_gb(ckpt: pathlib.Path, dtype: str) -> float:
    """Size of the checkpoint's weights once loaded in ``dtype`` (the files hold bf16)."""
    stored = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    return stored * {"float32": 2, "bfloat16": 1, "float16": 1}[dtype] / GB


# --------------------------------------------------------------------------------------------
# workers: each measurement runs in its own process (qvl.bench.harness)


@harness.worker(memory=True)
def bandwidth_worker(spec: dict, res: dict) -> None:
    res.update(kind="bandwidth", **probe.copy_bandwidth(int(spec.get("bandwidth_bytes", 1 << 30))))


@harness.worker(memory=True)
def qvl_worker(spec: dict, res: dict) -> None:
    res["kind"] = "qvl"
    measure_qvl(spec, res)


def measure_qvl(spec: dict, res: dict):
    """qvl's load, warm-up and timed runs into ``res``; returns the engine."""
    t0 = time.perf_counter()
    import qvl
    res["import_s"] = time.perf_counter() - t0

    messages = messages_for(spec["image"])
    log.info("qvl: loading %s (%s)", spec["ckpt"], spec["dtype"])
    t0 = time.perf_counter()
    eng = qvl.load(spec["ckpt"], dtype=spec["dtype"], max_seq_len=MAX_SEQ_LEN, max_batch=1,
                   quant_kernel=spec.get("quant_kernel", "auto"),
                   prefix_cache_mb=0, vision_cache_mb=0)  # every timed run prefills in full, as transformers does
    res["load_s"] = time.perf_counter() - t0
    res["engine_load_s"] = getattr(eng, "load_s", None)
    res["rss_after_load_gb"] = probe.rss_now_gb()

    log.info("qvl: warmup (%d new tokens)", WARMUP_NEW_TOKENS)
    t0 = time.perf_counter()
    eng.generate(messages, max_new_tokens=WARMUP_NEW_TOKENS, ignore_eos=True)
    res["warmup_s"] = time.perf_counter() - t0

    n = spec["new_tokens"]

    def run() -> dict:
        t0 = time.perf_counter()
        text = eng.generate(messages, max_new_tokens=n, ignore_eos=True)
        wall = time.perf_counter() - t0
        st = eng.last_stats
        if st.new_tokens != n:
            raise RuntimeError(f"qvl generated {st.new_tokens} tokens, asked for {n}")
        return dict(
            total_s=wall,
            # everything but the decode steps: preprocessing, vision, prefill, first sample (+ detok)
            first_token_s=wall - st.decode_s,
            prefill_s=st.prefill_s,
            vision_s=st.vision_s,
            preprocess_s=wall - st.decode_s - st.prefill_s,
            decode_s=st.decode_s,
            decode_tok_s=st.decode_tok_s,
            new_tokens=st.new_tokens,
            prompt_tokens=st.prompt_tokens,
            output_chars=len(text),
        )

    _timed_runs("qvl", run, spec, res)
    return eng


def _timed_runs(name: str, run, spec: dict, res: dict) -> None:
    """``repeats`` timed runs; the headline numbers are the best run's, medians are kept too.

    Best-of-N because the usual disturbance on a shared CPU box is other processes, which only
    ever make a run slower.
    """
    import resource

    runs = []
    for i in range(spec["repeats"]):
        log.info("%s: timing run %d/%d (%d new tokens)", name, i + 1, spec["repeats"], spec["new_tokens"])
        flt = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        runs.append(run())
        # page faults that had to read the disk: weights evicted from the page cache under memory pressure
        runs[-1]["major_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - flt
        log.info("%s: first token %.2fs, decode %.2f tok/s", name, runs[-1]["first_token_s"],
                 runs[-1]["decode_tok_s"])
    res["runs"] = runs
    best_ft = min(runs, key=lambda r: r["first_token_s"])
    best_dec = max(runs, key=lambda r: r["decode_tok_s"])
    res.update({k: best_ft[k] for k in ("first_token_s", "prefill_s", "vision_s", "preprocess_s")})
    res.update({k: best_dec[k] for k in ("decode_s", "decode_tok_s")})
    res.update(new_tokens=runs[0]["new_tokens"], prompt_tokens=runs[0]["prompt_tokens"])
    for k in ("first_token_s", "decode_tok_s"):
        res[k + "_median"] = statistics.median(r[k] for r in runs)


def _load_hf_processor(path):
    """``AutoProcessor.from_pretrained``, also without torchvision.

    Qwen2VLProcessor insists on a video processor, which needs torchvision; the image and text
    paths never touch it, so without torchvision None stands in for it (this child process is
    thrown away afterwards, so the patch is not undone).
    """
    import importlib
    import importlib.util

    from transformers import AutoProcessor, ProcessorMixin

    if importlib.util.find_spec("torchvision") is None:
        vpa = importlib.import_module("transformers.models.auto.video_processing_auto")
        check = ProcessorMixin.check_argument_for_proper_class
        ProcessorMixin.check_argument_for_proper_class = (
            lambda self, name, arg: None if arg is None and name == "video_processor" else check(self, name, arg))
        # the lazy placeholder raises on attribute reads, so swap by hand
        type.__setattr__(vpa.AutoVideoProcessor, "from_pretrained", classmethod(lambda cls, *a, **k: None))
    return AutoProcessor.from_pretrained(path)


@harness.worker(memory=True)
def transformers_worker(spec: dict, res: dict) -> None:
    res["kind"] = "transformers"
    t0 = time.perf_counter()
    import torch
    from PIL import Image
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.generation.streamers import BaseStreamer
    res["import_s"] = time.perf_counter() - t0

    class Stamps(BaseStreamer):
        """generate() calls put() with the prompt, then once per new token right after sampling."""

        def __init__(self):
            self.t, self.first = [], True

        def put(self, value):
            if self.first:
                self.first = False
                return
            self.t.append(time.perf_counter())

        def end(self):
            pass

    dtype = getattr(torch, spec["dtype"])
    log.info("transformers: loading %s (%s)", spec["ckpt"], spec["dtype"])
    t0 = time.perf_counter()
    model = Qwen2VLForConditionalGeneration.from_pretrained(spec["ckpt"], dtype=dtype).eval()
    processor = _load_hf_processor(spec["ckpt"])
    res["load_s"] = time.perf_counter() - t0
    res["rss_after_load_gb"] = probe.rss_now_gb()
    res["attn_implementation"] = model.config._attn_implementation
    res["image_processor"] = type(processor.image_processor).__name__
    image_token_id = model.config.image_token_id

    vision_t = []
    visual = model.model.visual
    visual.register_forward_pre_hook(lambda *_: vision_t.append(time.perf_counter()))
    visual.register_forward_hook(lambda *_: vision_t.append(time.perf_counter()))

    messages = messages_for(spec["image"])

    def run(n: int) -> dict:
        stamps = Stamps()
        vision_t.clear()
        t0 = time.perf_counter()
        image = Image.open(spec["image"])
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == image_token_id).int()  # transformers 5
        t_pre = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 streamer=stamps)
        t_end = time.perf_counter()
        new = out.shape[1] - inputs["input_ids"].shape[1]
        if new != n or len(stamps.t) != n:
            raise RuntimeError(f"transformers generated {new} tokens ({len(stamps.t)} stamps), asked for {n}")
        decode_s = stamps.t[-1] - stamps.t[0]
        return dict(total_s=t_end - t0, first_token_s=stamps.t[0] - t0, preprocess_s=t_pre - t0,
                    prefill_s=stamps.t[0] - t_pre,
                    vision_s=vision_t[1] - vision_t[0] if len(vision_t) >= 2 else None,
                    decode_s=decode_s, decode_tok_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
                    new_tokens=new, prompt_tokens=int(inputs["input_ids"].shape[1]))

    log.info("transformers: warmup (%d new tokens)", WARMUP_NEW_TOKENS)
    t0 = time.perf_counter()
    run(WARMUP_NEW_TOKENS)
    res["warmup_s"] = time.perf_counter() - t0
    _timed_runs("transformers", lambda: run(spec["new_tokens"]), spec, res)


WORKERS = {"bandwidth": bandwidth_worker, "qvl": qvl_worker, "transformers": transformers_worker}


def run_worker(fn, spec: dict, timeout: float) -> dict:
    """One measurement in a fresh process; its OMP_WAIT_POLICY (read once, when OpenMP starts)
    from the spec."""
    env = {"OMP_WAIT_POLICY": spec["omp_wait_policy"]} if spec.get("omp_wait_policy") else None
    name = fn.__name__.removesuffix("_worker")
    return {"kind": name, **harness.run(fn, spec, timeout=timeout, env=env, label=name)}


# --------------------------------------------------------------------------------------------
# report


def _ok(r: dict | None) -> bool:
    return bool(r) and "error" not in r


def merge_rounds(rounds: list[dict]) -> dict:
    """One engine's result over its rounds (fresh processes): best timings, largest RSS.

    Fails only when every round failed; the failures of the other rounds are kept in ``rounds``.
    """
    ok = [r for r in rounds if _ok(r)]
    if not ok:
        return dict(rounds[0], rounds=rounds) if len(rounds) > 1 else rounds[0]
    best_ft = min(ok, key=lambda r: r["first_token_s"])
    best_dec = max(ok, key=lambda r: r["decode_tok_s"])
    merged = dict(best_ft)
    merged.update({k: best_dec[k] for k in ("decode_s", "decode_tok_s")})
    merged["load_s"] = min(r["load_s"] for r in ok)
    for k in ("peak_rss_gb", "vmhwm_gb", "rss_after_load_gb"):
        vals = [r[k] for r in ok if r.get(k) is not None]
        merged[k] = max(vals) if vals else None
    runs = [run for r in ok for run in r.get("runs", [])]
    merged["runs"] = runs
    for k in ("first_token_s", "decode_tok_s"):
        if runs:
            merged[k + "_median"] = statistics.median(run[k] for run in runs)
    shares = [r["other_cpu_share"] for r in ok if r.get("other_cpu_share") is not None]
    merged["other_cpu_share"] = sum(shares) / len(shares) if shares else None
    if len(rounds) > 1:
        merged["rounds"] = rounds
    return merged


def compute_summary(result: dict) -> None:
    bpt = result["roofline"]["bytes_per_token"]
    for r in result["engines"].values():
        if _ok(r):
            r["achieved_gb_s"] = r["decode_tok_s"] * bpt / GB
    q, t = result["engines"].get("qvl"), result["engines"].get("transformers")
    if _ok(q) and _ok(t):
        result["ratios_qvl_over_transformers"] = {
            k: (q[k] / t[k] if t.get(k) else None)
            for k in ("load_s", "first_token_s", "decode_tok_s", "peak_rss_gb", "achieved_gb_s")}
    bw = result.get("bandwidth") or {}
    if _ok(bw):
        roof = bw["bandwidth_gb_s"] * GB / bpt
        result["roofline"]["bandwidth_gb_s"] = bw["bandwidth_gb_s"]
        result["roofline"]["decode_tok_s_upper_bound"] = roof
        if _ok(q):
            result["roofline"]["qvl_fraction_of_roofline"] = q["decode_tok_s"] / roof


def render_markdown(result: dict) -> str:
    m, ro = result["machine"], result["roofline"]
    tf = result["engines"].get("transformers") or {}
    attn = tf.get("attn_implementation", "?")
    cols = ("load s", "first token s", "decode tok/s", "peak RSS GB", "achieved GB/s")
    lines = [
        f"# qvl core benchmark: {result['config']} ({result['checkpoint_desc']}), {result['dtype']}"
        + (" -- PARTIAL (still running, or interrupted)" if result.get("partial") else ""),
        "",
        f"{m['cpu_model']}, {m['usable_cores']} cores ({m['cpu_capability']}), "
        f"{_f(m['mem_total_gb'], '{:.0f}')} GB RAM; torch {m['torch']}, transformers {m['transformers']}, "
        f"qvl {m['qvl']}; {m['date']}; load avg at start {m['loadavg_start'][0]:.2f}.",
        f"Input: one {IMAGE_SIZE}x{IMAGE_SIZE} image + \"{PROMPT}\" "
        f"({result.get('prompt_tokens', '?')} prompt tokens), greedy, {result['new_tokens']} new tokens "
        f"(eos ignored), batch 1, {result['threads']} torch threads; each engine in "
        f"{result['rounds']} fresh process(es) interleaved with the other engine, each warmed up once, then "
        f"{result['repeats']} timed run(s); best of all timed runs shown"
        + (f", OMP_WAIT_POLICY={result['omp_wait_policy']}. " if result.get("omp_wait_policy") else ". ")
        + f"transformers uses its default attention (`{attn}`) and image processor "
        f"(`{tf.get('image_processor', '?')}`).",
        "",
        "| engine | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    keys = ("load_s", "first_token_s", "decode_tok_s", "peak_rss_gb", "achieved_gb_s")
    for name in result["engines_requested"]:
        r = result["engines"].get(name) or {"error": "not run"}
        label = name if name != "transformers" else f"transformers ({attn})"
        if _ok(r):
            lines.append(f"| {label} | " + " | ".join(_f(r.get(k)) for k in keys) + " |")
        else:
            err = str(r.get("error", "?")).replace("|", "/").replace("\n", " ")[:200]
            lines.append(f"| {label} | ERROR: {err} |" + " |" * (len(cols) - 1))
    ratios = result.get("ratios_qvl_over_transformers")
    if ratios:
        lines.append("| qvl/transformers | " + " | ".join(_f(ratios.get(k), "{:.2f}x") for k in keys) + " |")
    lines.append("")
    if "decode_tok_s_upper_bound" in ro:
        frac = ro.get("qvl_fraction_of_roofline")
        lines.append(
            f"Roofline: copy bandwidth {ro['bandwidth_gb_s']:.1f} GB/s (best of {len(result['bandwidth']['all_gb_s'])} "
            f"measurements) / {ro['bytes_per_token'] / GB:.3f} GB "
            f"of decoder weights per token ({result['dtype']}: linears + lm_head) = "
            f"{ro['decode_tok_s_upper_bound']:.2f} tok/s upper bound"
            + (f"; qvl reaches {100 * frac:.0f}% of it" if frac is not None else "")
            + (" (over 100%: the bandwidth runs were slowed by other load more than the engines were)."
               if frac is not None and frac > 1 else "."))
    else:
        lines.append(f"Roofline: bandwidth measurement failed ({(result.get('bandwidth') or {}).get('error')}); "
                     f"{ro['bytes_per_token'] / GB:.3f} GB of decoder weights per token.")
    lines.append("")
    med = [f"{n} {r['first_token_s_median']:.2f} s / {r['decode_tok_s_median']:.2f} tok/s"
           for n, r in result["engines"].items() if _ok(r) and "first_token_s_median" in r]
    if med and result["repeats"] * result["rounds"] > 1:
        lines.append(f"Medians of the {result['repeats'] * result['rounds']} timed runs (first token / decode): " + "; ".join(med) + ".")
    shares = {n: r.get("other_cpu_share") for n, r in result["engines"].items() if r.get("other_cpu_share") is not None}
    if shares:
        lines.append("CPU used by other processes while each engine ran (share of all cores): " + ", ".join(
            f"{n} {100 * v:.0f}%" for n, v in shares.items())
            + (" -- the machine was shared; treat the numbers as noisy." if max(shares.values()) > 0.1 else "."))
    splits = "; ".join(f"{n}: preprocess {_f(r.get('preprocess_s'))}, vision {_f(r.get('vision_s'))}, "
                       f"prefill incl. vision {_f(r.get('prefill_s'))}"
                       for n, r in result["engines"].items() if _ok(r))
    faults = {n: sum(run.get("major_faults", 0) for run in r.get("runs", []))
              for n, r in result["engines"].items() if _ok(r) and r.get("runs")}
    if faults:
        lines.append("Major page faults (disk reads) during the timed runs: " + ", ".join(
            f"{n} {v}" for n, v in faults.items())
            + (" -- weights were evicted from the page cache under memory pressure and read again."
               if max(faults.values()) > 1000 else "."))
    lines.append("first token s = image load + preprocessing + tokenization + vision encoder + prefill + "
                 "first sample." + (f" Splits (s): {splits}." if splits else ""))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default="bench/results", help="folder for core-<dtype>.json / .md")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of qvl,transformers")
    ap.add_argument("--config", choices=tuple(CONFIGS), default="qwen2vl-2b",
                    help="qwen2vl-2b: real Qwen2-VL-2B shapes; tiny: toy dims for smoke tests")
    ap.add_argument("--rounds", type=int, default=2,
                    help="fresh processes per engine, interleaved between engines (qvl, transformers, qvl, ...)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="timed runs per process after its warmup; the table shows the best of all "
                         "rounds x repeats (JSON: every run, medians)")
    ap.add_argument("--omp-wait-policy", choices=("inherit", "passive", "active"), default="inherit",
                    help="OMP_WAIT_POLICY for the children; 'passive' keeps multi-threaded runs sane on a "
                         "machine shared with other busy processes (spinning threads lose their core)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: usable cores)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per engine")
    ap.add_argument("--wait-idle", type=float, default=0.0,
                    help="before each measurement wait up to this many seconds for other CPU load to go away")
    args = ap.parse_args(argv)
    harness.setup()

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        ap.error(f"--engines must be a comma-separated subset of {','.join(ENGINES)}, got {args.engines!r}")
    if args.repeats < 1 or args.rounds < 1:
        ap.error("--repeats and --rounds must be >= 1")
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (decode speed excludes the first token)")
    threads = args.threads or probe.usable_cores()

    out = pathlib.Path(args.out)
    stem = f"core-{args.dtype}" if args.config == "qwen2vl-2b" else f"core-{args.config}-{args.dtype}"
    if threads != probe.usable_cores():
        stem += f"-t{threads}"
    ckpt = ensure_checkpoint(args.config)
    raw_config = json.loads((ckpt / "config.json").read_text())
    result = {
        "config": args.config,
        "checkpoint": str(ckpt),
        "checkpoint_desc": "random weights, Qwen2-VL-2B-Instruct config" if args.config == "qwen2vl-2b"
        else "random weights, qvl.scripts.tiny dims",
        "dtype": args.dtype,
        "new_tokens": args.new_tokens,
        "threads": threads,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") if args.omp_wait_policy == "inherit"
        else args.omp_wait_policy.upper(),
        "engines_requested": engines,
        "machine": probe.machine_info(),
        "roofline": {**{f"{k}": v for k, v in decoder_bytes_per_token(raw_config, args.dtype).items()
                        if k != "bytes"},
                     "bytes_per_token": decoder_bytes_per_token(raw_config, args.dtype)["bytes"]},
        "engines": {},
    }
    with tempfile.TemporaryDirectory(prefix="qvl-bench-") as work:
        work = pathlib.Path(work)
        image = make_image(work / "bench.png")
        spec = {"ckpt": str(ckpt), "image": str(image), "dtype": args.dtype, "new_tokens": args.new_tokens,
                "threads": threads, "repeats": args.repeats,
                "omp_wait_policy": None if args.omp_wait_policy == "inherit" else args.omp_wait_policy.upper(),
                "bandwidth_bytes": bandwidth_bytes(args.config)}
        per_engine: dict[str, list[dict]] = {name: [] for name in engines}
        bandwidth: list[dict] = []
        for rnd in range(args.rounds):
            # once per round too: on a shared machine a single measurement can land in a busy spell
            if args.wait_idle:
                probe.wait_for_idle(args.wait_idle)
            log.info("round %d/%d: measuring memory copy bandwidth", rnd + 1, args.rounds)
            bandwidth.append(run_worker(bandwidth_worker, spec, args.timeout))
            ok_bw = [b for b in bandwidth if _ok(b)]
            result["bandwidth"] = dict(max(ok_bw, key=lambda b: b["bandwidth_gb_s"]) if ok_bw else bandwidth[0],
                                       all_gb_s=[b.get("bandwidth_gb_s") for b in bandwidth])
            for name in engines:  # interleaved, so slow phases of a shared machine hit every engine
                log.info("round %d/%d: page cache warm-up, then %s in a fresh process", rnd + 1, args.rounds, name)
                # a child that does not fit would get the OOM killer going, maybe on someone else's process
                need = weights_gb(ckpt, args.dtype) + 1.5
                avail = probe.wait_for_memory(need, max(args.wait_idle, 60.0))
                if avail is not None and avail < need:
                    err = f"skipped: ~{need:.1f} GB needed, only {avail:.1f} GB available"
                    log.error("%s: %s", name, err)
                    per_engine[name].append({"kind": name, "error": err})
                    write_partial(result, per_engine, out, stem)
                    continue
                probe.warm_page_cache(ckpt)
                if args.wait_idle:
                    probe.wait_for_idle(args.wait_idle)
                per_engine[name].append(run_worker(WORKERS[name], spec, args.timeout))
                write_partial(result, per_engine, out, stem)
        result["engines"] = {name: merge_rounds(rs) for name, rs in per_engine.items()}
    finalize(result)
    md = render_markdown(result)
    paths = report.write_outputs(result, md, out, stem)
    report.remove_partial(out, stem)
    print(md)
    log.info("wrote %s and %s", *paths)
    return 0 if all(_ok(result["engines"].get(e)) for e in engines) else 1


def finalize(result: dict) -> None:
    prompts = {r.get("prompt_tokens") for r in result["engines"].values() if _ok(r)}
    if len(prompts) > 1:
        log.warning("engines saw different prompt lengths: %s", sorted(prompts))
    result["prompt_tokens"] = "/".join(str(p) for p in sorted(prompts)) if prompts else "?"
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    compute_summary(result)


def write_partial(result: dict, per_engine: dict, out: pathlib.Path, stem: str) -> None:
    """After every child: what is known so far (:func:`qvl.bench.report.write_partial`)."""
    def make():
        partial = dict(result, partial=True, engines={n: merge_rounds(rs) for n, rs in per_engine.items() if rs})
        finalize(partial)
        return partial, render_markdown(partial)

    report.write_partial(make, out, stem)


if __name__ == "__main__":
    sys.exit(main())
