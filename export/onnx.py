"""``qvl export onnx``: the vision tower as one dynamic-resolution ONNX graph, validated against torch.

Graph (``vision.onnx``, opset 17): patch embed -> blocks -> merger, N (patches) dynamic.

    pixel_values [N, C*T*P*P] float32   patches in merge-block order, as the processor emits them
    pos_hw       [N, 2]       int64     rotary (row, col) id of each patch (``vision_positions``)
    frame_ids    [N]          int64     patches with equal ids attend to each other
    embeds       [N / merge**2, hidden] in the export dtype (float32 or float16)

Qwen2.5-VL towers add the window order (``window_index``), so window attention runs in the graph:

    window_index [N / merge**2] int64   merge block taking each place in window order
    window_ids   [N]          int64     window of each place in that order; equal ids attend

The graph gathers patches and rotary angles into window order, builds both masks (windows for
most blocks, frames for ``fullatt_block_indexes``; frames keep their patch ranges in window order,
so ``frame_ids`` serves both orders) and scatters the merged tokens back to raster order.

Why these inputs: the host does the same O(N) integer bookkeeping as the torch path, and all
float math (rotary cos/sin, the additive block-diagonal mask) is made inside the graph, so there
is one source of numerics and one file for every resolution, image count and frame count. The
mask makes attention dense over one call's patches; the runtime packs frames into bounded calls.

Exporter: ``torch.onnx.export(dynamo=False)``, the TorchScript tracer. In torch 2.13 the dynamo
exporter needs onnxscript + onnx-ir (more dependencies, fast-moving), is slower to export, and
its SDPA translation rejects 3-D q/k/v. This graph is straight-line code, which tracing
captures exactly; the validation below checks it. The tracer is deprecated: when
it goes, the switch is ``dynamo=True`` with ``dynamic_shapes={0: 4 * Dim("n")}`` for the three
inputs (with onnxscript 0.7.2 it gives the same outputs).

Validation: onnxruntime (CPU) against the fp32 torch tower on several resolutions and a
multi-image batch with a video grid, in one session call each (so the in-graph mask is what is
tested). Error is ``max |onnx - torch| / max |torch|`` per case; over ``TOLERANCE`` the export
fails and nothing is written: everything is staged in a temp dir next to the target and moved
into place only after validation.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import torch
from torch import nn

import qvl
from qvl.model.vision import VisionRotary, VisionTower
from qvl.runtime.loader import IGNORED, hf_to_qvl, read_config
from qvl.runtime.manifest import (MANIFEST, checkpoint_fingerprint, file_digest, read_manifest, umask_mode,
                                  write_manifest)
from qvl.runtime.onnx_vision import (INPUTS, ONNX_FILE, SECTION, WINDOW_INPUTS, WINDOW_META, OnnxVision,
                                     graph_inputs)
from qvl.runtime.weights import Checkpoint, CheckpointError

log = logging.getLogger(__name__)

OPSET = 17
DATA_FILE = ONNX_FILE + ".data"
# well under protobuf's 2 GiB message limit; the 2B/7B/72B towers (600M params) exceed it in fp32
EXTERNAL_DATA_BYTES = 1 << 30
# max |onnx - torch fp32| / max |torch fp32|. fp32 differs by summation order only (~1e-7 seen);
# fp16 carries fp16 rounding through every block (4.5e-4 seen on the 32-block 2B-shaped tower);
# it is a gate against broken exports (overflow, NaN), not a quality target
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
# with 8-bit weights (``vision_quant="int8"``) their rounding: 0.2% of the largest output on qvl-toy,
# 3.5% on the random-weight 2B-shaped tower, where 32 blocks of random weights compound it
# (bench/results/int8_memory.md); again a gate against broken exports, not a quality target
TOLERANCE_INT8 = 1e-1
# (t, h, w) patch grids: three aspect ratios, then several images and a 2-frame video in one call
VALIDATION_GRIDS = [[(1, 16, 16)], [(1, 12, 20)], [(1, 22, 8)], [(1, 8, 8), (2, 10, 6), (1, 4, 14)]]
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}


class ExportError(ValueError):
    pass


class VisionGraph(nn.Module):
    """The exported function: VisionTower with its frame (and window) boundaries given as data."""

    def __init__(self, tower: VisionTower):
        super().__init__()
        self.tower = tower

    def _mask(self, ids):
        same = ids[:, None] == ids[None, :]  # [N, N] block diagonal
        # additive and in the tower dtype: a bool mask is exported with fp32 constants, which an
        # fp16 graph cannot add to its scores
        return torch.where(same, 0.0, float("-inf")).to(self.tower.dtype)

    def forward(self, pixel_values, pos_hw, frame_ids, window_index=None, window_ids=None):
        if window_index is None:
            return self.tower(pixel_values, pos_hw, None, self._mask(frame_ids))
        return self.tower(pixel_values, pos_hw, None, self._mask(frame_ids), windows=window_index,
                          window_mask=self._mask(window_ids))


def graph_input_names(tower: VisionTower) -> tuple[str, ...]:
    return INPUTS + (WINDOW_INPUTS if tower.cfg.windowed else ())


def window_of(tower: VisionTower) -> int:
    """Merged tokens per window side (0: no window attention), for graph_inputs."""
    return tower.cfg.window_units if tower.cfg.windowed else 0


def load_vision_tower(path, dtype: torch.dtype = torch.float32) -> VisionTower:
    """Only the tower's tensors (memory-mapped, converted to ``dtype``): exporting never holds the
    decoder, whatever its size or quantization."""
    path = Path(path)
    cfg, _ = read_config(path)
    with torch.device("meta"):
        tower = VisionTower(cfg.vision)
    expected = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    ckpt, state = Checkpoint(path), {}
    for name in ckpt.keys():
        ours = hf_to_qvl(name)
        if not ours.startswith("visual.") or IGNORED.search(name):
            continue
        key = ours[len("visual."):]
        if key not in expected:
            raise CheckpointError(f"{path}: vision tensor {name!r} is not part of a float Qwen2-VL tower")
        if ckpt.shape(name) != expected[key]:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {list(ckpt.shape(name))}, the config "
                                  f"implies {list(expected[key])}")
        state[key] = ckpt.get(name).to(dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks vision tensors {missing[:5]}")
    tower.load_state_dict(state, assign=True)
    tower.rotary = VisionRotary(cfg.vision.head_dim, cfg.vision.rope_theta)  # computed, not stored
    return tower.eval()


def _sample(grids, patch_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, patch_dim, generator=g), torch.tensor(grids)


def export_graph(tower: VisionTower, out_dir: Path, opset: int = OPSET, export_id: str = "",
                 vision_quant: str = "none") -> list[str]:
    """Trace ``tower`` into ``out_dir/vision.onnx`` (+ ``vision.onnx.data`` when large);
    ``vision_quant="int8"``: its linears' weights in 8 bits (:mod:`qvl.export.onnx_quant`)."""
    import onnx

    scratch = out_dir / ".trace"
    scratch.mkdir()
    merge = tower.cfg.spatial_merge_size
    # two images, so the traced mask is a real block diagonal; no shape is baked in (with windows,
    # several per image)
    pv, grids = _sample([(1, 4, 4), (1, 4, 8)], tower.cfg.patch_dim, 0)
    feeds, _ = graph_inputs(pv, grids, merge, window_of(tower))
    names = graph_input_names(tower)
    args = tuple(torch.from_numpy(feeds[k]) for k in names)
    axes = {k: {0: "n_tokens" if k == "window_index" else "n_patches"} for k in names} | {"embeds": {0: "n_tokens"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's deprecation and TracerWarnings (no data-dependent code)
        torch.onnx.export(VisionGraph(tower), args, str(scratch / ONNX_FILE), dynamo=False, opset_version=opset,
                          input_names=list(names), output_names=["embeds"], dynamic_axes=axes)
    model = onnx.load(str(scratch / ONNX_FILE))  # pulls in tensors the tracer spilled to files (>2 GB)
    shutil.rmtree(scratch)
    if vision_quant == "int8":
        from qvl.export.onnx_quant import quantize_gemm_weights

        quantize_gemm_weights(model)
    onnx.helper.set_model_props(model, {"qvl_export_id": export_id, "qvl_version": qvl.__version__,
                                        WINDOW_META: str(window_of(tower))})
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    large = weight_bytes > EXTERNAL_DATA_BYTES
    onnx.save_model(model, str(out_dir / ONNX_FILE), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    files = [ONNX_FILE] + ([DATA_FILE] if large else [])
    for name in files:
        os.chmod(out_dir / name, umask_mode(0o666))  # onnx writes the data file owner-only
    log.info("wrote %s (%.1f MB of weights%s)", ONNX_FILE, weight_bytes / 1e6,
             f", external data in {DATA_FILE}" if large else "")
    return files


def validate(onnx_path: Path, reference: VisionTower, grids_list=VALIDATION_GRIDS) -> dict:
    """Errors of ``onnx_path`` (onnxruntime CPU) against ``reference`` (fp32 torch), one call per case."""
    merge = reference.cfg.spatial_merge_size
    runner = OnnxVision(onnx_path, merge, providers=["CPUExecutionProvider"])
    cases = []
    for i, grids in enumerate(grids_list):
        pv, g = _sample(grids, reference.cfg.patch_dim, 1 + i)
        with torch.no_grad():
            ref = reference.encode(pv, g)
        got = torch.from_numpy(runner.run(graph_inputs(pv, g, merge, window_of(reference))[0])).float()
        if got.shape != ref.shape:
            raise ExportError(f"vision.onnx gave shape {list(got.shape)} for grids {grids}, torch {list(ref.shape)}")
        err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
        cases.append({"grid_thw": [list(x) for x in grids], "n_patches": int(pv.shape[0]), "max_abs": err,
                      "max_rel": err / max(scale, 1e-12), "ref_max_abs": scale})
        log.info("validation %d/%d: grids %s, %d patches: max abs %.3g, rel %.3g", i + 1, len(grids_list),
                 grids, pv.shape[0], err, cases[-1]["max_rel"])
    return {"reference": "torch VisionTower.encode, float32, per-frame SDPA",
            "runtime": f"onnxruntime {_ort_version()} {runner.provider}",
            "metric": "max_rel = max|onnx - torch| / max|torch| per case (max_abs unscaled)",
            "max_abs": max(c["max_abs"] for c in cases), "max_rel": max(c["max_rel"] for c in cases),
            "cases": cases}


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _link_or_copy(src: Path, dst: Path, copy: bool) -> None:
    if not copy:
        try:
            os.link(src, dst)
            return
        except OSError:  # another filesystem, or links unsupported
            pass
    shutil.copy2(src, dst)


def export_onnx(src, out=None, *, dtype: str = "float32", onnx_only: bool = False, opset: int = OPSET,
                tolerance: float | None = None, copy: bool = False, vision_quant: str = "none") -> Path:
    """Export ``src``'s vision tower; returns the artifact directory.

    ``out``: a new directory holding the checkpoint's files (hard links, or copies with
    ``copy=True`` or across filesystems) plus vision.onnx and qvl-manifest.json. With
    ``onnx_only`` the ONNX files and the manifest entry are written into ``src`` itself.
    ``vision_quant="int8"``: the linears' weights in 8 bits, per output channel.
    """
    t0 = time.perf_counter()
    src = Path(src)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: not a checkpoint directory (no config.json)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use float32 or float16")
    dtype = "float16" if DTYPES[dtype] == torch.float16 else "float32"
    if vision_quant not in ("none", "int8"):
        raise ValueError(f"vision_quant {vision_quant!r}: use none or int8")
    tol = (TOLERANCE_INT8 if vision_quant == "int8" else TOLERANCE[dtype]) if tolerance is None else tolerance
    if opset < 17:
        raise ValueError(f"opset {opset}: 17 or later (LayerNormalization)")
    if onnx_only:
        if out is not None and Path(out).resolve() != src.resolve():
            raise ValueError("--onnx-only writes into SRC itself; give no OUT")
        target = src
    else:
        if out is None:
            raise ValueError("give an output directory OUT, or --onnx-only to write into SRC")
        target = Path(out)
        if target.exists():
            raise FileExistsError(f"{target} exists; choose a new directory (or --onnx-only)")
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.qvl-export-", dir=src if onnx_only else target.parent))
    try:
        os.chmod(stage, umask_mode(0o777))  # it becomes OUT
        fp = checkpoint_fingerprint(src)
        export_id = uuid.uuid4().hex
        log.info("loading the vision tower of %s (%s)", src, dtype)
        tower = load_vision_tower(src, DTYPES[dtype])
        n_params = sum(p.numel() for p in tower.parameters())
        window = window_of(tower)
        log.info("tracing %.1fM-parameter tower to ONNX (opset %d)", n_params / 1e6, opset)
        files = export_graph(tower, stage, opset, export_id, vision_quant)
        if dtype != "float32":
            del tower
            tower = load_vision_tower(src, torch.float32)
        log.info("validating against torch fp32 on %d cases", len(VALIDATION_GRIDS))
        report = validate(stage / ONNX_FILE, tower)
        report["tolerance_max_rel"] = tol
        del tower
        if not report["max_rel"] <= tol:  # `not <=` also catches NaN
            raise ExportError(f"vision.onnx ({dtype}) differs from the torch tower by max_rel "
                              f"{report['max_rel']:.3g} (max_abs {report['max_abs']:.3g}) > tolerance {tol:g}; "
                              "nothing was written")
        digests = {name: file_digest(stage / name) for name in files}
        manifest = read_manifest(src)  # keep what other exporters recorded about these weights
        manifest.update(qvl_version=qvl.__version__, checkpoint_sha256=fp)
        manifest.setdefault("source", {"path": str(src.resolve()), "checkpoint_sha256": fp})
        kept = {k: v for k, v in manifest.get("files", {}).items() if k not in (ONNX_FILE, DATA_FILE)}
        manifest["files"] = kept | digests
        manifest[SECTION] = {
            "export_id": export_id,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "checkpoint_sha256": fp,
            "source": str(src.resolve()),
            "file": ONNX_FILE,
            "external_data": DATA_FILE if DATA_FILE in files else None,
            "files": digests,
            "dtype": dtype,
            "vision_quant": vision_quant,
            "opset": opset,
            "parameters": n_params,
            "exporter": f"torch.onnx.export TorchScript tracer (dynamo=False), torch {torch.__version__}",
            "onnx": _onnx_version(),
            "inputs": {"pixel_values": "[N, C*T*P*P] float32", "pos_hw": "[N, 2] int64 rotary (row, col) ids",
                       "frame_ids": "[N] int64; equal ids attend to each other"} | ({
                "window_index": "[N / merge**2] int64 merge block at each place in window order",
                "window_ids": "[N] int64 window of each place in window order; equal ids attend"}
                if window else {}),
            "window": window,
            "outputs": {"embeds": f"[N / merge**2, hidden] {dtype}"},
            "validation": report,
            "export_s": round(time.perf_counter() - t0, 1),
        }
        if onnx_only:
            write_manifest(stage, manifest)
            # data before graph before manifest: an interrupted move leaves an old manifest that
            # no longer matches the new files' sizes or export id, which loading reports
            for name in files[::-1] + [MANIFEST]:
                os.replace(stage / name, src / name)
            if DATA_FILE not in files and (src / DATA_FILE).exists():
                (src / DATA_FILE).unlink()
            shutil.rmtree(stage)
        else:
            n = 0
            for f in sorted(src.iterdir()):
                if f.is_file() and f.name not in (ONNX_FILE, DATA_FILE, MANIFEST) and not f.name.startswith("."):
                    _link_or_copy(f, stage / f.name, copy)
                    n += 1
            log.info("%s %d checkpoint files", "copied" if copy else "linked", n)
            write_manifest(stage, manifest)
            stage.rename(target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    log.info("exported %s in %.1fs: max_rel %.3g (tolerance %g)", target / ONNX_FILE, time.perf_counter() - t0,
             report["max_rel"], tol)
    return target


def _onnx_version() -> str:
    import onnx

    return onnx.__version__
