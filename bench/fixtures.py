"""What the benchmarks measure on: cached checkpoints (built once, atomically), the test picture.

Builds live outside the repository under ``$QVL_BENCH_CACHE`` (default ``~/.cache/qvl/bench``).
Each is written into a temp directory beside its final name (the builder's pid in the name),
marked complete, then renamed into place, so an interrupted or concurrent build never leaves a
half-written checkpoint where a benchmark would load it.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import os
import pathlib
import shutil
import time

log = logging.getLogger("qvl.bench.fixtures")

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
IMAGE_SIZE = 448
PROMPT = "Describe this picture."


def cache_root() -> pathlib.Path:
    env = os.environ.get("QVL_BENCH_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "qvl" / "bench"


def read_marker(path: pathlib.Path) -> dict | None:
    """The build marker of a cached build, None when there is none (or it is unreadable)."""
    try:
        return json.loads((path / BUILD_MARKER).read_text())
    except (OSError, ValueError):
        return None


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


def build_cached(final: pathlib.Path, build, marker: dict, is_current) -> pathlib.Path:
    """``final``, rebuilt by ``build(tmp_dir)`` unless ``is_current(final)``; atomic.

    ``marker`` goes into ``BUILD_MARKER`` of the new build. A build that a concurrent run
    finished first is kept, and ours discarded.
    """
    if is_current(final):
        log.info("using cached %s", final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    log.info("building %s (one time; cached for later runs)", final)
    t0 = time.perf_counter()
    try:
        build(tmp)
        (tmp / BUILD_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if final.exists():  # an outdated build, or a concurrent run finished first
            if is_current(final):
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built in %.1fs: %s", time.perf_counter() - t0, final)
    return final


def _is_complete(path: pathlib.Path) -> bool:
    return (read_marker(path) or {}).get("build_version") == BUILD_VERSION


def ensure_checkpoint(config: str, seed: int = 0) -> pathlib.Path:
    """The cached random-weight checkpoint for ``config`` (a key of ``CONFIGS``), built if needed."""
    marker = {"build_version": BUILD_VERSION, "config": config, "seed": seed,
              "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    build = _build_2b if config == "qwen2vl-2b" else _build_tiny
    return build_cached(cache_root() / CONFIGS[config], lambda out: build(out, seed), marker, _is_complete)


BENCH_MODELS = ("toy", "tiny", "2b-bf16", "2b-int4")


def bench_model(name: str) -> tuple[pathlib.Path, str]:
    """The checkpoint and compute dtype a benchmark's model name stands for (``BENCH_MODELS``;
    the random ones built and cached if needed)."""
    if name == "toy":
        from qvl.scripts.default_model import TOY_MODEL

        return TOY_MODEL, "float32"
    if name == "tiny":
        return ensure_checkpoint("tiny"), "float32"
    if name in ("2b-bf16", "2b-int4"):
        from qvl.bench.quant import ensure_quantized  # it builds on this module

        base = ensure_checkpoint("qwen2vl-2b")
        return (base if name == "2b-bf16" else ensure_quantized(base, "gptq-int4", 128)), "bfloat16"
    raise ValueError(f"unknown model {name!r}: use one of {', '.join(BENCH_MODELS)}")


def qwen2vl_2b_config(ids: dict[str, int]) -> dict:
    """Qwen2-VL-2B-Instruct's config.json (official flat layout) with the tokenizer's special ids."""
    from qvl.scripts.tiny import make_config

    cfg = make_config(ids, QWEN2_VL_2B_TEXT["vocab_size"], tie_word_embeddings=True, layout="flat",
                      dtype="bfloat16")
    cfg.update(QWEN2_VL_2B_TEXT)
    cfg["rope_scaling"] = {"type": "mrope", "mrope_section": list(QWEN2_VL_2B_MROPE)}
    cfg["vision_config"] = dict(QWEN2_VL_2B_VISION)
    return cfg


def init_random_(named_parameters, seed: int) -> None:
    """normal(0, 0.02) for matrices; norm scales 1, biases 0 (1-d ``.weight`` / ``.bias``)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_parameters:
            if p.ndim == 1:
                p.fill_(1.0 if name.endswith(".weight") else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=g)


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
    init_random_(model.named_parameters(), seed)
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


def full_vocab_view(ckpt: pathlib.Path) -> pathlib.Path:
    """``ckpt`` with a tokenizer that has text for every id of its vocabulary; cached, atomic.

    The random checkpoints carry the tiny test tokenizer (a few hundred ids) under a 151,936-row
    head, so nearly every token they sample decodes to no text, and a streaming client sees its
    first text only at the end. The view links every file but ``tokenizer.json``, whose missing
    ids become plain words (`` w414``...) that no merge produces, so prompts tokenize as before.
    """
    ckpt = pathlib.Path(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    vocab_size = cfg.get("vocab_size") or cfg["text_config"]["vocab_size"]
    final = cache_root() / f"{ckpt.name}-full-vocab"
    marker = {"build_version": BUILD_VERSION, "source": str(ckpt.resolve()), "source_build": read_marker(ckpt),
              "vocab_size": vocab_size}

    def current(path: pathlib.Path) -> bool:
        m = read_marker(path) or {}
        return all(m.get(k) == v for k, v in marker.items())

    def build(out: pathlib.Path) -> None:
        for f in ckpt.iterdir():
            if f.name not in ("tokenizer.json", BUILD_MARKER):
                (out / f.name).symlink_to(f.resolve())
        tok = json.loads((ckpt / "tokenizer.json").read_text())
        vocab = tok["model"]["vocab"]
        # tokenizers numbers added tokens from the model's vocabulary size up unless the model holds
        # them too, so the special tokens keep their ids only if they are in the vocabulary as well
        for a in tok.get("added_tokens", []):
            vocab.setdefault(a["content"], a["id"])
        taken = set(vocab.values())
        for i in range(vocab_size):
            if i not in taken:
                key = f"\u0120w{i}"  # the byte-level alphabet's space, then a word
                while key in vocab:
                    key += "_"
                vocab[key] = i
        (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))

    return build_cached(final, build, marker, current)


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
