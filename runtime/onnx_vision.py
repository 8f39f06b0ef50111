"""The vision tower in onnxruntime: same ``encode(pixel_values, grid_thw) -> embeds`` as VisionTower.

``vision.onnx`` (written by ``qvl export onnx``, see :mod:`qvl.export.onnx`) takes
``pixel_values`` [N, C*T*P*P] float32, ``pos_hw`` [N, 2] int64 (rotary row/col ids) and
``frame_ids`` [N] int64 (patches with equal ids attend to each other) and returns ``embeds``
[N / merge**2, hidden]. A Qwen2.5-VL graph also takes ``window_index`` [N / merge**2] int64
(``qvl.model.vision.window_index``: the merge block taking each place in window order) and
``window_ids`` [N] int64 (the window of each place in that order); the graph reorders the
patches, attends inside windows or frames block by block, and restores raster order itself. Its
metadata ``qvl_vision_window`` holds the window side in merged tokens (0: no windows).
The block-diagonal masks are built inside the graph, so one call may hold any number of images
and frames; attention is then dense over the call's N patches, so ``encode`` packs whole frames
into calls of at most ``pack_patches`` (a larger frame goes alone), which keeps the wasted
cross-frame work and the [heads, N, N] scores bounded. Windows never cross a frame, so a call's
slice of the window inputs is the call's own window order.

onnxruntime is imported here only, and only when this backend is chosen.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from qvl.model.vision import vision_positions, window_index
from qvl.runtime.manifest import checkpoint_fingerprint, read_manifest

log = logging.getLogger(__name__)

ONNX_FILE = "vision.onnx"
SECTION = "vision_onnx"  # manifest section written by the exporter
PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
INPUTS = ("pixel_values", "pos_hw", "frame_ids")
WINDOW_INPUTS = ("window_index", "window_ids")
WINDOW_META = "qvl_vision_window"
PACK_PATCHES = 1024


class OnnxVisionError(ValueError):
    pass


def graph_inputs(pixel_values: torch.Tensor, grid_thw: torch.Tensor, merge: int,
                 window: int = 0) -> tuple[dict, list[int]]:
    """Numpy feeds for vision.onnx and the frame boundaries (cumulative patch counts);
    ``window`` (merged tokens per window side, Qwen2.5-VL) adds the window inputs."""
    pos_hw, cu = vision_positions(grid_thw, merge)
    frame_ids = torch.repeat_interleave(torch.arange(len(cu) - 1), cu.diff())  # [N]
    feeds = {"pixel_values": pixel_values.detach().to("cpu", torch.float32).numpy(),
             "pos_hw": pos_hw.numpy(), "frame_ids": frame_ids.numpy()}
    if window:
        index, cu_w = window_index(grid_thw, merge, window)
        feeds["window_index"] = index.numpy()
        feeds["window_ids"] = torch.repeat_interleave(torch.arange(len(cu_w) - 1), cu_w.diff()).numpy()
    return feeds, cu.tolist()


def slice_feeds(feeds: dict, a: int, b: int, unit: int) -> dict:
    """The feeds of patches [a, b), whole frames: ``window_index`` counts merge blocks from the
    slice's start."""
    out = {k: v[a:b] for k, v in feeds.items() if k != "window_index"}
    if "window_index" in feeds:
        out["window_index"] = feeds["window_index"][a // unit : b // unit] - a // unit
    return out


def pack_frames(cu_seqlens: list[int], budget: int) -> list[tuple[int, int]]:
    """Patch ranges [a, b) of whole consecutive frames, each holding at most ``budget`` patches
    unless one frame alone is larger."""
    calls, start = [], 0
    for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        if b - start > budget and a > start:
            calls.append((start, a))
            start = a
    calls.append((start, cu_seqlens[-1]))
    return calls


def pick_providers(available) -> list[str]:
    """The installed ones of TensorRT, CUDA, CPU, best first; onnxruntime places each node on
    the first that supports it and skips one that fails to start."""
    return [p for p in PROVIDERS if p in available]


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("the ONNX vision backend needs onnxruntime: pip install 'qvl[onnx]' "
                          "(or onnxruntime-gpu)") from None
    return onnxruntime


class OnnxVision:
    def __init__(self, onnx_path, merge: int, providers=None, threads: int | None = None,
                 pack_patches: int = PACK_PATCHES):
        ort = _ort()
        self.merge, self.pack_patches = merge, pack_patches
        available = ort.get_available_providers()
        providers = list(providers or pick_providers(available))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        # the vision call is followed by torch prefill/decode on the same cores: idle ORT workers
        # must sleep, not spin
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # the arena would keep the largest image's activations (GBs of [heads, N, N] scores at
        # 720p on the 2B tower) for the life of the process; torch returns them after each call
        opts.enable_cpu_mem_arena = False
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=providers)
        self.provider = self.session.get_providers()[0]
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        self.out_dtype = self.session.get_outputs()[0].type  # e.g. "tensor(float16)"
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.window = int(self.metadata.get(WINDOW_META, 0))
        if (self.window > 0) != all(k in self.inputs for k in WINDOW_INPUTS):
            raise OnnxVisionError(f"{onnx_path}: inputs {self.inputs} do not match its window metadata "
                                  f"({WINDOW_META}={self.window}); export it again")
        log.info("vision tower: onnxruntime %s, %s, %s (providers available: %s)", ort.__version__,
                 self.provider, self.out_dtype, ", ".join(available))

    @classmethod
    def from_checkpoint(cls, path, merge: int, **kw) -> "OnnxVision":
        """Open ``path/vision.onnx`` after checking, via the manifest, that it belongs to ``path``."""
        path = Path(path)
        onnx_path = path / ONNX_FILE
        hint = f"export one with `qvl export onnx --onnx-only {path}`, or use vision_backend='torch'"
        if not onnx_path.exists():
            raise OnnxVisionError(f"{path}: no {ONNX_FILE}; {hint}")
        sec = read_manifest(path).get(SECTION)
        if not sec:
            raise OnnxVisionError(f"{path}: no qvl-manifest.json entry for {ONNX_FILE}, so it cannot be "
                                  f"checked against this checkpoint; {hint}")
        fp = checkpoint_fingerprint(path)
        if sec.get("checkpoint_sha256") != fp:
            raise OnnxVisionError(
                f"{onnx_path} was exported from a different checkpoint (manifest: "
                f"{str(sec.get('checkpoint_sha256'))[:16]}..., this checkpoint: {fp[:16]}...; source "
                f"{sec.get('source', '?')}); {hint}")
        for name, info in sec.get("files", {}).items():
            f = path / name
            if not f.exists() or f.stat().st_size != info["bytes"]:
                raise OnnxVisionError(f"{f}: missing or not the file the manifest describes "
                                      f"({info['bytes']} bytes); {hint}")
        vision = cls(onnx_path, merge, **kw)
        if vision.metadata.get("qvl_export_id") != sec.get("export_id"):
            raise OnnxVisionError(f"{onnx_path} is not the file its manifest entry describes "
                                  f"(export id mismatch); {hint}")
        return vision

    def run(self, feeds: dict) -> np.ndarray:
        """One session call: all given frames in one graph run."""
        return self.session.run(None, {k: feeds[k] for k in self.inputs})[0]

    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C*T*P*P] -> merged embeddings [N / merge**2, hidden], on pixel_values' device."""
        feeds, cu = graph_inputs(pixel_values, grid_thw, self.merge, self.window)
        unit = self.merge**2
        outs = [self.run(slice_feeds(feeds, a, b, unit)) for a, b in pack_frames(cu, self.pack_patches)]
        return torch.from_numpy(np.concatenate(outs)).to(pixel_values.device)
