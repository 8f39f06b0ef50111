"""``quantization_config`` of config.json, as AutoAWQ / AutoGPTQ / optimum / GPTQModel write it."""

from __future__ import annotations

from dataclasses import dataclass

from qvl.model.config import ConfigError


@dataclass(frozen=True)
class QuantConfig:
    method: str  # "awq" (gemm) or "gptq" (v1)
    bits: int
    group_size: int  # -1: one group spans the whole input dim
    sym: bool | None = None  # informational: the zeros in the file are what counts
    desc_act: bool = False  # informational: g_idx in the file is what counts
    modules_to_not_convert: tuple[str, ...] = ()
    modules_in_block_to_quantize: tuple[str, ...] | None = None

    @classmethod
    def from_hf(cls, d: dict) -> "QuantConfig":
        w = "quantization_config."
        method = str(d.get("quant_method", "")).lower()
        bits = d.get("bits", d.get("w_bit"))
        group = d.get("group_size", d.get("q_group_size"))
        if bits is None or group is None:
            raise ConfigError(f"config.json: {w} needs 'bits' and 'group_size'")
        bits, group = int(bits), int(group)
        if group != -1 and group <= 0:
            raise ConfigError(f"config.json: {w}group_size must be positive or -1, got {group}")
        skip = tuple(d.get("modules_to_not_convert") or ())
        if method == "awq":
            version = str(d.get("version", "gemm")).lower()
            if version != "gemm":
                raise ConfigError(f"AWQ version {version!r} is not supported (only 'gemm', Qwen's releases)")
            if bits != 4:
                raise ConfigError(f"AWQ gemm is 4-bit, config says bits={bits}")
            if d.get("zero_point") is False:
                raise ConfigError("AWQ with zero_point=false is not supported")
            return cls("awq", bits, group, sym=False, modules_to_not_convert=skip)
        if method == "gptq":
            fmt = str(d.get("checkpoint_format") or d.get("format") or "gptq").lower()
            if fmt != "gptq":
                raise ConfigError(f"GPTQ checkpoint_format {fmt!r} is not supported (only 'gptq', AutoGPTQ v1)")
            if bits not in (4, 8):
                raise ConfigError(f"GPTQ bits={bits} is not supported (4 and 8 are)")
            if d.get("dynamic"):
                raise ConfigError("GPTQModel per-module 'dynamic' overrides are not supported")
            blocks = d.get("modules_in_block_to_quantize")
            inside = None if not blocks else tuple(n for grp in blocks for n in
                                                   ([grp] if isinstance(grp, str) else grp))
            return cls("gptq", bits, group, sym=d.get("sym"), desc_act=bool(d.get("desc_act", False)),
                       modules_to_not_convert=skip, modules_in_block_to_quantize=inside)
        raise ConfigError(f"config.json: {w}quant_method {d.get('quant_method')!r} is not supported "
                          "(awq and gptq are)")

    def group_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def converts(self, *names: str) -> bool:
        """Whether the linear known under ``names`` (e.g. ``model.layers.0.mlp.up_proj``) is
        quantized. ``modules_to_not_convert`` entries match as substrings, as in AutoAWQ and
        transformers 4, so Qwen's ``"visual"`` keeps the whole tower in float."""
        if any(skip in n for skip in self.modules_to_not_convert for n in names):
            return False
        if self.modules_in_block_to_quantize is None:
            return True
        return any(n.endswith("." + m) for m in self.modules_in_block_to_quantize for n in names)
