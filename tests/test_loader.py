"""Config parsing and checkpoint loading: layouts, key-name schemes, shards, clear errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2VLForConditionalGeneration

from qvl.model.config import ConfigError, Qwen2VLConfig
from qvl.runtime.loader import load_model
from qvl.runtime.weights import CheckpointError


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_flat_and_nested_layouts_parse_alike(tiny_ckpt):
    flat = json.loads((tiny_ckpt / "config.json").read_text())
    assert "text_config" not in flat and "rope_scaling" in flat
    hf = Qwen2VLForConditionalGeneration.from_pretrained(tiny_ckpt).config
    nested = hf.to_dict()  # what transformers 5 writes
    assert "text_config" in nested
    a, b = Qwen2VLConfig.from_hf(flat), Qwen2VLConfig.from_hf(nested)
    assert a == b
    assert a.text.mrope_section == (2, 3, 3)
    assert a.image_token_id == hf.image_token_id


def test_unknown_keys_ignored_missing_keys_named(tiny_ckpt):
    raw = json.loads((tiny_ckpt / "config.json").read_text())
    Qwen2VLConfig.from_hf({**raw, "some_future_key": 1})
    for key, match in [("num_hidden_layers", "num_hidden_layers"), ("vision_config", "vision_config"),
                       ("image_token_id", "image_token_id"), ("rope_scaling", "mrope_section")]:
        broken = {k: v for k, v in raw.items() if k != key}
        with pytest.raises(ConfigError, match=match):
            Qwen2VLConfig.from_hf(broken)
    with pytest.raises(ConfigError, match="must sum"):
        Qwen2VLConfig.from_hf({**raw, "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 2]}})
    with pytest.raises(ConfigError, match="qwen2_vl"):
        Qwen2VLConfig.from_hf({**raw, "model_type": "llama"})


def _logits(model_or_hf, ids, ours: bool):
    with torch.no_grad():
        if not ours:
            return model_or_hf(input_ids=ids).logits
        m = model_or_hf
        m.setup_caches(1, 64, torch.float32)
        pos = torch.arange(ids.shape[1]).expand(3, 1, -1)
        return m.logits(m(m.embed_tokens(ids), pos, torch.arange(ids.shape[1]), None, ids.shape[1]))


def test_original_key_names(tiny_ckpt_random):
    keys = load_file(tiny_ckpt_random / "model.safetensors").keys()
    assert any(k.startswith("visual.") for k in keys) and any(k.startswith("model.layers.") for k in keys)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    hf = Qwen2VLForConditionalGeneration.from_pretrained(tiny_ckpt_random).eval()
    torch.testing.assert_close(_logits(load_model(tiny_ckpt_random), ids, True), _logits(hf, ids, False),
                               atol=1e-4, rtol=0)


def test_transformers5_key_names(tiny_ckpt, tmp_path):
    # GPTQModel and other transformers-5 tools write `model.language_model.*` / `model.visual.*`
    d = _copy(tiny_ckpt, tmp_path / "v5names")

    def rename(sd):
        for k in list(sd):
            if k.startswith("visual."):
                sd["model." + k] = sd.pop(k)
            elif k.startswith("model."):
                sd["model.language_model." + k[6:]] = sd.pop(k)

    _rewrite(d, rename)
    assert any(k.startswith("model.language_model.") for k in load_file(d / "model.safetensors"))
    ids = torch.tensor([[5, 6, 7, 8]])
    hf = Qwen2VLForConditionalGeneration.from_pretrained(tiny_ckpt).eval()
    torch.testing.assert_close(_logits(load_model(d), ids, True), _logits(hf, ids, False), atol=1e-4, rtol=0)
    vis = load_model(d).visual.patch_embed.weight
    torch.testing.assert_close(vis, load_model(tiny_ckpt).visual.patch_embed.weight, atol=0, rtol=0)


def test_sharded_index(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path / "sharded")
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(sd)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: sd[k] for k in keys}, d / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(_logits(load_model(d), ids, True), _logits(load_model(tiny_ckpt), ids, True))


def _rewrite(d, fn):
    sd = load_file(d / "model.safetensors")
    fn(sd)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path / "missing")
    _rewrite(d, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"lacks tensors \['layers.1.mlp.up_proj.weight'\]"):
        load_model(d)


def test_misshaped_tensor_is_named(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path / "shape")
    key = "model.layers.0.self_attn.k_proj.weight"
    _rewrite(d, lambda sd: sd.__setitem__(key, sd[key][:-1]))
    with pytest.raises(CheckpointError, match=r"k_proj.weight.*shape \[31, 64\].*\[32, 64\]"):
        load_model(d)


def test_unexpected_tensor_is_named(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path / "extra")
    _rewrite(d, lambda sd: sd.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="does not use.*extra.weight"):
        load_model(d)


def test_truncated_and_pickle_files(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path / "trunc")
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(d)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle formats are not loaded"):
        load_model(d)


def test_bad_dir_and_dtype(tiny_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope")
    with pytest.raises(ValueError, match="dtype"):
        load_model(tiny_ckpt, dtype="int3")


def test_weights_are_mapped_not_copied(tiny_ckpt):
    # fp32 checkpoint into an fp32 model: parameters are views of the file mapping
    m = load_model(tiny_ckpt)
    w = m.layers[0].mlp.down_proj.weight
    assert not w.untyped_storage().resizable()  # torch.frombuffer storage, not an allocation


def test_bfloat16_load_close_to_transformers(tiny_ckpt):
    """bf16 logits vs transformers bf16: both round differently inside matmuls; the tolerance
    is set by bf16's 8-bit mantissa (~0.4% relative per op over a 2-layer model)."""
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    hf = Qwen2VLForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.bfloat16).eval()
    ours = load_model(tiny_ckpt, dtype="bfloat16")
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.float()
        ours.setup_caches(1, 64, torch.bfloat16)
        pos = torch.arange(ids.shape[1]).expand(3, 1, -1)
        got = ours.logits(ours(ours.embed_tokens(ids), pos, torch.arange(ids.shape[1]), None, ids.shape[1])).float()
    assert got.dtype == torch.float32 and ours.lm_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, atol=0.05 * ref.abs().max().item(), rtol=0)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75
