"""One decoder layer at a time: the float checkpoint opened part by part, the calibration inputs
of the first layer, and the quantization of one layer on the inputs the layers before produced.

Only the part being worked on is materialized (fp32, on the compute device); the rest of the
model stays on the meta device and the weights in the memory-mapped files, so a 7B model
quantizes in the RAM of its largest layer plus the cached activations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qvl.model.qwen2_vl import Qwen2VL
from qvl.model.rope import rope_index
from qvl.quant import awq
from qvl.quant.gptq import Hessian, gptq
from qvl.quant.rtn import Grid, rtn
from qvl.quant.weight import QuantizedWeight
from qvl.runtime.loader import IGNORED, hf_to_qvl, read_config
from qvl.runtime.weights import Checkpoint, CheckpointError

log = logging.getLogger(__name__)

# true-sequential order: each step is calibrated on the outputs of the steps before, quantized
SEQUENCE = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
            ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
LINEARS = tuple(n for step in SEQUENCE for n in step)
SEARCH_TOKENS = 4096  # tokens AWQ's grid searches evaluate (all of them feed its statistics)


@dataclass(frozen=True)
class QuantSpec:
    method: str  # "gptq" | "awq" | "rtn"
    fmt: str  # file layout: "gptq" (AutoGPTQ v1) | "awq" (AutoAWQ gemm)
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    damp_percent: float = 0.1
    true_sequential: bool = True

    def __post_init__(self):
        if self.method not in ("gptq", "awq", "rtn"):
            raise ValueError(f"method {self.method!r}: gptq, awq or rtn")
        if self.fmt == "awq" and (self.bits != 4 or self.sym):
            raise ValueError("the AWQ gemm format holds 4-bit weights with zero points (sym=False)")
        if self.fmt == "gptq" and self.bits not in (4, 8):
            raise ValueError(f"GPTQ bits={self.bits}: qvl writes 4- or 8-bit GPTQ files")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size={self.group_size}: a positive number of columns, or -1 for whole rows")
        # the bounds AutoGPTQ and transformers' GPTQConfig enforce when they read quantization_config;
        # at 0 the positive-definiteness retries, which scale the damping, could not raise it
        if not 0 < self.damp_percent < 1:
            raise ValueError(f"damp_percent={self.damp_percent}: a fraction of the mean Hessian diagonal, "
                             "strictly between 0 and 1")
        if self.desc_act and self.method != "gptq":
            raise ValueError("desc_act (act-order) is a GPTQ option")

    @property
    def grid(self) -> Grid:
        # AWQ's grid spans the group's own [min, max]; GPTQ's always contains 0, and v1 files
        # store zero - 1, so their zero points start at 1
        return Grid(self.bits, self.group_size, self.sym, include_zero=self.method != "awq",
                    min_zero=1 if self.fmt == "gptq" else 0)


class LayerwiseModel:
    """A float checkpoint whose parts (``embed_tokens``, ``visual``, ``layers.3``) are loaded on demand."""

    def __init__(self, path, device="cpu"):
        self.path = Path(path)
        self.cfg, self.raw = read_config(self.path)
        if self.cfg.quantization:
            raise ValueError(f"{path} is already quantized ({self.cfg.quantization.get('quant_method')}); "
                             "quantize the float checkpoint it came from")
        self.device = torch.device(device)
        with torch.device("meta"):
            self.model = Qwen2VL(self.cfg)
        self.model.init_buffers(self.device)
        self.ckpt = Checkpoint(self.path)
        self.file_names = {hf_to_qvl(n): n for n in self.ckpt.keys() if not IGNORED.search(n)}

    def file_name(self, ours: str) -> str:
        if ours not in self.file_names:
            raise CheckpointError(f"{self.path}: checkpoint lacks tensor {ours!r}")
        return self.file_names[ours]

    def load(self, prefix: str) -> nn.Module:
        """Materialize submodule ``prefix`` in fp32 on the device (a private copy, safe to modify)."""
        mod = self.model.get_submodule(prefix)
        state = {}
        for k, v in mod.state_dict().items():
            name = self.file_name(f"{prefix}.{k}")
            shape = self.ckpt.shape(name)
            if shape != tuple(v.shape):
                raise CheckpointError(f"{self.path}: tensor {name!r} has shape {list(shape)}, the config "
                                      f"implies {list(v.shape)}")
            state[k] = self.ckpt.get(name).to(self.device, torch.float32, copy=True)
        mod.load_state_dict(state, assign=True)
        return mod

    def unload(self, prefix: str) -> None:
        self.model.get_submodule(prefix).to_empty(device="meta")
        for ours, name in self.file_names.items():
            if ours.startswith(prefix + "."):
                self.ckpt.release(name)


@dataclass
class LayerInput:
    x: torch.Tensor  # [1, T, D] fp32, the hidden states entering the current layer
    positions: torch.Tensor  # [3, 1, T] M-RoPE ids


@torch.no_grad()
def first_layer_inputs(lw: LayerwiseModel, samples: list[list[dict]], max_tokens: int = 2048) -> list[LayerInput]:
    """Run each calibration chat through the processor, embeddings and vision tower."""
    from qvl.runtime.fetch import FetchPolicy
    from qvl.runtime.embed import embed_prompt
    from qvl.runtime.processor import ImageProcessor, ImageProcessorConfig
    from qvl.runtime.prompt import build_request
    from qvl.runtime.tokenizer import Tokenizer
    from qvl.runtime.video_processor import VideoProcessor, VideoProcessorConfig

    cfg = lw.cfg
    tok = Tokenizer.from_dir(lw.path)
    proc = ImageProcessor(ImageProcessorConfig.from_dir(lw.path))
    vproc = VideoProcessor(VideoProcessorConfig.from_dir(lw.path))
    policy = FetchPolicy.from_env(None)
    merge = cfg.vision.spatial_merge_size
    lw.load("embed_tokens")
    lw.load("visual")
    out, skipped = [], 0
    for i, msgs in enumerate(samples):
        req = build_request(msgs, tok, proc, merge, video_processor=vproc, policy=policy)
        if len(req.ids) > max_tokens:
            skipped += 1
            continue
        ids = torch.tensor([req.ids])
        x, _ = embed_prompt(lw.model, lw.model.visual, ids, [req], cfg.image_token_id, cfg.video_token_id,
                            lw.device)
        positions, _ = rope_index(ids, req.vision_grids, (cfg.image_token_id, cfg.video_token_id), merge,
                                  seconds=req.vision_seconds, tokens_per_second=cfg.tokens_per_second)
        out.append(LayerInput(x.float(), positions.to(lw.device)))
        if (i + 1) % 16 == 0:
            log.info("calibration inputs: %d/%d samples", i + 1, len(samples))
    lw.unload("embed_tokens")
    lw.unload("visual")
    if skipped:
        log.warning("skipped %d calibration samples longer than %d tokens", skipped, max_tokens)
    if not out:
        raise ValueError("no calibration sample fits in max_tokens")
    return out


def _run(layer, inputs: list[LayerInput], rope) -> list[torch.Tensor]:
    outs = []
    for inp in inputs:
        cos, sin = rope(inp.positions, torch.float32)
        outs.append(layer(inp.x, cos, sin, None, None, inp.x.shape[1]))
    return outs


class _Stop(Exception):
    pass


def _capture(layer, names, inputs, rope, on_input, stop: bool = True) -> None:
    """Run the layer over the inputs, calling ``on_input(name, x)`` with each named linear's
    input; with ``stop`` a pass ends as soon as every named linear has been seen."""
    seen = set()

    def hook(name):
        def f(_mod, args):
            on_input(name, args[0])
            seen.add(name)
            if stop and len(seen) == len(names):
                raise _Stop
        return f

    handles = [layer.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for inp in inputs:
            seen.clear()
            cos, sin = rope(inp.positions, torch.float32)
            try:
                layer(inp.x, cos, sin, None, None, inp.x.shape[1])
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()


def _set(linear: nn.Linear, qw: QuantizedWeight) -> None:
    linear.weight.data = qw.dequantize(torch.float32).to(linear.weight.device)


def _gptq_layer(layer, inputs, rope, spec: QuantSpec) -> dict[str, QuantizedWeight]:
    out = {}
    steps = SEQUENCE if spec.true_sequential else (LINEARS,)
    for names in steps:
        hs = {n: Hessian(layer.get_submodule(n).in_features, inputs[0].x.device) for n in names}
        _capture(layer, names, inputs, rope, lambda n, x: hs[n].add(x))
        for n in names:
            lin = layer.get_submodule(n)
            qw, _ = gptq(lin.weight.data, hs[n].h, spec.grid, spec.damp_percent, spec.desc_act)
            _set(lin, qw)
            out[n] = qw
        del hs
    return out


def _subsample(x: torch.Tensor, n: int) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] <= n:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, n, device=x.device).long()]


def _awq_layer(layer, inputs, rope, spec: QuantSpec, pre: dict[str, torch.Tensor]) -> dict[str, QuantizedWeight]:
    """``pre`` receives each linear's float weight as rescaled, before clipping and rounding."""
    grid = spec.grid
    feats: dict[str, list[torch.Tensor]] = {n: [] for n in ("self_attn.q_proj", "self_attn.o_proj",
                                                            "mlp.gate_proj", "mlp.down_proj")}
    _capture(layer, tuple(feats), inputs, rope, lambda n, x: feats[n].append(x[0]), stop=False)
    attn, mlp = layer.self_attn, layer.mlp
    x_attn = torch.cat(feats["self_attn.q_proj"])  # [tokens, D]: input_layernorm's output
    x_o, x_mlp, x_down = (torch.cat(feats[n]) for n in ("self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"))
    # the attention search runs whole samples (causal attention), as many as fit SEARCH_TOKENS
    sub, total = [], 0
    for inp, xn in zip(inputs, feats["self_attn.q_proj"]):
        if sub and total + xn.shape[0] > SEARCH_TOKENS:
            break
        sub.append((xn[None], rope(inp.positions, torch.float32)))
        total += xn.shape[0]
    del feats

    def run_attn():
        return torch.cat([attn(xn, cos, sin, None, None, xn.shape[1])[0] for xn, (cos, sin) in sub])

    stats = {}
    s, stats["qkv"] = awq.search_scale([attn.q_proj, attn.k_proj, attn.v_proj], x_attn, run_attn, grid)
    awq.apply_scale(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], s)
    x_attn = x_attn / s
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:  # v -> o only without GQA
        xs = _subsample(x_o, SEARCH_TOKENS)
        s, stats["o"] = awq.search_scale([attn.o_proj], x_o, lambda: attn.o_proj(xs), grid)
        awq.apply_scale(attn.v_proj, [attn.o_proj], s)
        x_o = x_o / s
    xs = _subsample(x_mlp, SEARCH_TOKENS)
    s, stats["gate_up"] = awq.search_scale([mlp.gate_proj, mlp.up_proj], x_mlp, lambda: mlp(xs), grid)
    awq.apply_scale(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], s)
    x_mlp = x_mlp / s
    xs = _subsample(x_down, SEARCH_TOKENS)
    s, stats["down"] = awq.search_scale([mlp.down_proj], x_down, lambda: mlp.down_proj(xs), grid)
    awq.apply_scale(mlp.up_proj, [mlp.down_proj], s)
    x_down = x_down / s
    log.debug("AWQ scale search relative errors: %s", stats)

    feat_of = {"self_attn.v_proj": x_attn, "self_attn.o_proj": x_o, "mlp.gate_proj": x_mlp,
               "mlp.up_proj": x_mlp, "mlp.down_proj": x_down}
    out = {}
    for n in LINEARS:
        lin = layer.get_submodule(n)
        pre[n] = lin.weight.data.clone()
        if n in feat_of:  # q/k unclipped: softmax amplifies their errors
            awq.apply_clip(lin, awq.search_clip(lin.weight.data, feat_of[n], grid), grid)
        out[n] = rtn(lin.weight.data, grid)
        _set(lin, out[n])
    return out


@torch.no_grad()
def quantize_layer(layer, inputs: list[LayerInput], rope, spec: QuantSpec
                   ) -> tuple[dict[str, QuantizedWeight], dict, list[torch.Tensor]]:
    """Quantize ``layer`` in place (its linears end up holding their dequantized weights).

    Returns the quantized weights by linear name, the layer's error report and its outputs on
    ``inputs`` (the next layer's inputs: true-sequential). The report: ``output_rel_mse``
    (squared error of the layer's output over the float layer's, both fed ``inputs``) and, per
    linear, the same ratio for its own output on its inputs in the quantized layer.
    """
    pre = {n: layer.get_submodule(n).weight.data.clone() for n in LINEARS}
    reference = _run(layer, inputs, rope)
    if spec.method == "gptq":
        qws = _gptq_layer(layer, inputs, rope, spec)
    elif spec.method == "awq":
        qws = _awq_layer(layer, inputs, rope, spec, pre)
    else:
        qws = {}
        for n in LINEARS:
            qws[n] = rtn(layer.get_submodule(n).weight.data, spec.grid)
            _set(layer.get_submodule(n), qws[n])
    # each linear against its float weight on the same input (AWQ: the rescaled weight, whose
    # input the rescaled norm / previous linear already divides, so the float product is kept)
    err = {n: [0.0, 0.0] for n in LINEARS}

    def measure(n, x):
        ref = x @ pre[n].t()
        err[n][0] += float((x @ layer.get_submodule(n).weight.data.t() - ref).pow(2).sum())
        err[n][1] += float(ref.pow(2).sum())

    _capture(layer, LINEARS, inputs, rope, measure, stop=False)
    outs = _run(layer, inputs, rope)
    num = sum(float((o - r).pow(2).sum()) for o, r in zip(outs, reference))
    den = sum(float(r.pow(2).sum()) for r in reference)
    report = {"output_rel_mse": num / max(den, 1e-30),
              "linears": {n: e[0] / max(e[1], 1e-30) for n, e in err.items()}}
    return qws, report, outs
