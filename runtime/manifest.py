"""``qvl-manifest.json``: what produced an artifact directory, and which checkpoint it belongs to.

The manifest is one JSON object. Top level: ``qvl_version``, ``checkpoint_sha256`` (the
fingerprint below, of the checkpoint files in the directory), ``source`` and ``files``
(``{name: {"bytes", "sha256"}}`` for files an exporter produced). Each exporter owns one
section (e.g. ``vision_onnx``) and leaves the others alone, so exports compose in one directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

MANIFEST = "qvl-manifest.json"
FINGERPRINT_EDGE = 1 << 20  # bytes of tensor data hashed at each end of a weight file


def checkpoint_fingerprint(path) -> str:
    """sha256 naming a checkpoint without reading its weights: milliseconds for any model size.

    Hashes config.json whole, then for every ``*.safetensors`` file (sorted by name): its name,
    its size, its header (every tensor's name, dtype, shape and offsets) and the first and last
    MiB of its tensor data. Two checkpoints with the same shapes but different weights differ in
    those bytes unless a change touches only the middle of every file, which no training or
    conversion does.
    """
    path = Path(path)
    h = hashlib.sha256(b"qvl-checkpoint-fingerprint-v1\0")
    h.update((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"\0{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            raw = fh.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
            start = 8 + min(n, size - len(raw))
            h.update(raw + fh.read(start - len(raw)))  # length + JSON header
            h.update(fh.read(min(FINGERPRINT_EDGE, size - start)))
            tail = max(size - FINGERPRINT_EDGE, start + FINGERPRINT_EDGE)
            if tail < size:
                fh.seek(tail)
                h.update(fh.read())
    return h.hexdigest()


def file_digest(path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return {"bytes": Path(path).stat().st_size, "sha256": h.hexdigest()}


def read_manifest(directory) -> dict:
    """The directory's manifest, or {} when it has none."""
    f = Path(directory) / MANIFEST
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None


def umask_mode(mode: int) -> int:
    """``mode`` as a plain open()/mkdir() would leave it (mkstemp/mkdtemp make private files)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def write_manifest(directory, manifest: dict) -> Path:
    """Write atomically, so a reader never sees half a manifest."""
    f = Path(directory) / MANIFEST
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", dir=f.parent)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(manifest, indent=2) + "\n")
    os.chmod(tmp, umask_mode(0o666))
    os.replace(tmp, f)
    return f
