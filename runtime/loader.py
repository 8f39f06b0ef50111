"""Build a Qwen2VL from a checkpoint directory: config, name map, memory-mapped weights.

The model is constructed on the meta device and its parameters assigned from the mapped
safetensors, so no second copy of the weights exists while loading. Quantized decoder linears
(``quantization_config``) become :mod:`qvl.quant` modules built straight from the packed tensors.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from qvl.model.config import ConfigError, Qwen2VLConfig, read_json_object
from qvl.model.qwen2_vl import Qwen2VL
from qvl.quant import decode_ops
from qvl.quant.config import QuantConfig
from qvl.runtime.quantized import QuantizedLinears
from qvl.runtime.vision_quant import VisionQuantizer
from qvl.runtime.weights import Checkpoint, CheckpointError

log = logging.getLogger(__name__)

# HF checkpoint name -> qvl name. Official releases use `model.*` / `visual.*`; transformers 5
# writes `model.language_model.*` / `model.visual.*`. First match wins.
NAME_MAP = [
    (r"^model\.language_model\.", ""),
    (r"^model\.visual\.", "visual."),
    (r"^model\.", ""),
    (r"^visual\.patch_embed\.proj\.weight$", "visual.patch_embed.weight"),
]
# Tensors some exporters add that carry nothing the model needs.
IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.rotary_pos_emb\.inv_freq)$")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def hf_to_qvl(name: str) -> str:
    for pat, rep in NAME_MAP:
        name = re.sub(pat, rep, name, count=1)
    return name


class DeviceError(ValueError):
    """The device named is one this torch cannot place tensors on."""


def check_device(device) -> torch.device:
    """``device`` as a ``torch.device`` where tensors can be placed, else a one-line ``DeviceError``
    saying why (torch's own are an AssertionError, or a page of dispatcher keys). CUDA is checked
    without creating a context, so a parent process can check for its workers."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"device {device!r} is not a torch device: {str(e).splitlines()[0]}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"this torch has no CUDA (torch {torch.__version__})" if torch.version.cuda is None
                   else f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no GPU")
            raise DeviceError(f"device {device!r}: {why}; use device 'cpu', or a CUDA build of torch on a "
                              "machine with an NVIDIA GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "meta":
        raise DeviceError(f"device {device!r} holds no data; use 'cpu' or 'cuda'")
    elif dev.type != "cpu":
        backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
        if hasattr(backend, "is_available") and not backend.is_available():
            raise DeviceError(f"device {device!r}: not available with this torch ({torch.__version__}) "
                              "on this machine; use 'cpu'")
        try:
            torch.empty(1, device=dev)
        except (RuntimeError, AssertionError, NotImplementedError) as e:
            raise DeviceError(f"device {device!r}: {str(e).splitlines()[0].split('. ')[0]}") from None
    return dev


def read_config(path: Path) -> tuple[Qwen2VLConfig, dict]:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise ConfigError(f"{path}: no config.json (is this a Hugging Face checkpoint directory?)")
    raw = read_json_object(cfg_path)
    return Qwen2VLConfig.from_hf(raw), raw


def resolve_dtype(dtype, raw_config: dict) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dtype = raw_config.get("torch_dtype") or raw_config.get("dtype") or \
            (raw_config.get("text_config") or {}).get("dtype") or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported; use one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def load_model(path, dtype="float32", device="cpu", vision: bool = True, quant_kernel: str = "auto",
               vision_quant: str = "none") -> Qwen2VL:
    """``vision=False`` leaves the vision tower on the meta device, unread: for callers that run
    the tower elsewhere (onnxruntime). ``quant_kernel``: the quantized linears' path
    (:data:`qvl.quant.linear.KERNELS`; "auto" picks the fastest that runs here).
    ``vision_quant="int8"``: the tower's linears load as int8 (:mod:`qvl.runtime.vision_quant`)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    device = check_device(device)
    cfg, raw = read_config(path)
    qcfg = QuantConfig.from_hf(cfg.quantization) if cfg.quantization else None
    dtype = resolve_dtype(dtype, raw)
    with torch.device("meta"):
        model = Qwen2VL(cfg)
    quant = QuantizedLinears(model, qcfg) if qcfg else None
    vq = VisionQuantizer(model, vision_quant if vision else "none")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not (quant and k.rpartition(".")[0] in quant.targets) and k.rpartition(".")[0] not in vq.targets}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    if not vision:
        expected = {k: v for k, v in expected.items() if not k.startswith("visual.")}

    ckpt = Checkpoint(path)
    state, unexpected = {}, []
    for name in ckpt.keys():
        ours = hf_to_qvl(name)
        if quant and quant.claim(ours, name) or vq.claim(ours, name):
            continue
        if ours not in expected:
            if IGNORED.search(name) or (cfg.tie_word_embeddings and ours == "lm_head.weight") or \
                    (not vision and ours.startswith("visual.")):
                continue
            unexpected.append(name)
            continue
        shape = ckpt.shape(name)
        if shape != expected[ours]:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {list(shape)}, the config implies "
                                  f"{list(expected[ours])}")
        if ours in state:
            raise CheckpointError(f"{path}: tensor {ours!r} given twice (under two naming schemes)")
        t = ckpt.get(name)
        if t.dtype != dtype:
            t = t.to(dtype)  # conversion copies, tensor by tensor
        state[ours] = t.to(device)
    missing = sorted(set(expected) - set(state))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: checkpoint lacks tensors {missing[:5]}{more}")
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{path}: checkpoint has tensors this model does not use: "
                              f"{unexpected[:5]}{more}")
    if quant:
        try:
            quant.build(model, ckpt, dtype, device, quant_kernel)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
    try:
        vq.build(model, ckpt, dtype, device, quant_kernel)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model.load_state_dict(state, assign=True, strict=not cfg.tie_word_embeddings and vision)
    model.tie_weights()
    model.init_buffers(device)
    model.fuse_linears()  # after the quantized build: one kernel call for q/k/v and for gate/up
    model.decode_ops = decode_ops.for_device(device)
    log.info("loaded %s: %d tensors, %s on %s", path, len(state), dtype, device)
    return model.eval()
