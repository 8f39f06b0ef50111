"""Memory-mapped safetensors reading, single file or sharded index.

Tensors of ``COPY_BELOW`` bytes and more (matrices: ``MATRIX_MAPPED_FROM``) are views of a
private (copy-on-write) mapping of the file: no copy is made when the checkpoint dtype is the
compute dtype, pages come in on first touch, and RSS while loading stays near the size of the
weights. Smaller ones (norms, biases, quantization scales and zeros) are read into memory of
their own: the first touch of a view maps the whole page-cache folio under it, which is 2 MiB
where the file system caches the file in large folios (ext4 on Linux 6.18 does), so a 3 KB norm
weight kept as a view costs 2 MB resident, and the int8 vision tower's 32 blocks of norms 70 MB
on the 2B shapes. Only the safetensors format is read: never pickle.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
from pathlib import Path

import torch

from qvl.model.config import read_json_object

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


# tensors smaller than this are read into their own memory, not mapped (see the module doc): a
# view costs its bytes rounded out to the 2 MiB folios at both ends, up to 4 MiB more than a copy
# where its neighbours in the file are not mapped (the int8 tower's norms, biases and patch
# embedding, between weights rounded at load and released)
COPY_BELOW = 4 << 20
# ... except matrices of this size and more, a linear layer's weight: their neighbours are the
# layer's other weights, views like them (a float tower's) or released like them (rounded at load),
# and a copy would be held beside the edge folios the neighbouring views map over its bytes
MATRIX_MAPPED_FROM = 1 << 20


class CheckpointError(ValueError):
    pass


class SafetensorsFile:
    """One .safetensors file: header parsed eagerly, tensors mapped lazily."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise CheckpointError(f"{self.path}: not a safetensors file (header length {n})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header: {e}") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header
        self.data_start = 8 + n
        for name, e in header.items():
            begin, end = e["data_offsets"]
            if e["dtype"] not in _DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']}")
            if self.data_start + end > size:
                raise CheckpointError(f"{self.path}: tensor {name!r} runs past the end of the file "
                                      "(truncated download?)")
        self._mm = None
        self._fd: int | None = None

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name``: a view of the mapped file, or read into a buffer of its own when smaller
        than ``COPY_BELOW`` bytes (a matrix: than ``MATRIX_MAPPED_FROM``); either way writable, and
        writes never reach the file."""
        e = self.entries[name]
        begin, end = e["data_offsets"]
        n = end - begin
        if 0 < n < COPY_BELOW and (n < MATRIX_MAPPED_FROM or len(e["shape"]) != 2):
            return self._read(name)
        if self._mm is None:
            with open(self.path, "rb") as f:
                # ACCESS_COPY: writable for torch, private, and backed by the page cache until written
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        e = self.entries[name]
        begin, end = e["data_offsets"]
        dtype = _DTYPES[e["dtype"]]
        shape = e["shape"]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        t = torch.frombuffer(self._mm, dtype=dtype, count=(end - begin) // dtype.itemsize,
                             offset=self.data_start + begin)
        return t.view(shape)

    def _read(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        begin, end = e["data_offsets"]
        dtype = _DTYPES[e["dtype"]]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        buf = bytearray(end - begin)
        view, done = memoryview(buf), 0
        while done < len(buf):
            n = os.preadv(self._fd, [view[done:]], self.data_start + begin + done)
            if n <= 0:
                raise CheckpointError(f"{self.path}: tensor {name!r} ends early (file truncated while loading?)")
            done += n
        return torch.frombuffer(buf, dtype=dtype).view(e["shape"])

    def release(self, name: str) -> None:
        """Drop the pages of ``name`` from this process once it has been read and repacked (the
        packed quantized weights), so the file's copy does not stay resident beside the repacked
        one. Only whole pages inside the tensor go; a later read faults them back from the file. A
        tensor read into its own memory (under ``COPY_BELOW``) holds no pages of the mapping."""
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin, end = self.entries[name]["data_offsets"]
        lo = -(-(self.data_start + begin) // mmap.PAGESIZE) * mmap.PAGESIZE
        hi = (self.data_start + end) // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo:
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class Checkpoint:
    """All tensors of a checkpoint directory, by name."""

    def __init__(self, root: str | os.PathLike):
        root = Path(root)
        index = root / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index} has no 'weight_map' of tensor name -> file name")
            files = {f: SafetensorsFile(root / f) for f in sorted(set(weight_map.values()))}
            self.where = {}
            for f in files.values():
                for k in f.keys():
                    self.where[k] = f
            missing = [k for k in weight_map if k not in self.where]
            if missing:
                raise CheckpointError(f"{index}: lists tensors absent from its shards, e.g. {missing[:3]}")
        else:
            paths = sorted(root.glob("*.safetensors"))
            if not paths:
                found = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
                hint = f" (found {found}: pickle formats are not loaded; convert to safetensors)" if found else ""
                raise CheckpointError(f"{root}: no *.safetensors weights{hint}")
            self.where = {}
            for p in paths:
                f = SafetensorsFile(p)
                for k in f.keys():
                    if k in self.where:
                        raise CheckpointError(f"{root}: tensor {k!r} appears in two files")
                    self.where[k] = f

    def keys(self):
        return self.where.keys()

    def shape(self, name):
        return self.where[name].shape(name)

    def get(self, name) -> torch.Tensor:
        return self.where[name].get(name)

    def release(self, name) -> None:
        self.where[name].release(name)


def _file_mapping(lo: int, hi: int) -> bool:
    """Whether [lo, hi) lies inside one private mapping of a file (``/proc/self/maps``)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                start, _, end = fields[0].partition("-")
                if int(start, 16) <= lo and hi <= int(end, 16):
                    return fields[1].endswith("p") and fields[4] != "0"
    except OSError:
        pass
    return False


def release_mapped(t: torch.Tensor) -> bool:
    """Drop the pages under ``t`` (contiguous, on the CPU) from this process after its last read,
    where ``t`` is a view of a memory-mapped file (:meth:`SafetensorsFile.get`): the page cache keeps
    the file, so a later read faults the same bytes back. Memory not backed by a file is left alone
    (dropping it would zero it). Only whole pages inside ``t`` go. True when pages were dropped."""
    if t.device.type != "cpu" or t.numel() == 0 or not t.is_contiguous() or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    begin = t.data_ptr()
    end = begin + t.numel() * t.element_size()
    lo = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE
    hi = end // mmap.PAGESIZE * mmap.PAGESIZE
    if hi <= lo or not _file_mapping(begin, end):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), ctypes.c_int(mmap.MADV_DONTNEED)) == 0
