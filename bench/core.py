"""Core CPU benchmark: qvl vs transformers on a random-weight checkpoint shaped like Qwen2-VL-2B.

Run as ``python -m qvl.bench.core [--dtype bfloat16] [--new-tokens 32] [--out bench/results]``.

The checkpoint (random weights with the exact Qwen2-VL-2B-Instruct config, bf16 safetensors, the
tiny tokenizer of :mod:`qvl.scripts.tiny`) is built once and cached outside the repository under
``$QVL_BENCH_CACHE`` (default ``~/.cache/qvl/bench``). ``--config tiny`` uses the toy dims of
``qvl.scripts.tiny`` instead, so the whole pipeline can be smoke-tested in seconds.

Each engine runs in its own fresh subprocess (so peak RSS is per engine), on the same inputs: one
deterministic 448x448 picture plus a short prompt, greedy, a fixed number of new tokens (eos
ignored), torch threads = number of usable cores. Each engine runs in ``--rounds`` fresh
processes interleaved with the other engine's (qvl, transformers, qvl, ...), each warmed up with
one short generation and then timed ``--repeats`` times; the table shows the best timings (the
JSON keeps every run and the medians), because on a shared machine other processes only ever
make a run slower. Other processes' CPU share and major page faults are recorded per engine;
``--omp-wait-policy passive`` keeps multi-threaded runs usable on a busy machine, ``--wait-idle``
waits for quiet. An engine that would not fit in the available memory is skipped (reported as
an error) rather than started. Snapshots after every child go to ``core-*.partial.*.tmp``.
Measured per engine:

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
import copy
import datetime as _dt
import json
import logging
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque

log = logging.getLogger("qvl.bench.core")

# Bumped whenever the cached checkpoint's contents would change; a stale cache is rebuilt.
BUILD_VERSION = 1
BUILD_MARKER = "qvl_bench_build.json"

# Qwen/Qwen2-VL-2B-Instruct config.json (the text fields are top level in the official layout).
QWEN2_VL_2B_TEXT = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                        rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
                        sliding_window=32768, max_window_layers=28, tie_word_embeddings=True)
QWEN2_VL_2B_MROPE = [16, 24, 24]
QWEN2_VL_2B_VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=1536,
                          in_chans=3, patch_size=14, spatial_patch_size=14, temporal_patch_size=2,
                          spatial_merge_size=2)

CONFIGS = {"qwen2vl-2b": "qwen2vl-2b-random", "tiny": "qwen2vl-tiny-random"}
ENGINES = ("qvl", "transformers")
IMAGE_SIZE = 448
PROMPT = "Describe this picture."
MAX_SEQ_LEN = 1024
WARMUP_NEW_TOKENS = 2
GB = 1e9


# --------------------------------------------------------------------------------------------
# checkpoint


def cache_root() -> pathlib.Path:
    env = os.environ.get("QVL_BENCH_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "qvl" / "bench"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp(final: pathlib.Path) -> None:
    """Delete temp dirs left by interrupted builds (their pid is in the name)."""
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if not _pid_alive(pid):
            log.info("removing stale partial build %s", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def _is_complete(path: pathlib.Path) -> bool:
    marker = path / BUILD_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("build_version") == BUILD_VERSION
    except (OSError, ValueError):
        return False


def ensure_checkpoint(config: str, seed: int = 0) -> pathlib.Path:
    """Return the cached checkpoint for ``config``, building it (atomically) if needed."""
    final = cache_root() / CONFIGS[config]
    if _is_complete(final):
        log.info("using cached checkpoint %s", final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("building %s checkpoint in %s (one time; cached for later runs)", config, final)
    t0 = time.perf_counter()
    try:
        (_build_2b if config == "qwen2vl-2b" else _build_tiny)(tmp, seed)
        (tmp / BUILD_MARKER).write_text(json.dumps({
            "build_version": BUILD_VERSION, "config": config, "seed": seed,
            "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}, indent=2) + "\n")
        if final.exists():  # an outdated build, or a concurrent run finished first
            if _is_complete(final):
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("checkpoint built in %.1fs: %s", time.perf_counter() - t0, final)
    return final


def qwen2vl_2b_config(ids: dict[str, int]) -> dict:
    """Qwen2-VL-2B-Instruct's config.json (official flat layout) with the tokenizer's special ids."""
    from qvl.scripts.tiny import make_config

    cfg = make_config(ids, QWEN2_VL_2B_TEXT["vocab_size"], tie_word_embeddings=True, layout="flat",
                      dtype="bfloat16")
    cfg.update(QWEN2_VL_2B_TEXT)
    cfg["rope_scaling"] = {"type": "mrope", "mrope_section": list(QWEN2_VL_2B_MROPE)}
    cfg["vision_config"] = dict(QWEN2_VL_2B_VISION)
    return cfg


def _build_2b(out: pathlib.Path, seed: int) -> None:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from qvl.scripts import tiny

    ids = tiny.build_tokenizer(out)
    flat = qwen2vl_2b_config(ids)
    # deep copy: the config class rewrites rope_scaling in place, config.json keeps the official form
    config = Qwen2VLConfig(**copy.deepcopy({k: v for k, v in flat.items() if k != "architectures"}))
    # Built on meta in bf16, then materialised once: no fp32 copy, no transformers init pass.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = Qwen2VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(old)
    model.to_empty(device="cpu")
    log.info("initialising %.2fB random parameters (normal(0, 0.02); norms 1, biases 0)",
             sum(p.numel() for p in model.parameters()) / 1e9)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith(".weight"):  # RMSNorm / LayerNorm scales
                p.fill_(1.0)
            elif p.ndim == 1 and name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.tie_weights()
    log.info("saving bf16 safetensors")
    model.save_pretrained(out)
    del model
    # Our files, not transformers' own, describe the checkpoint (official flat config.json).
    tiny._write_json(out / "config.json", flat)
    tiny._write_json(out / "generation_config.json", {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    })
    tiny._write_json(out / "preprocessor_config.json", tiny.PREPROCESSOR_CONFIG)
    tiny._write_chat_template(out, "chat_template.json")


def _build_tiny(out: pathlib.Path, seed: int) -> None:
    from qvl.scripts.tiny import write_tiny_checkpoint

    write_tiny_checkpoint(out, weights="transformers", dtype="bfloat16", seed=seed)


def make_image(path: pathlib.Path, size: int = IMAGE_SIZE) -> pathlib.Path:
    """A deterministic synthetic picture (gradients, shapes, stripes) saved as PNG."""
    import numpy as np
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(12 * x + 7 * y)], axis=-1)
    img = Image.fromarray((rgb * 255).clip(0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    d.ellipse((60, 60, 220, 220), fill=(220, 40, 40), outline=(0, 0, 0), width=4)
    d.rectangle((250, 90, 400, 300), fill=(40, 160, 60))
    d.polygon([(100, 420), (220, 260), (340, 420)], fill=(30, 60, 200))
    for i in range(0, size, 16):
        d.line((i, 0, i, 30), fill=(255, 255, 255) if (i // 16) % 2 else (0, 0, 0), width=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


def messages_for(image_path) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": str(image_path)},
                                         {"type": "text", "text": PROMPT}]}]


# --------------------------------------------------------------------------------------------
# roofline and machine


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


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo_gb(key: str) -> float | None:
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_info() -> dict:
    import torch

    try:
        import transformers
        tf_version = transformers.__version__
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        tf_version = f"unavailable ({e})"
    import qvl

    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mem_total_gb": _meminfo_gb("MemTotal"),
        "mem_available_gb": _meminfo_gb("MemAvailable"),
        "loadavg_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": tf_version,
        "qvl": qvl.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------------------------
# children: each measurement runs in its own process


def status_kb(key: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: its peak); None without /proc."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_kb() -> int:
    """This process's own peak RSS in KiB: VmHWM, not ``ru_maxrss`` (the fallback without /proc).
    Linux carries a parent's ``ru_maxrss`` into a child spawned by vfork + exec, which is how
    Python's subprocess starts one: quant_quality's eval workers, started by a process that had
    calibrated models, reported its 446 MB instead of their own ~300."""
    hwm = status_kb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _memory_report(res: dict) -> None:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    res["major_faults"] = ru.ru_majflt
    for key, name in (("VmHWM", "vmhwm_gb"), ("RssAnon", "rss_anon_gb"), ("RssFile", "rss_file_gb")):
        kb = status_kb(key)
        res[name] = kb * 1024 / GB if kb is not None else None
    res["peak_rss_gb"] = peak_rss_kb() * 1024 / GB


def _rss_now_gb() -> float | None:
    rss = status_kb("VmRSS")
    return rss * 1024 / GB if rss is not None else None


def _child_bandwidth(spec: dict, res: dict) -> None:
    import torch

    n = int(spec.get("bandwidth_bytes", 1 << 30))
    src = torch.empty(n, dtype=torch.uint8)
    src.fill_(1)
    dst = torch.empty_like(src)
    dst.fill_(0)  # touch every page before timing
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    res.update(bytes=n, copy_s=times, bandwidth_gb_s=2 * n / min(times) / GB,
               method=f"torch uint8 dst.copy_(src) of {n / 2**30:.2f} GiB, read+write bytes, best of 5")


def _child_qvl(spec: dict, res: dict) -> None:
    t0 = time.perf_counter()
    import qvl
    res["import_s"] = time.perf_counter() - t0

    messages = messages_for(spec["image"])
    log.info("qvl: loading %s (%s)", spec["ckpt"], spec["dtype"])
    t0 = time.perf_counter()
    eng = qvl.load(spec["ckpt"], dtype=spec["dtype"], max_seq_len=MAX_SEQ_LEN, max_batch=1)
    res["load_s"] = time.perf_counter() - t0
    res["engine_load_s"] = getattr(eng, "load_s", None)
    res["rss_after_load_gb"] = _rss_now_gb()

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
        vals = sorted(r[k] for r in runs)
        res[k + "_median"] = vals[len(vals) // 2] if len(vals) % 2 else (vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2


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


def _child_transformers(spec: dict, res: dict) -> None:
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
    res["rss_after_load_gb"] = _rss_now_gb()
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


CHILDREN = {"bandwidth": _child_bandwidth, "qvl": _child_qvl, "transformers": _child_transformers}


def child_main(kind: str, spec_path: str) -> int:
    spec = json.loads(pathlib.Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    res = {"kind": kind, "threads": torch.get_num_threads(), "pid": os.getpid()}
    rc = 0
    try:
        CHILDREN[kind](spec, res)
    except Exception as e:  # noqa: BLE001 - the parent reports it in the table
        log.error("%s failed: %s", kind, traceback.format_exc())
        res["error"] = f"{type(e).__name__}: {e}"
        rc = 1
    _memory_report(res)
    tmp = pathlib.Path(spec["result"] + ".part")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.rename(spec["result"])
    return rc


def _warm_page_cache(ckpt: pathlib.Path) -> None:
    """Read the weight files once so that no engine pays for (or benefits from) a cold disk."""
    buf = bytearray(64 << 20)
    for f in sorted(ckpt.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    try:
        f = [int(x) for x in pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return sum(f) - idle, sum(f)


def _children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wait_for_idle(max_wait: float, threshold: float = 0.3) -> float:
    """Wait up to ``max_wait`` s until other processes use under ``threshold`` of the CPUs."""
    t0 = time.perf_counter()
    while True:
        a = _cpu_jiffies()
        time.sleep(5)
        b = _cpu_jiffies()
        busy = (b[0] - a[0]) / max(b[1] - a[1], 1) if a and b else 0.0
        waited = time.perf_counter() - t0
        if busy < threshold or waited >= max_wait:
            if busy >= threshold:
                log.warning("machine still %.0f%% busy after waiting %.0fs; measuring anyway", 100 * busy, waited)
            return busy
        if int(waited) // 60 != int(waited - 5) // 60 or waited < 6:
            log.info("machine %.0f%% busy with other work; waiting (%.0fs so far)", 100 * busy, waited)


def weights_gb(ckpt: pathlib.Path, dtype: str) -> float:
    """Size of the checkpoint's weights once loaded in ``dtype`` (the files hold bf16)."""
    stored = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    return stored * {"float32": 2, "bfloat16": 1, "float16": 1}[dtype] / GB


def wait_for_memory(need_gb: float, max_wait: float) -> float | None:
    """Wait up to ``max_wait`` s for ``need_gb`` of MemAvailable; returns what is available."""
    t0 = time.perf_counter()
    while True:
        avail = _meminfo_gb("MemAvailable")
        if avail is None or avail >= need_gb:
            return avail
        waited = time.perf_counter() - t0
        if waited >= max_wait:
            return avail
        if int(waited) // 60 != int(waited - 10) // 60 or waited < 1:
            log.info("%.1f GB available, this engine needs ~%.1f GB; waiting (%.0fs so far)", avail, need_gb, waited)
        time.sleep(10)


def run_child(kind: str, spec: dict, workdir: pathlib.Path, timeout: float) -> dict:
    """Run one measurement in a fresh interpreter; never raises, errors come back as ``error``."""
    spec = dict(spec, result=str(workdir / f"{kind}.json"))
    spec_path = workdir / f"{kind}-spec.json"
    spec_path.write_text(json.dumps(spec))
    pathlib.Path(spec["result"]).unlink(missing_ok=True)  # never read an earlier round's result
    cmd = [sys.executable, "-m", "qvl.bench.core", "--child", kind, "--child-spec", str(spec_path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if spec.get("omp_wait_policy"):
        env["OMP_WAIT_POLICY"] = spec["omp_wait_policy"]  # read once, when OpenMP starts in the child
    tail: deque[str] = deque(maxlen=40)
    jiffies0, cpu0 = _cpu_jiffies(), _children_cpu_s()
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                errors="replace")
    except OSError as e:
        return {"kind": kind, "error": f"could not start child: {e}"}

    def pump():
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            print(f"  [{kind}] {line}", file=sys.stderr, flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = None
    except BaseException:  # interrupted: take the child down with us
        proc.kill()
        proc.wait()
        raise
    reader.join(timeout=5)
    wall = time.perf_counter() - t0
    jiffies1, cpu1 = _cpu_jiffies(), _children_cpu_s()
    result_file = pathlib.Path(spec["result"])
    res = json.loads(result_file.read_text()) if result_file.is_file() else {"kind": kind}
    res["child_wall_s"] = wall
    if jiffies0 and jiffies1:
        # CPU used by everything else on the machine while this child ran, as a share of all CPUs
        hz = os.sysconf("SC_CLK_TCK")
        busy_s = (jiffies1[0] - jiffies0[0]) / hz
        total_s = (jiffies1[1] - jiffies0[1]) / hz
        res["other_cpu_share"] = max(0.0, (busy_s - (cpu1 - cpu0)) / total_s) if total_s > 0 else None
    if rc is None:
        res["error"] = f"timed out after {timeout:.0f}s"
    elif rc != 0 and "error" not in res:
        why = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
        if rc == -9:
            why += " (out of memory?)"
        res["error"] = f"child {why}"
    if "error" in res:
        res["log_tail"] = list(tail)
        log.error("%s: %s", kind, res["error"])
    return res


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
        vals = sorted(run[k] for run in runs)
        if vals:
            mid = len(vals) // 2
            merged[k + "_median"] = vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2
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


def _f(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


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
    ap.add_argument("--child", choices=tuple(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--child-spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.child:
        return child_main(args.child, args.child_spec)
    # SIGTERM (kill, nohup'd runs) unwinds like Ctrl-C: children killed, temp files removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad or not engines:
        ap.error(f"--engines must be a comma-separated subset of {','.join(ENGINES)}, got {args.engines!r}")
    if args.repeats < 1 or args.rounds < 1:
        ap.error("--repeats and --rounds must be >= 1")
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (decode speed excludes the first token)")
    threads = args.threads or usable_cores()

    out = pathlib.Path(args.out)
    stem = f"core-{args.dtype}" if args.config == "qwen2vl-2b" else f"core-{args.config}-{args.dtype}"
    if threads != usable_cores():
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
        "machine": machine_info(),
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
                "bandwidth_bytes": (1 << 30) if args.config == "qwen2vl-2b" else (128 << 20)}
        per_engine: dict[str, list[dict]] = {name: [] for name in engines}
        bandwidth: list[dict] = []
        for rnd in range(args.rounds):
            # once per round too: on a shared machine a single measurement can land in a busy spell
            if args.wait_idle:
                wait_for_idle(args.wait_idle)
            log.info("round %d/%d: measuring memory copy bandwidth", rnd + 1, args.rounds)
            bandwidth.append(run_child("bandwidth", spec, work, args.timeout))
            ok_bw = [b for b in bandwidth if _ok(b)]
            result["bandwidth"] = dict(max(ok_bw, key=lambda b: b["bandwidth_gb_s"]) if ok_bw else bandwidth[0],
                                       all_gb_s=[b.get("bandwidth_gb_s") for b in bandwidth])
            for name in engines:  # interleaved, so slow phases of a shared machine hit every engine
                log.info("round %d/%d: page cache warm-up, then %s in a fresh process", rnd + 1, args.rounds, name)
                # a child that does not fit would get the OOM killer going, maybe on someone else's process
                need = weights_gb(ckpt, args.dtype) + 1.5
                avail = wait_for_memory(need, max(args.wait_idle, 60.0))
                if avail is not None and avail < need:
                    err = f"skipped: ~{need:.1f} GB needed, only {avail:.1f} GB available"
                    log.error("%s: %s", name, err)
                    per_engine[name].append({"kind": name, "error": err})
                    write_partial(result, per_engine, out, stem)
                    continue
                _warm_page_cache(ckpt)
                if args.wait_idle:
                    wait_for_idle(args.wait_idle)
                per_engine[name].append(run_child(name, spec, work, args.timeout))
                write_partial(result, per_engine, out, stem)
        result["engines"] = {name: merge_rounds(rs) for name, rs in per_engine.items()}
    finalize(result)
    md = render_markdown(result)
    paths = write_outputs(result, md, out, stem)
    for f in (out / f"{stem}.partial.json.tmp", out / f"{stem}.partial.md.tmp"):
        f.unlink(missing_ok=True)
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


def write_outputs(result: dict, md: str, out: pathlib.Path, stem: str, suffix: str = "") -> tuple:
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / f"{stem}.json{suffix}", out / f"{stem}.md{suffix}")
    for path, text in zip(paths, (json.dumps(result, indent=2) + "\n", md)):
        tmp = path.with_name(path.name + ".part")
        tmp.write_text(text)
        tmp.rename(path)
    return paths


def write_partial(result: dict, per_engine: dict, out: pathlib.Path, stem: str) -> None:
    """After every child: what is known so far, under names git ignores (``*.tmp``), so a run that
    is killed part way leaves its data without replacing an earlier complete result."""
    try:
        partial = dict(result, partial=True, engines={n: merge_rounds(rs) for n, rs in per_engine.items() if rs})
        finalize(partial)
        write_outputs(partial, render_markdown(partial), out, f"{stem}.partial", ".tmp")
    except Exception:  # noqa: BLE001 - a progress snapshot must never end the run
        log.exception("could not write the partial result")


if __name__ == "__main__":
    sys.exit(main())
