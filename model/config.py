"""Typed configs for Qwen2-VL and Qwen2.5-VL, built from a checkpoint's config.json.

Two layouts exist in the wild: the official releases put the text fields at top level with
``rope_scaling.mrope_section``; transformers 5 nests them under ``text_config`` with
``rope_parameters``. ``from_hf`` reads both, ignores unknown keys and names what is missing.

``model_type`` picks how ``vision_config`` reads. Its ``hidden_size`` means different things:
Qwen2-VL's is the merger's output (the text width) and its tower width is ``embed_dim``;
Qwen2.5-VL's is the tower width, with the output in ``out_hidden_size``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    pass


def _need(d: dict, key: str, where: str):
    if key not in d or d[key] is None:
        raise ConfigError(f"config.json: missing required key {where}{key!r}")
    return d[key]


MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    embed_dim: int
    num_heads: int
    hidden_size: int  # output width of the merger == text hidden size
    mlp_ratio: float = 4.0
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0
    # "qwen2_vl": LayerNorm, quick_gelu MLP, full attention per frame. "qwen2_5_vl": RMSNorm, gated
    # SiLU MLP of ``intermediate_size``, window attention except in ``fullatt_block_indexes``
    variant: str = "qwen2_vl"
    intermediate_size: int = 0
    window_size: int = 0  # pixels per window side
    fullatt_block_indexes: tuple[int, ...] = ()
    tokens_per_second: float = 0.0  # M-RoPE temporal ids per second of video

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def windowed(self) -> bool:
        return self.variant == "qwen2_5_vl"

    @property
    def window_units(self) -> int:
        """Window side in merged tokens (merge x merge patch blocks)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @classmethod
    def from_hf(cls, d: dict, model_type: str = "qwen2_vl") -> "VisionConfig":
        w = "vision_config."
        if model_type == "qwen2_5_vl":
            kw = dict(
                depth=_need(d, "depth", w),
                embed_dim=_need(d, "hidden_size", w),
                num_heads=_need(d, "num_heads", w),
                hidden_size=_need(d, "out_hidden_size", w),
                intermediate_size=int(_need(d, "intermediate_size", w)),
                window_size=int(_need(d, "window_size", w)),
                fullatt_block_indexes=tuple(int(i) for i in _need(d, "fullatt_block_indexes", w)),
                # transformers' class default; every release sets it (2)
                tokens_per_second=float(d.get("tokens_per_second", 4)),
                hidden_act="silu",
                variant="qwen2_5_vl",
            )
            fields = ("in_channels", "patch_size", "temporal_patch_size", "spatial_merge_size", "hidden_act")
        else:
            kw = dict(
                depth=_need(d, "depth", w),
                embed_dim=_need(d, "embed_dim", w),
                num_heads=_need(d, "num_heads", w),
                hidden_size=_need(d, "hidden_size", w),
            )
            fields = ("mlp_ratio", "in_channels", "patch_size", "temporal_patch_size", "spatial_merge_size",
                      "hidden_act")
        for f in fields:
            if d.get(f) is not None:
                kw[f] = d[f]
        # older configs spell it in_chans
        if "in_chans" in d and "in_channels" not in d:
            kw["in_channels"] = d["in_chans"]
        rope = d.get("rope_parameters") or {}
        if rope.get("rope_theta") is not None:
            kw["rope_theta"] = rope["rope_theta"]
        cfg = cls(**kw)
        if cfg.embed_dim % cfg.num_heads or cfg.head_dim % 4:
            raise ConfigError(f"vision embed_dim {cfg.embed_dim} / num_heads {cfg.num_heads} "
                              "must give a head_dim divisible by 4 (2D rotary)")
        want = "silu" if cfg.windowed else "quick_gelu"
        if cfg.hidden_act != want:
            raise ConfigError(f"vision hidden_act {cfg.hidden_act!r} unsupported ({model_type} uses {want})")
        if cfg.windowed:
            if cfg.window_units < 1 or cfg.window_size % (cfg.patch_size * cfg.spatial_merge_size):
                raise ConfigError(f"vision window_size {cfg.window_size} must be a positive multiple of "
                                  f"patch_size * spatial_merge_size = {cfg.patch_size * cfg.spatial_merge_size}")
            bad = [i for i in cfg.fullatt_block_indexes if not 0 <= i < cfg.depth]
            if bad:
                raise ConfigError(f"vision fullatt_block_indexes {bad} outside the {cfg.depth} blocks")
            if cfg.tokens_per_second <= 0:
                raise ConfigError(f"vision tokens_per_second must be positive, got {cfg.tokens_per_second}")
        return cfg


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    mrope_section: tuple[int, ...]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, d: dict, where: str = "") -> "TextConfig":
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        mrope = rope.get("mrope_section")
        if mrope is None:
            raise ConfigError(f"config.json: missing {where}rope_scaling.mrope_section "
                              "(or rope_parameters.mrope_section); not a Qwen2-VL config?")
        theta = rope.get("rope_theta", d.get("rope_theta", 1_000_000.0))
        kw = dict(
            vocab_size=_need(d, "vocab_size", where),
            hidden_size=_need(d, "hidden_size", where),
            intermediate_size=_need(d, "intermediate_size", where),
            num_hidden_layers=_need(d, "num_hidden_layers", where),
            num_attention_heads=_need(d, "num_attention_heads", where),
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            mrope_section=tuple(int(x) for x in mrope),
            rope_theta=float(theta),
        )
        for f in ("rms_norm_eps", "max_position_embeddings", "hidden_act"):
            if d.get(f) is not None:
                kw[f] = d[f]
        cfg = cls(**kw)
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ConfigError("hidden_size must be divisible by num_attention_heads")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ConfigError("num_attention_heads must be divisible by num_key_value_heads")
        if 2 * sum(cfg.mrope_section) != cfg.head_dim:
            raise ConfigError(f"mrope_section {list(cfg.mrope_section)} must sum to head_dim/2 = "
                              f"{cfg.head_dim // 2}")
        if cfg.hidden_act != "silu":
            raise ConfigError(f"text hidden_act {cfg.hidden_act!r} unsupported (Qwen2 uses silu)")
        if d.get("use_sliding_window"):
            raise ConfigError("use_sliding_window=true is not supported (no Qwen2-VL release uses it)")
        return cfg


@dataclass(frozen=True)
class Qwen2VLConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    tie_word_embeddings: bool = False
    quantization: dict | None = None  # raw quantization_config, interpreted by the loader
    model_type: str = "qwen2_vl"

    @property
    def tokens_per_second(self) -> float | None:
        """M-RoPE temporal ids per second of video; None where time is not scaled (Qwen2-VL)."""
        return self.vision.tokens_per_second if self.model_type == "qwen2_5_vl" else None

    @classmethod
    def from_hf(cls, d: dict) -> "Qwen2VLConfig":
        mt = d.get("model_type") or "qwen2_vl"  # configs older than the field are Qwen2-VL
        if mt not in MODEL_TYPES:
            raise ConfigError(f"config.json model_type is {mt!r}, expected one of {list(MODEL_TYPES)}")
        if "text_config" in d and isinstance(d["text_config"], dict) and "hidden_size" in d["text_config"]:
            text_d, where = dict(d["text_config"]), "text_config."
            # rope settings may sit on either level in transitional configs
            for k in ("rope_scaling", "rope_parameters", "rope_theta"):
                if k not in text_d and k in d:
                    text_d[k] = d[k]
        else:
            text_d, where = d, ""
        text = TextConfig.from_hf(text_d, where)
        vision = VisionConfig.from_hf(_need(d, "vision_config", ""), mt)
        if vision.hidden_size != text.hidden_size:
            key = "out_hidden_size" if vision.windowed else "hidden_size"
            raise ConfigError(f"vision_config.{key} {vision.hidden_size} != text hidden_size "
                              f"{text.hidden_size}")
        tie = d.get("tie_word_embeddings")
        if tie is None:
            tie = text_d.get("tie_word_embeddings", False)
        ids = {}
        for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            ids[k] = int(_need(d, k, ""))
        return cls(text=text, vision=vision, tie_word_embeddings=bool(tie),
                   quantization=d.get("quantization_config"), model_type=mt, **ids)

    def replace(self, **kw) -> "Qwen2VLConfig":
        return dataclasses.replace(self, **kw)


def read_json_object(file: Path) -> dict:
    """A checkpoint's JSON file as a dict; a ConfigError naming the file when it is not one."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
        raise ConfigError(f"{file} is not valid JSON: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read {file}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(data), "a number")
        raise ConfigError(f"{file} is not a JSON object: it holds {kind}")
    return data
