"""llama.cpp beside qvl on the random Qwen2-VL-2B checkpoint: decode tok/s, first token with a picture.

Run as ``python -m qvl.bench.llamacpp [--rounds 3]``. Opt-in: the first run builds llama.cpp and
converts the checkpoint (the better part of an hour on 2 shared cores), both cached under
``$QVL_BENCH_CACHE/llamacpp``, each built in a temp dir and renamed into place.

llama.cpp is the C++ tree vendored in PyPI's llama-cpp-python sdist (``LLAMA_CPP_PYTHON``), built
with cmake for this CPU's AVX-512 but without AMX (its AMX matmul segfaults on these VMs) and
linked statically, so the cached binaries run from wherever the build lands. The checkpoint
(:func:`qvl.bench.fixtures.ensure_checkpoint`) goes through the tree's ``convert_hf_to_gguf.py``
(f16 text model, f16 vision mmproj) and ``llama-quantize`` (Q4_0, Q8_0: its default rules, so the
tied embedding/head is Q6_K in Q4_0 and Q8_0 in Q8_0).

The host's speed moves by 2x within minutes, so every round runs each engine once, llama.cpp's
Q4_0 next to qvl's int4 rows and Q8_0 next to int8 (the order reversed every other round), and a
ratio is taken within a round, then the median over rounds:

- llama.cpp: ``llama-bench`` tg32 (text-only decode of 32 tokens, best of its repetitions);
  ``llama-mtmd-cli`` with the 448x448 picture and the prompt, greedy 32 tokens: image encode,
  prompt eval (first token = the two) and decode tok/s from its own timers.
- qvl: :func:`qvl.bench.quant.qvl_worker` (core's measurement: load, warm-up, best of the timed
  ``generate`` runs of the same picture and prompt) in a fresh process per run, GPTQ-Int4/Int8
  with the checkpoint's head and with ``head="int8"``; once, their KL against the bf16
  checkpoint (:func:`qvl.bench.quant.kl_worker`).

Results: ``bench/results/llamacpp.{md,json}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque

from qvl.bench import fixtures, harness, probe, quant, report
from qvl.bench.report import fmt

log = logging.getLogger("qvl.bench.llamacpp")

LLAMA_CPP_PYTHON = "0.3.36"
BUILD_VERSION = 1
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON",
    "-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON",
    "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
)
TARGETS = ("llama-bench", "llama-mtmd-cli", "llama-quantize")
QUANTS = ("Q4_0", "Q8_0")
# llama.cpp quant type -> the qvl schemes (bench/quant.py) run beside it
PAIRS = {"Q4_0": ("int4", "int4-q8head", "int4-a8-q8head", "int4-a8-q4head"),
         "Q8_0": ("int8", "int8-q8head", "int8-a8-q8head", "int8-a8-q4head")}

# convert_hf_to_gguf.py names a BPE pre-tokenizer by hashing how the checkpoint's tokenizer splits
# a test text; the random checkpoints carry the tiny test tokenizer, which matches no release, so
# it is named as Qwen2's (speed does not depend on it).
CONVERT_SHIM = """
import runpy, sys
tree = sys.argv[1]
sys.path[:0] = [tree, tree + "/gguf-py"]
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = [tree + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def root() -> pathlib.Path:
    return fixtures.cache_root() / "llamacpp"


def build_key(version: str = LLAMA_CPP_PYTHON, flags=CMAKE_FLAGS, targets=TARGETS) -> str:
    """What the cached build depends on, hashed: its name under :func:`root`."""
    blob = json.dumps({"v": BUILD_VERSION, "llama_cpp_python": version, "cmake": list(flags),
                       "targets": list(targets)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _marked(marker: dict):
    return lambda p: fixtures.read_marker(p) == marker


def run_logged(cmd: list, what: str, every_s: float = 15.0, cwd=None) -> str:
    """Run ``cmd``, logging its progress (its latest line at most every ``every_s`` seconds, and
    lines that say error); raise with its last lines when it fails. Returns its output."""
    cmd = [str(c) for c in cmd]
    log.info("%s: %s", what, " ".join(c if len(c) < 200 else "<script>" for c in cmd))
    tail, out, last = deque(maxlen=30), [], time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            cwd=cwd)
    for line in proc.stdout:
        line = line.rstrip()
        tail.append(line)
        out.append(line)
        if time.monotonic() - last >= every_s or re.search(r"\berror\b", line, re.I):
            log.info("%s: %s", what, line[:200])
            last = time.monotonic()
    if proc.wait():
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# the build (cached)


def ensure_source(version: str = LLAMA_CPP_PYTHON) -> pathlib.Path:
    """The llama-cpp-python sdist, unpacked (its ``vendor/llama.cpp`` is the C++ tree)."""
    def build(tmp: pathlib.Path) -> None:
        run_logged([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
                    "--no-binary", ":all:", "-d", tmp], "pip download")
        sdist = next(tmp.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp / "x", filter="data")
        top = next((tmp / "x").iterdir())
        for item in top.iterdir():
            item.rename(tmp / item.name)
        shutil.rmtree(tmp / "x")
        sdist.unlink()

    marker = {"build_version": BUILD_VERSION, "llama_cpp_python": version}
    return fixtures.build_cached(root() / f"src-{version}", build, marker, _marked(marker))


def ensure_build(version: str = LLAMA_CPP_PYTHON) -> pathlib.Path:
    """The directory whose ``bin/`` holds :data:`TARGETS`, built with :data:`CMAKE_FLAGS`."""
    tree = ensure_source(version) / "vendor" / "llama.cpp"

    def build(tmp: pathlib.Path) -> None:
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        run_logged(["cmake", "-S", tree, "-B", tmp, *gen, *CMAKE_FLAGS], "cmake configure")
        run_logged(["cmake", "--build", tmp, "-j", str(os.cpu_count() or 2), "--target", *TARGETS], "cmake build")
        for t in TARGETS:
            if not (tmp / "bin" / t).is_file():
                raise RuntimeError(f"the build made no bin/{t}")

    marker = {"build_version": BUILD_VERSION, "llama_cpp_python": version, "cmake": list(CMAKE_FLAGS),
              "targets": list(TARGETS)}
    return fixtures.build_cached(root() / f"build-{build_key(version)}", build, marker, _marked(marker))


def _digest(marker: dict) -> str:
    return hashlib.sha256(json.dumps(marker, sort_keys=True).encode()).hexdigest()[:12]


def ensure_f16(ckpt: pathlib.Path, version: str = LLAMA_CPP_PYTHON) -> pathlib.Path:
    """``ckpt`` through convert_hf_to_gguf.py: ``model-f16.gguf`` and ``mmproj-f16.gguf``."""
    tree = ensure_source(version) / "vendor" / "llama.cpp"
    marker = {"build_version": BUILD_VERSION, "llama_cpp_python": version, "source": fixtures.read_marker(ckpt)}

    def build(tmp: pathlib.Path) -> None:
        convert = [sys.executable, "-c", CONVERT_SHIM, tree, ckpt, "--outtype", "f16"]
        run_logged([*convert, "--outfile", tmp / "model-f16.gguf"], "convert text model")
        run_logged([*convert, "--mmproj", "--outfile", tmp / "mmproj-f16.gguf"], "convert mmproj")

    return fixtures.build_cached(root() / f"gguf-{ckpt.name}-f16-{_digest(marker)}", build, marker, _marked(marker))


def ensure_quants(f16: pathlib.Path, bin_dir: pathlib.Path) -> pathlib.Path:
    """``model-{q}.gguf`` for each of :data:`QUANTS`, by ``llama-quantize`` from ``f16``."""
    marker = {"build_version": BUILD_VERSION, "f16": str(f16), "f16_build": fixtures.read_marker(f16),
              "llama_quantize": str(bin_dir), "quants": list(QUANTS)}

    def build(tmp: pathlib.Path) -> None:
        for q in QUANTS:
            run_logged([bin_dir / "llama-quantize", f16 / "model-f16.gguf", tmp / f"model-{q}.gguf", q,
                        str(os.cpu_count() or 2)], f"quantize {q}")

    return fixtures.build_cached(f16.parent / f"{f16.name}-quants-{_digest(marker)}", build, marker, _marked(marker))


# --------------------------------------------------------------------------------------------
# llama.cpp's runs, and reading what they print


def parse_bench_json(text: str) -> dict:
    """llama-bench ``-o json``: its decode test (n_prompt 0, n_gen > 0) as tok/s figures."""
    tests = [t for t in json.loads(text) if t.get("n_gen", 0) > 0 and t.get("n_prompt", 0) == 0]
    if not tests:
        raise ValueError("llama-bench printed no text-generation test")
    t = tests[0]
    samples = [float(x) for x in t.get("samples_ts") or [t["avg_ts"]]]
    return {"tg_tok_s": max(samples), "tg_tok_s_avg": float(t["avg_ts"]), "tg_samples": samples,
            "n_gen": t["n_gen"], "n_threads": t.get("n_threads"), "model_type": t.get("model_type"),
            "model_size_gb": t.get("model_size", 0) / probe.GB, "model_n_params": t.get("model_n_params")}


_PERF = re.compile(r"llama_perf_context_print:\s+(load|prompt eval|eval) time =\s*([\d.]+) ms(?: /\s*(\d+))?")


def parse_mtmd_log(text: str) -> dict:
    """llama-mtmd-cli's timers: image encode, its tokens' decode, prompt eval, decode steps."""
    # the CLI times its batch of media chunks; the helper (other callers) each slice
    enc = [float(m) for m in re.findall(r"mtmd batch encoding done in (\d+) ms", text)] or \
        [float(m) for m in re.findall(r"slice encoded in (\d+) ms", text)]
    dec = [float(m) for m in re.findall(r"decoded \(batch \d+/\d+\) in (\d+) ms", text)]
    perf = {k: (float(ms), int(n) if n else None) for k, ms, n in _PERF.findall(text)}
    if not enc or "prompt eval" not in perf or "eval" not in perf:
        raise ValueError("llama-mtmd-cli printed no image-encode or llama_perf timings")
    (p_ms, p_tok), (e_ms, e_runs) = perf["prompt eval"], perf["eval"]
    return {"image_encode_s": sum(enc) / 1e3, "image_decode_s": sum(dec) / 1e3, "prompt_eval_s": p_ms / 1e3,
            "prompt_tokens": p_tok, "first_token_s": (sum(enc) + p_ms) / 1e3, "decode_steps": e_runs,
            "decode_tok_s": e_runs / (e_ms / 1e3) if e_ms else None, "load_s": perf.get("load", (0,))[0] / 1e3}


def _run(cmd: list, timeout: float) -> str:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, errors="replace", timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"{pathlib.Path(cmd[0]).name} exit {p.returncode}: " + (p.stderr or p.stdout)[-2000:])
    return p.stdout + "\n" + p.stderr


def llama_bench(bin_dir, gguf, threads: int, n_gen: int, reps: int, timeout: float) -> dict:
    p = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(n_gen),
                        "-t", str(threads), "-r", str(reps), "-o", "json"], capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"llama-bench exit {p.returncode}: {p.stderr[-2000:]}")
    return parse_bench_json(p.stdout)


def mtmd(bin_dir, gguf, mmproj, image, threads: int, n_gen: int, timeout: float) -> dict:
    text = _run([bin_dir / "llama-mtmd-cli", "-m", gguf, "--mmproj", mmproj, "--image", image,
                 "-p", fixtures.PROMPT, "-n", n_gen, "--temp", "0", "--ignore-eos", "-t", threads,
                 "-c", 2048, "-lv", 4], timeout)  # 4: the library's own timers (llama_perf) too
    return parse_mtmd_log(text)


def _attempt(fn, *args) -> dict:
    try:
        return fn(*args)
    except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as e:
        log.error("%s: %s", fn.__name__, e)
        return {"error": str(e)[-600:]}


# --------------------------------------------------------------------------------------------
# rounds, ratios, the table


def median_of(runs: list[dict], key: str):
    vals = [r[key] for r in runs if r.get(key) is not None and "error" not in r]
    return statistics.median(vals) if vals else None


def summarize(result: dict) -> None:
    """Per row: medians over rounds; per qvl row: its ratios to its llama.cpp quant within each
    round (decode tok/s qvl/llama.cpp, > 1 = qvl faster; first token s qvl/llama.cpp, < 1 = qvl faster)."""
    rows = result["rows"]
    for r in rows.values():
        for key in ("decode_tok_s", "tg_tok_s", "first_token_s", "image_encode_s", "prompt_tokens", "model_size_gb"):
            r[key] = median_of(r["rounds"], key)
    for q, schemes in PAIRS.items():
        ref = rows.get(f"llama.cpp {q}")
        for s in schemes:
            row = rows.get(f"qvl {s}")
            if not (ref and row):
                continue
            for name, key, rkey in (("decode", "decode_tok_s", "decode_tok_s"), ("decode_vs_tg32", "decode_tok_s",
                                                                                  "tg_tok_s"),
                                    ("first_token", "first_token_s", "first_token_s")):
                per = [a[key] / b[rkey] for a, b in zip(row["rounds"], ref["rounds"])
                       if a.get(key) and b.get(rkey) and "error" not in a and "error" not in b]
                row[f"ratio_{name}"] = statistics.median(per) if per else None
                row[f"ratio_{name}_rounds"] = per


def render(result: dict) -> str:
    m = result["machine"]
    lines = [f"# qvl vs llama.cpp on the Qwen2-VL-2B shapes (random weights)", "",
             f"{m['cpu_model']}, {result['threads']} threads, {m['date']}; llama.cpp from llama-cpp-python "
             f"{result['llama_cpp_python']} (`{' '.join(f for f in CMAKE_FLAGS if 'AMX' in f or 'NATIVE' in f)}`, "
             f"AVX-512 on). {result['rounds_run']} rounds, each running every row once (llama.cpp Q4_0 beside "
             f"qvl int4, Q8_0 beside int8); figures are medians over rounds, ratios are taken within a round "
             f"and their median shown." + (f" Build: {result['build_note']}" if result.get("build_note") else ""),
             "",
             f"Input: one {fixtures.IMAGE_SIZE}x{fixtures.IMAGE_SIZE} picture + \"{fixtures.PROMPT}\", greedy, "
             f"{result['new_tokens']} new tokens, eos ignored, batch 1.", ""]
    header = ["engine", "weights", "head", "model GB", "prompt tokens", "image encode s", "first token s",
              "decode tok/s", "llama-bench tg32 tok/s", "KL vs bf16", "top-1", "decode qvl/llama.cpp",
              "decode qvl/tg32", "first token qvl/llama.cpp"]
    rows = []
    for name, r in result["rows"].items():
        rows.append([name, r.get("weights", "-"), r.get("head", "-"), fmt(r.get("model_size_gb")),
                     fmt(r.get("prompt_tokens"), "{:.0f}"), fmt(r.get("image_encode_s")),
                     fmt(r.get("first_token_s")), fmt(r.get("decode_tok_s")), fmt(r.get("tg_tok_s")),
                     fmt(r.get("kl"), "{:.2e}"), fmt(r.get("top1") and 100 * r["top1"], "{:.1f}%"),
                     fmt(r.get("ratio_decode"), "{:.2f}x"), fmt(r.get("ratio_decode_vs_tg32"), "{:.2f}x"),
                     fmt(r.get("ratio_first_token"), "{:.2f}x")])
    lines += report.table(header, rows, "lllrrrrrrrrrrr")
    lines += ["", "decode tok/s: the 32 steps after the picture's prompt (llama-mtmd-cli's eval timer; qvl's "
              "generate, best of its timed runs); tg32: llama-bench's text-only 32-token decode, best of its "
              "repetitions. first token: llama.cpp = image encode + prompt eval (mtmd-cli's timers, image "
              "preprocessing and tokenization not counted); qvl = generate's wall time minus its decode steps "
              "(preprocessing, vision, prefill, first sample). model GB: llama.cpp's text model (llama-bench); "
              "qvl's decoder linears + head as held in memory. KL vs bf16: KL(bf16 checkpoint || row) per text "
              f"token, teacher-forced over {result.get('kl_chats')} synthetic chats (bench/quant.py's kl_worker); "
              "random weights, so it shows what the rounding does to these shapes."]
    errors = [f"{n} round {i + 1}: {(r.get('error') or r['mtmd_error'])[:300]}" for n, row in result["rows"].items()
              for i, r in enumerate(row["rounds"]) if "error" in r or "mtmd_error" in r]
    if (result.get("kl") or {}).get("error"):
        errors.append(f"KL: {result['kl']['error'][:300]}")
    if errors:
        lines += ["", "Errors:", ""] + [f"- {e}" for e in errors]
    shares = [r.get("other_cpu_share") for row in result["rows"].values() for r in row["rounds"]
              if r.get("other_cpu_share") is not None]
    if shares:
        lines += ["", f"CPU used by other processes during the qvl runs: median {100 * statistics.median(shares):.0f}% "
                      f"of all CPUs (max {100 * max(shares):.0f}%)."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="qvl's timed runs per round (best kept)")
    ap.add_argument("--bench-reps", type=int, default=3, help="llama-bench repetitions per round (best kept)")
    ap.add_argument("--kl-chats", type=int, default=8, help="synthetic chats for the KL (0: skip)")
    ap.add_argument("--mtmd", default=",".join(QUANTS), help="quants that llama-mtmd-cli runs (first token)")
    ap.add_argument("--extra", default="", help="more bench/quant.py schemes as qvl rows, comma-separated")
    ap.add_argument("--bin-dir", default=None,
                    help="run these llama.cpp binaries (a bin/ with the TARGETS) instead of the cached build")
    ap.add_argument("--build-note", default="", help="what the table says about a --bin-dir build")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    harness.setup()
    threads = args.threads or probe.usable_cores()
    extra = [s.strip() for s in args.extra.split(",") if s.strip()]
    if any(s not in quant.SCHEMES for s in extra):
        ap.error(f"--extra must name bench/quant.py schemes: {','.join(quant.SCHEMES)}")

    base = fixtures.ensure_checkpoint("qwen2vl-2b")
    f16 = ensure_f16(base)
    bin_dir = pathlib.Path(args.bin_dir) if args.bin_dir else ensure_build() / "bin"
    gguf = ensure_quants(f16, bin_dir)
    schemes = [s for q in QUANTS for s in PAIRS[q]] + extra
    ckpts = {s: ensure_quantized(base, s) for s in schemes}
    result = {"llama_cpp_python": LLAMA_CPP_PYTHON, "build": str(bin_dir.parent), "gguf": str(gguf),
              "mmproj": str(f16 / "mmproj-f16.gguf"), "build_note": args.build_note,
              "threads": threads, "new_tokens": args.new_tokens, "machine": probe.machine_info(), "rows": {},
              "rounds_run": 0}
    for q in QUANTS:
        result["rows"][f"llama.cpp {q}"] = {"weights": q, "head": "Q6_K" if q == "Q4_0" else q, "rounds": []}
    for s in schemes:
        sch = quant.SCHEMES[s]
        result["rows"][f"qvl {s}"] = {"weights": f"{sch.kind} {sch.dtype} ({sch.kernel})", "head": sch.head,
                                      "rounds": []}
    groups = [(q, list(PAIRS[q])) for q in QUANTS] + ([(None, extra)] if extra else [])
    stem = "llamacpp"
    out = pathlib.Path(args.out)

    def snapshot():  # after every run: a run killed part way keeps what it measured
        summarize(result)
        report.write_partial(lambda: (result, render(result)), out, stem)

    with tempfile.TemporaryDirectory(prefix="qvl-bench-llamacpp-") as work:
        image = fixtures.make_image(pathlib.Path(work) / "bench.png")
        spec = {"image": str(image), "new_tokens": args.new_tokens, "threads": threads, "repeats": args.repeats}
        for i in range(args.rounds):
            log.info("round %d/%d", i + 1, args.rounds)
            for q, group in (groups if i % 2 == 0 else groups[::-1]):
                if q is not None:
                    model = gguf / f"model-{q}.gguf"
                    bench = _attempt(llama_bench, bin_dir, model, threads, args.new_tokens, args.bench_reps,
                                     args.timeout)
                    run = _attempt(mtmd, bin_dir, model, f16 / "mmproj-f16.gguf", image, threads, args.new_tokens,
                                   args.timeout) if q in args.mtmd.split(",") else {}
                    if "error" in run and "error" not in bench:
                        run = {"mtmd_error": run["error"]}
                    result["rows"][f"llama.cpp {q}"]["rounds"].append({**run, **bench})
                    snapshot()
                for s in group:
                    sch = quant.SCHEMES[s]
                    r = harness.run(quant.qvl_worker, dict(spec, ckpt=str(ckpts[s]), dtype=sch.dtype,
                                                           quant_kernel=sch.kernel, head=sch.head),
                                    timeout=args.timeout, label=s)
                    if r.get("bytes_per_token"):
                        r["model_size_gb"] = r["bytes_per_token"] / probe.GB
                    result["rows"][f"qvl {s}"]["rounds"].append(r)
                    snapshot()
            result["rounds_run"] = i + 1
            snapshot()
        if args.kl_chats:
            log.info("KL of %s against the bf16 checkpoint", ",".join(schemes))
            kl = harness.run(quant.kl_worker, {"ref": [str(base), "bfloat16"], "chats": args.kl_chats,
                                               "models": {s: [str(ckpts[s]), *quant.SCHEMES[s][1:]] for s in schemes}},
                             timeout=args.timeout, label="kl")
            result["kl"] = kl
            for s, v in (kl.get("models") or {}).items():
                result["rows"][f"qvl {s}"].update(kl=v["kl"], top1=v["top1"])
    result["kl_chats"] = args.kl_chats
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    summarize(result)
    md = render(result)
    report.write_outputs(result, md, out, stem)
    report.remove_partial(out, stem)
    print(md)
    return 0 if not any("error" in r for row in result["rows"].values() for r in row["rounds"]) else 1


def ensure_quantized(base: pathlib.Path, scheme: str) -> pathlib.Path:
    kind = quant.SCHEMES[scheme].kind
    return base if kind is None else quant.ensure_quantized(base, kind, 128)


if __name__ == "__main__":
    sys.exit(main())
