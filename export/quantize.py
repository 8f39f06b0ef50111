"""``qvl export gptq|awq SRC OUT``: a float Qwen2-VL checkpoint -> a GPTQ v1 / AWQ gemm artifact.

Steps (progress logged throughout):
1. calibration chats -> processor -> embeddings + vision tower -> the first layer's inputs;
2. layer by layer (``qvl.export.layerwise``): load the layer, quantize it on the inputs the
   quantized layers before produced, keep its packed tensors and outputs in the work directory
   ``.OUT.partial`` (an interrupted export started again with the same settings resumes after
   the last finished layer);
3. assemble OUT in a temporary directory: packed decoder linears under the source's own tensor
   names, everything else (vision tower, embeddings, norms, lm_head) in fp16, config.json with
   the ``quantization_config`` of Qwen's official releases, tokenizer / processor / generation
   files copied;
4. quality report: teacher-forced KL divergence and top-1 agreement of the artifact against the
   source on held-out chats the calibration never saw, through the qvl runtime;
5. ``qvl-manifest.json`` (source fingerprint, settings, calibration, per-layer errors, quality,
   file hashes), then one rename to OUT; ``overwrite`` replaces only an earlier export (its
   manifest says so), renamed aside until the new one is in place.

OUT may not be, contain or lie inside SRC; settings are checked before any of this starts.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import qvl
from qvl.export.calib import load_samples
from qvl.export.layerwise import LINEARS, LayerInput, LayerwiseModel, QuantSpec, first_layer_inputs, quantize_layer
from qvl.quant.packing import pack_awq, pack_gptq
from qvl.quant.weight import QuantizedWeight
from qvl.runtime.manifest import (MANIFEST, checkpoint_fingerprint, file_digest, read_manifest, umask_mode,
                                  write_manifest)

log = logging.getLogger(__name__)

SECTION = "quantization"
NOT_COPIED = {"config.json", "model.safetensors.index.json", MANIFEST, "vision.onnx", "vision.onnx.data"}
MAX_SHARD_BYTES = 4 << 30
QUALITY_SEED = 40_000  # held-out chats for the quality report: neither calibration nor qvl-toy's sets


class ExportError(ValueError):
    pass


def quantization_config(spec: QuantSpec) -> dict:
    """config.json's ``quantization_config``, shaped like Qwen's official AWQ / GPTQ releases."""
    if spec.fmt == "awq":
        # "visual" is the official value (AutoAWQ matches substrings); transformers 5 matches from
        # the start of its own module names, where the tower is "model.visual"
        return {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": spec.group_size,
                "zero_point": True, "modules_to_not_convert": ["visual", "model.visual"]}
    return {"bits": spec.bits, "group_size": spec.group_size, "damp_percent": spec.damp_percent,
            "desc_act": spec.desc_act, "sym": spec.sym, "true_sequential": spec.true_sequential,
            "static_groups": False, "quant_method": "gptq", "checkpoint_format": "gptq"}


def pack(qw: QuantizedWeight, fmt: str) -> dict[str, torch.Tensor]:
    """A QuantizedWeight -> the file tensors of its linear (without the bias)."""
    q = qw.q.t().contiguous()  # files are [K, N]
    zeros = qw.zeros.to(torch.int64)
    scales = qw.scales.to(torch.float16).contiguous()
    if fmt == "awq":
        qweight, qzeros = pack_awq(q, zeros)
        return {"qweight": qweight, "qzeros": qzeros, "scales": scales}
    qweight, qzeros = pack_gptq(q, zeros, qw.bits)
    g_idx = qw.g_idx if qw.g_idx is not None else torch.arange(qw.in_features) // qw.group_size
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx.to(torch.int32)}


def _check_shapes(lw: LayerwiseModel, spec: QuantSpec) -> None:
    """Fail before any work on shapes the format or the group size cannot hold."""
    layer = lw.model.layers[0]
    for n in LINEARS:
        lin = layer.get_submodule(n)
        k, out = lin.in_features, lin.out_features
        g = spec.grid.group_for(k)
        if k % g:
            raise ExportError(f"{n}: in_features={k} is not divisible by group_size={g}")
        per = 32 // spec.bits
        if spec.fmt == "awq" and out % 8:
            raise ExportError(f"{n}: out_features={out} is not a multiple of 8 (AWQ gemm packs 8 per word)")
        if spec.fmt == "gptq" and (k % per or out % per):
            raise ExportError(f"{n}: [{out}, {k}] does not pack {per} values per int32 word at {spec.bits} bits")


# --- the work directory: per-layer results, resumable --------------------------------------

class WorkDir:
    def __init__(self, path: Path, key: dict):
        self.path, self.key = path, key
        self.state_file = path / "state.json"

    def start(self) -> int:
        """The first layer still to do (0 for a fresh start)."""
        if self.state_file.exists():
            state = json.loads(self.state_file.read_text())
            if state.get("key") == self.key:
                log.info("resuming the interrupted export in %s after layer %d", self.path, state["done"] - 1)
                return int(state["done"])
            log.info("%s holds an export with other settings; starting over", self.path)
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
        return 0

    def save_inputs(self, inputs: list[LayerInput]) -> None:
        tensors = {}
        for i, inp in enumerate(inputs):
            tensors[f"x.{i}"] = inp.x.cpu().contiguous()
            tensors[f"pos.{i}"] = inp.positions.cpu().contiguous()
        tmp = self.path / "inputs.safetensors.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, self.path / "inputs.safetensors")

    def load_inputs(self, device) -> list[LayerInput]:
        t = load_file(str(self.path / "inputs.safetensors"))
        n = sum(1 for k in t if k.startswith("x."))
        return [LayerInput(t[f"x.{i}"].to(device), t[f"pos.{i}"].to(device)) for i in range(n)]

    def finish_layer(self, i: int, tensors: dict[str, torch.Tensor], report: dict, outputs: list[LayerInput],
                     calib: dict) -> None:
        save_file(tensors, str(self.path / f"layer-{i:04d}.safetensors"))
        (self.path / f"layer-{i:04d}.json").write_text(json.dumps(report))
        self.save_inputs(outputs)
        state = {"key": self.key, "done": i + 1, "calibration": calib}
        tmp = self.path / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_file)  # the layer counts as done only once this lands

    def calibration(self) -> dict:
        return json.loads(self.state_file.read_text()).get("calibration", {})

    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / f"layer-{i:04d}.safetensors"))

    def layer_report(self, i: int) -> dict:
        return json.loads((self.path / f"layer-{i:04d}.json").read_text())


# --- the layer loop -------------------------------------------------------------------------

def _layer_tensors(lw: LayerwiseModel, i: int, layer, qws: dict[str, QuantizedWeight], fmt: str) -> dict:
    """All of layer i's file tensors under the source's names: packed linears, fp16 rest."""
    out = {}
    for name, t in layer.state_dict().items():
        ours = f"layers.{i}.{name}"
        mod, _, leaf = name.rpartition(".")
        if mod in qws and leaf == "weight":
            prefix = lw.file_name(ours)[: -len(".weight")]
            for k, v in pack(qws[mod], fmt).items():
                out[f"{prefix}.{k}"] = v
        else:  # norms (AWQ rescales them) and biases
            out[lw.file_name(ours)] = _fp16(t, ours)
    return out


def _fp16(t: torch.Tensor, name: str) -> torch.Tensor:
    h = t.to(torch.float16)
    if t.is_floating_point() and not bool(torch.isfinite(h).all()):
        raise ExportError(f"{name} overflows float16 (|max| {float(t.abs().max()):.3g}); this checkpoint "
                          "cannot be stored the way the AWQ/GPTQ formats expect")
    return h.contiguous()


def quantize_layers(lw: LayerwiseModel, spec: QuantSpec, work: WorkDir, samples: list, calib: dict,
                    max_tokens: int) -> list[dict]:
    n_layers = lw.cfg.text.num_hidden_layers
    start = work.start()
    if start == 0:
        t0 = time.perf_counter()
        inputs = first_layer_inputs(lw, samples, max_tokens)
        calib = calib | {"used": len(inputs), "tokens": sum(int(x.x.shape[1]) for x in inputs)}
        log.info("calibration: %d chats, %d tokens (%.1fs)", len(inputs), calib["tokens"], time.perf_counter() - t0)
        work.save_inputs(inputs)
    else:
        inputs = work.load_inputs(lw.device)
        calib = work.calibration()
    t_layers = time.perf_counter()
    for i in range(start, n_layers):
        t0 = time.perf_counter()
        layer = lw.load(f"layers.{i}")
        qws, report, outs = quantize_layer(layer, inputs, lw.model.rope, spec)
        tensors = _layer_tensors(lw, i, layer, qws, spec.fmt)
        inputs = [LayerInput(o, inp.positions) for o, inp in zip(outs, inputs)]
        report["seconds"] = round(time.perf_counter() - t0, 2)
        work.finish_layer(i, tensors, report, inputs, calib)
        lw.unload(f"layers.{i}")
        done = i + 1 - start
        eta = (time.perf_counter() - t_layers) / done * (n_layers - i - 1)
        log.info("layer %d/%d quantized in %.1fs: output rel. MSE %.2e (ETA %.0fs)", i + 1, n_layers,
                 report["seconds"], report["output_rel_mse"], eta)
    return [work.layer_report(i) for i in range(n_layers)]


# --- assembling the artifact ----------------------------------------------------------------

def _write_weights(stage: Path, tensors_by_part: list[dict[str, torch.Tensor]]) -> list[str]:
    """Write the parts (each a dict of tensors) into shards of at most MAX_SHARD_BYTES."""
    shards, cur, size = [], {}, 0
    for part in tensors_by_part:
        nbytes = sum(t.numel() * t.element_size() for t in part.values())
        if cur and size + nbytes > MAX_SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur.update(part)
        size += nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], str(stage / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names, weight_map = [], {}
    for j, shard in enumerate(shards):
        name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(stage / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
    (stage / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return names + ["model.safetensors.index.json"]


def _config(src: Path, spec: QuantSpec) -> dict:
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = quantization_config(spec)
    cfg["torch_dtype"] = "float16"  # the formats' float tensors are fp16
    if "dtype" in cfg:
        cfg["dtype"] = "float16"
    if isinstance(cfg.get("text_config"), dict) and "dtype" in cfg["text_config"]:
        cfg["text_config"]["dtype"] = "float16"
    return cfg


def assemble(lw: LayerwiseModel, spec: QuantSpec, work: WorkDir, stage: Path) -> list[str]:
    n_layers = lw.cfg.text.num_hidden_layers
    layer_names = {lw.file_name(k) for k in lw.file_names if k.startswith("layers.")}
    rest = {}
    for ours, name in lw.file_names.items():
        if name not in layer_names:
            rest[name] = _fp16(lw.ckpt.get(name), name)
    parts = [rest] + [work.layer_tensors(i) for i in range(n_layers)]
    files = _write_weights(stage, parts)
    (stage / "config.json").write_text(json.dumps(_config(lw.path, spec), indent=2) + "\n")
    for f in sorted(lw.path.iterdir()):
        if f.is_file() and f.suffix != ".safetensors" and f.name not in NOT_COPIED and not f.name.startswith("."):
            shutil.copy2(f, stage / f.name)
    return files + ["config.json"]


# --- quality ---------------------------------------------------------------------------------

def quality_report(src: Path, artifact: Path, n: int, max_new_tokens: int = 16, dtype: str = "float32",
                   device="cpu") -> dict:
    """KL(source || artifact) per answer token and top-1 agreement, teacher-forced on the source's
    greedy answers to ``n`` held-out synthetic chats, both models run by qvl in ``dtype``."""
    from qvl.export.calib import default_samples

    chats = [[m for m in c if m["role"] == "user"] for c in default_samples(n, seed=QUALITY_SEED)]
    ref = qvl.load(src, device=device, dtype=dtype, max_seq_len=4096)
    answers, ref_lps = [], []
    for c in chats:
        ids = ref.generate_ids(c, max_new_tokens=max_new_tokens)
        answers.append(ids)
        ref_lps.append(ref.score(c, ids))
    del ref
    q = qvl.load(artifact, device=device, dtype=dtype, max_seq_len=4096)
    kl_sum, agree, n_tok, exact = 0.0, 0, 0, 0
    for c, ids, ref_lp in zip(chats, answers, ref_lps):
        lp = q.score(c, ids)
        kl_sum += float((ref_lp.exp() * (ref_lp - lp)).sum())
        agree += int((ref_lp.argmax(-1) == lp.argmax(-1)).sum())
        n_tok += len(ids)
        exact += int(q.generate_ids(c, max_new_tokens=max_new_tokens) == ids)
    return {"samples": len(chats), "answer_tokens": n_tok, "seed": QUALITY_SEED, "dtype": dtype,
            "kl_mean": kl_sum / n_tok, "top1_agreement": agree / n_tok, "same_greedy_answer": exact / len(chats)}


# --- where the artifact goes ----------------------------------------------------------------

def _check_paths(src: Path, out: Path, overwrite: bool) -> None:
    """Refuse, before anything is written, an OUT whose writing or replacing would touch the
    source or anything else qvl did not write."""
    s, o = src.resolve(), out.resolve()
    if o == s:
        raise ExportError(f"OUT {out} is the source checkpoint; choose another directory")
    if s.is_relative_to(o):
        raise ExportError(f"OUT {out} contains the source checkpoint {src}; choose a directory outside it")
    if o.is_relative_to(s):
        raise ExportError(f"OUT {out} lies inside the source checkpoint {src}; choose a directory outside it")
    work = _work_path(o)
    if s.is_relative_to(work):  # the work directory is cleared on a fresh start
        raise ExportError(f"the source checkpoint {src} lies in {work}, the work directory of OUT {out}")
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists; choose a new directory (or --overwrite)")
    _check_replaceable(out)


def _check_replaceable(out: Path) -> None:
    """--overwrite deletes only what export_quantized assembled: a directory whose manifest has its
    section (a manifest alone is no proof: ``qvl export onnx --onnx-only`` writes one into the
    user's own checkpoint)."""
    if not out.is_dir():
        raise FileExistsError(f"{out} is not a directory, so not written by qvl export; --overwrite will not "
                              "delete it")
    try:
        manifest = read_manifest(out)
    except ValueError:
        manifest = None
    if not (isinstance(manifest, dict) and SECTION in manifest):
        raise FileExistsError(f"{out} was not written by qvl export (no {MANIFEST} with a {SECTION!r} section); "
                              "--overwrite will not delete it")


def _work_path(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _move_into_place(stage: Path, out: Path, work: WorkDir) -> None:
    """Rename the finished artifact to OUT. An OUT being replaced is renamed aside first and back
    if the second rename fails, so a failure leaves the old artifact where it was."""
    old = work.path / "replaced"
    if out.exists():
        _check_replaceable(out)
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    try:
        stage.rename(out)
    except BaseException:
        if old.exists():
            old.rename(out)
        raise


# --- the command -----------------------------------------------------------------------------

def export_quantized(src, out, spec: QuantSpec, *, calib: str | None = None, calib_samples: int = 64,
                     max_tokens: int = 2048, quality_samples: int = 16, device: str = "cpu",
                     overwrite: bool = False) -> Path:
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: not a checkpoint directory (no config.json)")
    _check_paths(src, out, overwrite)
    if max_tokens < 1:
        raise ExportError(f"max_tokens={max_tokens}: calibration chats need at least 1 token")
    if quality_samples < 0:
        raise ExportError(f"quality_samples={quality_samples}: 0 (no quality report) or more")
    target = out.resolve()  # a symlinked OUT: its target is replaced, the link kept
    lw = LayerwiseModel(src, device)
    _check_shapes(lw, spec)
    samples, calib_info = load_samples(calib, calib_samples)
    fp = checkpoint_fingerprint(src)
    key = {"source": fp, "spec": spec.__dict__, "calibration": calib_info, "max_tokens": max_tokens,
           "qvl_version": qvl.__version__}
    target.parent.mkdir(parents=True, exist_ok=True)
    work = WorkDir(_work_path(target), key)
    log.info("quantizing %s -> %s: %s %d-bit, group %d, %s%s", src, out, spec.method.upper(), spec.bits,
             spec.group_size, "sym" if spec.sym else "asym", ", act-order" if spec.desc_act else "")
    layer_reports = quantize_layers(lw, spec, work, samples, calib_info, max_tokens)
    calib_info = work.calibration() or calib_info
    t_quant = time.perf_counter() - t0

    stage = work.path / "artifact"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    os.chmod(stage, umask_mode(0o777))
    log.info("writing the artifact")
    files = assemble(lw, spec, work, stage)
    quality = None
    if quality_samples > 0:
        log.info("quality report: %d held-out chats, source vs artifact", quality_samples)
        quality = quality_report(src, stage, quality_samples, device=device)
        log.info("quality: KL %.4g, top-1 agreement %.1f%%, same greedy answer %.0f%%", quality["kl_mean"],
                 100 * quality["top1_agreement"], 100 * quality["same_greedy_answer"])
    manifest = {
        "qvl_version": qvl.__version__,
        "checkpoint_sha256": checkpoint_fingerprint(stage),
        "source": {"path": str(src.resolve()), "checkpoint_sha256": fp},
        "files": {f: file_digest(stage / f) for f in sorted(set(files))},
        SECTION: {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "method": spec.method, "format": {"gptq": "AutoGPTQ v1 (checkpoint_format gptq)",
                                              "awq": "AutoAWQ gemm"}[spec.fmt],
            "settings": spec.__dict__, "quantization_config": quantization_config(spec),
            "calibration": calib_info | {"max_tokens": max_tokens},
            "not_quantized": "vision tower, embeddings, norms, lm_head (float16)",
            "device": str(device), "quantize_s": round(t_quant, 1),
            "layers": layer_reports,
            "quality": quality,
            "export_s": round(time.perf_counter() - t0, 1),
        },
    }
    write_manifest(stage, manifest)
    # copies keep their source's mode and safetensors writes 0600: give every file the mode a plain
    # open() would, as the manifest and config.json have
    for f in stage.iterdir():
        os.chmod(f, umask_mode(0o666))
    _move_into_place(stage, target, work)
    shutil.rmtree(work.path, ignore_errors=True)
    log.info("exported %s in %.1fs", out, time.perf_counter() - t0)
    return out
