"""Quantized CPU benchmark: qvl fp32 / bf16 / GPTQ-Int8 / GPTQ-Int4 / AWQ on Qwen2-VL-2B shapes.

Run as ``python -m qvl.bench.quant [--schemes fp32,bf16,int8,int4,awq] [--new-tokens 32]``.

The float checkpoint is the benchmarks' cached random-weight Qwen2-VL-2B (bf16,
:mod:`qvl.bench.fixtures`, as ``qvl.bench.core`` uses). Each quantized scheme is an RTN
quantization of its decoder linears (group 128, the recipe of Qwen's releases minus the
calibration: speed does not depend on it) written in the official layout (AutoGPTQ v1 sym /
AutoAWQ gemm, ``quantization_config`` in config.json) and cached beside it. Vision tower,
embeddings and the (tied) lm_head stay bf16, as in Qwen's releases.

Every engine runs in a fresh process (:mod:`qvl.bench.harness`) through ``qvl.bench.core``'s own
measurement (same image, prompt, warm-up, best-of-N greedy runs with eos ignored, threads), so
the numbers compare with ``core-*.md``. Added per scheme: resident bytes of the decoder linears,
and the bytes one decode step reads (decoder linears + lm_head) which, times tokens/s, is the
achieved GB/s set against the machine's copy bandwidth. transformers bf16 is the reference: taken from
``core-bfloat16.json`` when that exists for the same token count, else run here.

``*-q8head`` schemes load the same checkpoints with ``head="int8"`` (:mod:`qvl.runtime.head`).
Quality: each scheme's KL against the bf16 checkpoint and top-1 agreement per text token,
teacher-forced over synthetic chats (:func:`kl_worker`, one process, one model at a time).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
from contextlib import contextmanager
from typing import NamedTuple

from qvl.bench import core, fixtures, harness, interleave, probe, report
from qvl.bench.probe import GB
from qvl.bench.report import fmt as _f

log = logging.getLogger("qvl.bench.quant")

BUILD_VERSION = 1


class Scheme(NamedTuple):
    kind: str | None  # quantized checkpoint kind (None: the float checkpoint)
    dtype: str  # activations
    kernel: str = "auto"  # the quantized linears' kernel
    head: str = "checkpoint"  # qvl.load(head=...): the artifact's head, or one quantized at load


SCHEMES = {
    "fp32": Scheme(None, "float32"),
    "bf16": Scheme(None, "bfloat16"),
    "int8": Scheme("gptq-int8", "bfloat16"),
    "int4": Scheme("gptq-int4", "bfloat16"),
    "awq": Scheme("awq", "bfloat16"),
    # torch's own int4 kernel on the same checkpoint: what qvl's CPU kernel is measured against
    "int4-torch": Scheme("gptq-int4", "bfloat16", "int4pack"),
    "int4-fp32": Scheme("gptq-int4", "float32"),  # fp32 activations (torch's int4 kernel: bf16 only)
    # the tied 151936 x 1536 head as 8-bit rows (runtime/head.py): 40% of an int4 step's bytes otherwise
    "int4-q8head": Scheme("gptq-int4", "bfloat16", head="int8"),
    "int8-q8head": Scheme("gptq-int8", "bfloat16", head="int8"),
    # activations rounded to int8 per 32 columns inside the kernel (as llama.cpp's Q8_0 dot products)
    "int4-a8": Scheme("gptq-int4", "bfloat16", "qvl-a8"),
    "int8-a8": Scheme("gptq-int8", "bfloat16", "qvl-a8"),
    "int4-a8-q8head": Scheme("gptq-int4", "bfloat16", "qvl-a8", "int8"),
    "int8-a8-q8head": Scheme("gptq-int8", "bfloat16", "qvl-a8", "int8"),
    # the head in 4-bit groups of 128 (125 MB on the 2B shapes): llama.cpp's Q4_0 files keep theirs in Q6_K
    "int4-a8-q4head": Scheme("gptq-int4", "bfloat16", "qvl-a8", "int4"),
    "int8-a8-q4head": Scheme("gptq-int8", "bfloat16", "qvl-a8", "int4"),
}


# --------------------------------------------------------------------------------------------
# quantized checkpoints (RTN, official layouts)


def quant_config(kind: str, group: int) -> dict:
    """The exporter's quantization_config for ``kind`` (Qwen's release recipe, RTN here)."""
    from qvl.export.quantize import quantization_config
    from qvl.export.layerwise import QuantSpec

    if kind == "awq":
        return quantization_config(QuantSpec("rtn", "awq", 4, group, sym=False))
    return quantization_config(QuantSpec("rtn", "gptq", {"gptq-int4": 4, "gptq-int8": 8}[kind], group, sym=True))


def _write_quantized(src: pathlib.Path, out: pathlib.Path, kind: str, group: int) -> None:
    import re

    import torch
    from safetensors.torch import save_file

    from qvl.quant.packing import pack_awq, pack_gptq
    from qvl.quant.rtn import Grid, rtn
    from qvl.runtime.weights import Checkpoint

    linear = re.compile(r"^model\.(language_model\.)?layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
    qcfg = quant_config(kind, group)
    ckpt = Checkpoint(src)
    tensors = {}
    with torch.no_grad():
        for name in ckpt.keys():
            t = ckpt.get(name)
            if not linear.match(name):
                tensors[name] = t
                continue
            prefix = name[: -len(".weight")]
            sym = kind != "awq"  # GPTQ releases: symmetric; AWQ: [min, max] with a zero point
            qw = rtn(t, Grid(qcfg["bits"], group, sym, include_zero=sym))
            q, zeros, scales = qw.q.t().contiguous(), qw.zeros, qw.scales
            if kind == "awq":
                qweight, qzeros = pack_awq(q, zeros)
            else:
                qweight, qzeros = pack_gptq(q, zeros, qcfg["bits"])
                tensors[prefix + ".g_idx"] = torch.arange(t.shape[1], dtype=torch.int32) // group
            tensors.update({prefix + ".qweight": qweight, prefix + ".qzeros": qzeros, prefix + ".scales": scales})
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("model.safetensors.index.json", fixtures.BUILD_MARKER):
            shutil.copy2(f, out / f.name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = qcfg
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def ensure_quantized(src: pathlib.Path, kind: str, group: int) -> pathlib.Path:
    """The cached ``kind`` quantization of ``src``, built atomically when missing or stale."""
    stamp = {"build_version": BUILD_VERSION, "kind": kind, "group_size": group,
             "source": fixtures.read_marker(src)}
    return fixtures.build_cached(src.parent / f"{src.name}-{kind}-g{group}",
                                 lambda out: _write_quantized(src, out, kind, group), {"stamp": stamp},
                                 lambda p: (fixtures.read_marker(p) or {}).get("stamp") == stamp)


# --------------------------------------------------------------------------------------------
# worker: core's qvl measurement, plus the bytes the loaded model holds


def weight_bytes(model) -> dict:
    """Resident bytes of the decoder linears, and of what one decode step reads (+ lm_head)."""
    from torch import nn

    from qvl.quant.linear import QuantLinear

    def size(m) -> int:
        if isinstance(m, QuantLinear):
            return m.nbytes()
        return sum(t.numel() * t.element_size() for t in (m.weight, m.bias) if t is not None)

    linears = [m for layer in model.layers for m in layer.modules() if isinstance(m, (nn.Linear, QuantLinear))]
    decoder = sum(size(m) for m in linears)
    return {"decoder_linear_bytes": decoder, "lm_head_bytes": size(model.lm_head),
            "bytes_per_token": decoder + size(model.lm_head),
            "kernels": sorted({getattr(m, "kernel", "dense") for m in linears})}


@contextmanager
def _loading_head(head: str):
    """``qvl.load`` with ``head=head`` bound, for ``core.measure_qvl``, which loads with the default."""
    import qvl

    load = qvl.load
    qvl.load = lambda path, **options: load(path, **dict(options, head=head))
    try:
        yield
    finally:
        qvl.load = load


@harness.worker(memory=True)
def qvl_worker(spec: dict, res: dict) -> None:
    """core's measurement of ``spec["ckpt"]``; ``spec["head"]`` (default "checkpoint") as qvl.load's."""
    res["kind"] = "qvl"
    res["head"] = spec.get("head", "checkpoint")
    with _loading_head(res["head"]):
        engine = core.measure_qvl(spec, res)
    res.update(weight_bytes(engine.model))


# --------------------------------------------------------------------------------------------
# worker: KL against the float model


KL_MAX_SEQ = 1024


def kl_samples(n: int) -> list:
    """``n`` synthetic chats (a picture, a question, the reference answer), the tasks in turn."""
    from qvl.export.synth import TASKS, make_sample

    return [make_sample(TASKS[i % len(TASKS)], i, seed=7) for i in range(n)]


def kl_measure(ref: tuple, models: dict[str, tuple], chats: int) -> dict:
    """KL(ref || model) and top-1 agreement per text token, teacher-forced over ``chats`` chats.

    ``ref`` and each model are (ckpt, dtype[, kernel[, head]]); loaded one at a time, so a
    process holds the reference's log-probabilities and one model, never two models.
    """
    import torch

    import qvl

    def load(ckpt, dtype, kernel="auto", head="checkpoint"):
        return qvl.load(ckpt, dtype=dtype, quant_kernel=kernel, head=head, max_seq_len=KL_MAX_SEQ,
                        prefix_cache_mb=0, vision_cache_mb=0)

    samples = kl_samples(chats)
    eng = load(*ref)
    refs = []  # (messages, answer ids, log-probs [N, vocab], targets [N])
    for s in samples:
        answer = eng.tokenizer.encode(s.answer)
        refs.append((s.messages(), answer, *eng.text_logprobs(s.messages(), answer)))
    eng.close()
    out = {}
    for name, model in models.items():
        log.info("KL: %s", name)
        eng = load(*model)
        kl = top1 = n = 0.0
        for messages, answer, lp_ref, targets in refs:
            lp, t = eng.text_logprobs(messages, answer)
            if not torch.equal(t, targets):
                raise RuntimeError(f"{name}: other text tokens than the reference's")
            kl += float((lp_ref.exp() * (lp_ref - lp)).sum())
            top1 += float((lp_ref.argmax(-1) == lp.argmax(-1)).sum())
            n += len(targets)
        eng.close()
        out[name] = {"kl": kl / n, "top1": top1 / n, "tokens": int(n)}
    return out


@harness.worker(memory=True)
def kl_worker(spec: dict, res: dict) -> None:
    """``spec``: {"ref": [ckpt, dtype], "models": {name: [ckpt, dtype, kernel, head]}, "chats": N}."""
    res["models"] = kl_measure(tuple(spec["ref"]), {k: tuple(v) for k, v in spec["models"].items()},
                               spec["chats"])


# --------------------------------------------------------------------------------------------
# report


def _transformers_reference(out: pathlib.Path, new_tokens: int, config: str) -> dict | None:
    path = out / ("core-bfloat16.json" if config == "qwen2vl-2b" else f"core-{config}-bfloat16.json")
    try:
        prev = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    r = (prev.get("engines") or {}).get("transformers") or {}
    if "error" in r or not r.get("decode_tok_s") or prev.get("new_tokens") != new_tokens:
        return None
    return dict(r, source=f"{path.name} ({prev['machine']['date']})")


def summarize(result: dict) -> None:
    bw = (result.get("bandwidth") or {}).get("bandwidth_gb_s")
    base = result["engines"].get("bf16") or {}
    for r in result["engines"].values():
        if "error" in r or not r.get("decode_tok_s"):
            continue
        if "bytes_per_token" in r:
            r["achieved_gb_s"] = r["decode_tok_s"] * r["bytes_per_token"] / GB
            if bw:
                r["roofline_tok_s"] = bw * GB / r["bytes_per_token"]
                r["fraction_of_roofline"] = r["decode_tok_s"] / r["roofline_tok_s"]
        if base.get("decode_tok_s"):
            r["decode_vs_qvl_bf16"] = r["decode_tok_s"] / base["decode_tok_s"]


def summarize_interleaved(result: dict) -> None:
    bw = (result.get("bandwidth") or {}).get("bandwidth_gb_s")
    models = (result.get("interleaved") or {}).get("models") or {}
    base = (models.get("bf16") or {}).get("tok_s_median")
    for r in models.values():
        if base:
            r["vs_bf16"] = r["tok_s_median"] / base
        if r.get("bytes_per_token"):
            r["achieved_gb_s"] = r["tok_s_median"] * r["bytes_per_token"] / GB
            if bw:
                r["fraction_of_roofline"] = r["achieved_gb_s"] / bw


def _interleaved_lines(result: dict) -> list[str]:
    inter = result.get("interleaved")
    if not inter:
        return []
    if "error" in inter:
        return ["", f"Interleaved decode comparison failed: {inter['error']}"]
    lines = ["", f"Decode steps of the bf16 / quantized models loaded in one process and run interleaved, "
                 f"step by step ({PROMPT_NOTE}), so all see the same contention:", "",
             "| scheme | step ms (median) | step ms (best) | tok/s (median) | vs bf16 | achieved GB/s | of copy bw |",
             "|---" * 7 + "|"]
    for name, r in inter["models"].items():
        lines.append(" | ".join([f"| {name}", _f(r["step_ms_median"], "{:.1f}"), _f(r["step_ms_min"], "{:.1f}"),
                                 _f(r["tok_s_median"]), _f(r.get("vs_bf16"), "{:.2f}x"),
                                 _f(r.get("achieved_gb_s"), "{:.1f}"),
                                 _f(r.get("fraction_of_roofline") and 100 * r["fraction_of_roofline"], "{:.0f}%")])
                     + " |")
    return lines


PROMPT_NOTE = "64-token text prompt prefilled untimed, then greedy steps; embed + decoder + lm_head + argmax"


def render_markdown(result: dict) -> str:
    m = result["machine"]
    bw = (result.get("bandwidth") or {}).get("bandwidth_gb_s")
    lines = [
        f"# qvl quantized benchmark: {result['config']} (random weights, RTN group {result['group_size']})",
        "",
        f"{m['cpu_model']}, {m['usable_cores']} cores ({m['cpu_capability']}), torch {m['torch']}, "
        f"transformers {m['transformers']}; {m['date']}; load avg at start {m['loadavg_start'][0]:.2f}, "
        f"end {m.get('loadavg_end', [0])[0]:.2f}.",
        f"Input: one {fixtures.IMAGE_SIZE}x{fixtures.IMAGE_SIZE} image + \"{fixtures.PROMPT}\" "
        f"({result.get('prompt_tokens', '?')} prompt tokens), greedy, {result['new_tokens']} new tokens, batch 1, "
        f"{result['threads']} threads, warmed up once, best of {result.get('repeats', 1)} timed runs, each engine in a "
        f"fresh process" + (f", OMP_WAIT_POLICY={result['omp_wait_policy']}. " if result.get("omp_wait_policy")
                            else ". ") +
        f"Copy bandwidth {_f(bw, '{:.1f}')} GB/s ({(result.get('bandwidth') or {}).get('method', 'not measured')}; "
        f"best of the measurements before and after the engines: "
        f"{', '.join(_f(x, '{:.1f}') for x in (result.get('bandwidth') or {}).get('measurements_gb_s', []))}).",
        "",
        "| scheme | activations | kernel | head | load s | first token s | decode tok/s | vs qvl bf16 | peak RSS GB "
        "| decoder weights GB | read/token GB | achieved GB/s | of copy bw | KL vs bf16 | top-1 |",
        "|---" * 15 + "|",
    ]
    for name in result["schemes"]:
        r = result["engines"].get(name) or {"error": "not run"}
        if "error" in r:
            lines.append(f"| {name} | ERROR: {str(r['error'])[:150]} |" + " |" * 13)
            continue
        lines.append(" | ".join([
            f"| {r.get('label', name)}", r.get("act_dtype", "-"), ",".join(r.get("kernels", ["-"])),
            r.get("head", "-"), _f(r.get("load_s")), _f(r.get("first_token_s")), _f(r.get("decode_tok_s")),
            _f(r.get("decode_vs_qvl_bf16"), "{:.2f}x"), _f(r.get("peak_rss_gb")),
            _f(r.get("decoder_linear_bytes") and r["decoder_linear_bytes"] / GB, "{:.3f}"),
            _f(r.get("bytes_per_token") and r["bytes_per_token"] / GB, "{:.3f}"),
            _f(r.get("achieved_gb_s"), "{:.1f}"), _f(r.get("fraction_of_roofline") and
                                                    100 * r["fraction_of_roofline"], "{:.0f}%"),
            _f(r.get("kl"), "{:.2e}"), _f(r.get("top1") and 100 * r["top1"], "{:.1f}%")]) + " |")
    lines.append("")
    lines.append("read/token = decoder linears (packed weights + scales/zeros + biases) + lm_head, as held in "
                 "memory; achieved GB/s = that x decode tok/s; 'of copy bw' = decode tok/s over copy bandwidth / "
                 "read/token. transformers' row uses its bf16 weight bytes.")
    if result.get("kl"):
        kl = result["kl"]
        lines.append(f"KL vs bf16: KL(bf16 checkpoint || scheme) per text token, teacher-forced over "
                     f"{kl['chats']} synthetic chats (a picture, a question, its answer); top-1: how often the two "
                     f"agree on the most likely token. Random weights: what the rounding does to these shapes, not to "
                     f"a trained model." + (f" KL failed: {kl['error']}" if "error" in kl else ""))
    lines += _interleaved_lines(result)
    tf = result["engines"].get("transformers") or {}
    if tf.get("source"):
        lines.append(f"transformers numbers reused from {tf['source']}, not re-run.")
    shares = {n: r.get("other_cpu_share") for n, r in result["engines"].items() if r.get("other_cpu_share")}
    if shares:
        lines.append("")
        lines.append("CPU used by other processes while each ran: " +
                     ", ".join(f"{n} {100 * v:.0f}%" for n, v in shares.items()) + ".")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default=",".join(SCHEMES), help=f"comma-separated subset of {','.join(SCHEMES)}")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per engine; the table shows the best")
    ap.add_argument("--interleaved-steps", type=int, default=40,
                    help="decode steps per model in the one-process interleaved comparison (0: skip)")
    ap.add_argument("--config", choices=tuple(core.CONFIGS), default="qwen2vl-2b")
    ap.add_argument("--group-size", type=int, default=None, help="default 128 (2B), 32 (tiny)")
    ap.add_argument("--transformers", choices=("auto", "run", "skip"), default="auto",
                    help="auto: reuse core-bfloat16.json's transformers numbers when present, else run")
    ap.add_argument("--kl-chats", type=int, default=8,
                    help="synthetic chats for each scheme's KL against the bf16 checkpoint (0: skip)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--wait-idle", type=float, default=0.0, help="wait up to this long for other load to go")
    args = ap.parse_args(argv)
    harness.setup()
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    if not schemes or any(s not in SCHEMES for s in schemes):
        ap.error(f"--schemes must be a subset of {','.join(SCHEMES)}")
    group = args.group_size or (128 if args.config == "qwen2vl-2b" else 32)
    threads = args.threads or probe.usable_cores()
    out = pathlib.Path(args.out)

    base = fixtures.ensure_checkpoint(args.config)
    ckpts = {s: base if SCHEMES[s].kind is None else ensure_quantized(base, SCHEMES[s].kind, group) for s in schemes}
    result = {"config": args.config, "group_size": group, "new_tokens": args.new_tokens, "threads": threads,
              "repeats": args.repeats, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "schemes": schemes + (["transformers"] if args.transformers != "skip" else []),
              "machine": probe.machine_info(), "checkpoints": {s: str(p) for s, p in ckpts.items()}, "engines": {}}
    with tempfile.TemporaryDirectory(prefix="qvl-bench-quant-") as work:
        work = pathlib.Path(work)
        spec = {"image": str(fixtures.make_image(work / "bench.png")), "new_tokens": args.new_tokens,
                "threads": threads, "repeats": args.repeats, "bandwidth_bytes": core.bandwidth_bytes(args.config)}
        if args.wait_idle:
            probe.wait_for_idle(args.wait_idle)
        bandwidth = [core.run_worker(core.bandwidth_worker, spec, args.timeout)]
        for s in schemes:
            kind, dtype, kernel, head = SCHEMES[s]
            probe.warm_page_cache(ckpts[s])
            if args.wait_idle:
                probe.wait_for_idle(args.wait_idle)
            log.info("%s: qvl %s on %s, head %s", s, dtype, ckpts[s].name, head)
            r = harness.run(qvl_worker, dict(spec, ckpt=str(ckpts[s]), dtype=dtype, quant_kernel=kernel, head=head),
                            timeout=args.timeout, label=s)
            result["engines"][s] = dict(r, act_dtype=dtype, label=f"qvl {s}" + (f" ({kind})" if kind else ""))
        if args.transformers != "skip":
            tf = _transformers_reference(out, args.new_tokens, args.config) if args.transformers == "auto" else None
            if tf is None:
                probe.warm_page_cache(base)
                if args.wait_idle:
                    probe.wait_for_idle(args.wait_idle)
                tf = core.run_worker(core.transformers_worker, dict(spec, ckpt=str(base), dtype="bfloat16"),
                                     args.timeout)
            raw = json.loads((base / "config.json").read_text())
            bpt = core.decoder_bytes_per_token(raw, "bfloat16")["bytes"]
            result["engines"]["transformers"] = dict(tf, act_dtype="bfloat16", kernels=["dense"],
                                                     label="transformers bf16", bytes_per_token=bpt)
        # fp32 would need 9 GB more in one process; interleave loads the checkpoint's head only
        steps = [s for s in schemes if SCHEMES[s].dtype != "float32" and SCHEMES[s].head == "checkpoint"]
        if args.interleaved_steps and steps:
            log.info("decode steps of %s interleaved in one process", ",".join(steps))
            result["interleaved"] = harness.run(
                interleave.decode_worker,
                {"models": {s: [str(ckpts[s]), SCHEMES[s].dtype, SCHEMES[s].kernel] for s in steps},
                 "steps": args.interleaved_steps,
                 "threads": threads}, timeout=args.timeout, label="interleaved")
            for s, r in (result["interleaved"].get("models") or {}).items():
                r["bytes_per_token"] = result["engines"].get(s, {}).get("bytes_per_token")
        scored = [s for s in schemes if SCHEMES[s] != SCHEMES["bf16"]]
        if args.kl_chats and scored:
            log.info("KL of %s against bf16 over %d chats", ",".join(scored), args.kl_chats)
            kl = harness.run(kl_worker, {"ref": [str(base), "bfloat16"], "chats": args.kl_chats,
                                         "models": {s: [str(ckpts[s]), *SCHEMES[s][1:]] for s in scored}},
                             timeout=args.timeout, label="kl")
            result["kl"] = dict(kl, chats=args.kl_chats)
            for s, q in (kl.get("models") or {}).items():
                result["engines"][s].update(kl=q["kl"], top1=q["top1"])
        # again at the end: the best of the two, as other processes only ever make a copy slower
        bandwidth.append(core.run_worker(core.bandwidth_worker, spec, args.timeout))
    ok = [b for b in bandwidth if b.get("bandwidth_gb_s")]
    result["bandwidth"] = dict(max(ok, key=lambda b: b["bandwidth_gb_s"]) if ok else bandwidth[0],
                               measurements_gb_s=[b.get("bandwidth_gb_s") for b in bandwidth])
    prompts = {r.get("prompt_tokens") for r in result["engines"].values() if r.get("prompt_tokens")}
    result["prompt_tokens"] = "/".join(str(p) for p in sorted(prompts)) or "?"
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    summarize(result)
    summarize_interleaved(result)
    stem = "quant" if args.config == "qwen2vl-2b" else f"quant-{args.config}"
    md = render_markdown(result)
    report.write_outputs(result, md, out, stem)
    print(md)
    return 0 if all("error" not in r for r in result["engines"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
