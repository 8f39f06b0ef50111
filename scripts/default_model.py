"""The embedded default model, and the cache folder where qvl builds what it makes on first use."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

TOY_MODEL = Path(__file__).resolve().parent / "qvl-toy"


def cache_dir() -> Path:
    return Path(os.environ.get("QVL_CACHE", Path.home() / ".cache" / "qvl"))


def default_model_dir() -> Path:
    """qvl-toy (trained on synthetic pictures by ``qvl.scripts.train_toy``) when it ships with
    this copy of qvl, else a tiny random-weight Qwen2-VL built on first use, which runs the
    whole pipeline but answers noise."""
    if (TOY_MODEL / "config.json").exists():
        return TOY_MODEL
    from qvl.scripts.tiny import write_tiny_checkpoint

    root = cache_dir() / "tiny-default"
    if not (root / "config.json").exists():
        log.info("building the tiny default checkpoint in %s", root)
        write_tiny_checkpoint(root, weights="random", seed=0)
    return root
