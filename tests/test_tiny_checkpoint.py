"""The tiny checkpoints must look like real Qwen2-VL releases to transformers."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from qvl.scripts.tiny import SPECIAL_TOKENS, build_tokenizer, main, write_tiny_checkpoint

transformers = pytest.importorskip("transformers")

FIXTURES = ["tiny_ckpt", "tiny_ckpt_tied", "tiny_ckpt_random"]


def _tokenizer_ids(path):
    tok = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    ids = dict(tok["model"]["vocab"])
    ids.update({t["content"]: t["id"] for t in tok["added_tokens"]})
    return ids


@pytest.mark.parametrize("name", FIXTURES)
def test_transformers_loads_strictly(request, name):
    path = request.getfixturevalue(name)
    model, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    tied = model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert tied == (name == "tiny_ckpt_tied")


@pytest.mark.parametrize("name", FIXTURES)
def test_config_round_trips(request, name, tmp_path):
    path = request.getfixturevalue(name)
    cfg = transformers.Qwen2VLConfig.from_pretrained(path)
    cfg.save_pretrained(tmp_path)
    again = transformers.Qwen2VLConfig.from_pretrained(tmp_path)
    assert again.to_dict() == cfg.to_dict()

    text, vision = cfg.text_config, cfg.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        64, 2, 4, 2)
    assert (vision.depth, vision.embed_dim, vision.num_heads, vision.hidden_size) == (2, 32, 4, 64)
    mrope = [4, 2, 2] if name == "tiny_ckpt_tied" else [2, 3, 3]
    assert text.rope_parameters["mrope_section"] == mrope
    assert text.rope_parameters["rope_theta"] == 1e6

    ids = _tokenizer_ids(path)
    assert text.vocab_size > max(ids.values())
    assert cfg.image_token_id == ids["<|image_pad|>"]
    assert cfg.video_token_id == ids["<|video_pad|>"]
    assert cfg.vision_start_token_id == ids["<|vision_start|>"]
    assert cfg.vision_end_token_id == ids["<|vision_end|>"]
    assert text.bos_token_id == ids["<|endoftext|>"]
    assert text.eos_token_id == ids["<|im_end|>"]
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]


def test_flat_and_nested_layouts_describe_the_same_model(tmp_path):
    flat = transformers.Qwen2VLConfig.from_pretrained(write_tiny_checkpoint(tmp_path / "flat")).to_dict()
    nested = transformers.Qwen2VLConfig.from_pretrained(
        write_tiny_checkpoint(tmp_path / "nested", layout="nested")).to_dict()
    for cfg in (flat, nested):
        cfg["text_config"]["rope_parameters"].pop("type", None)  # legacy "mrope" marker kept from flat
        for key in ("in_chans", "spatial_patch_size"):  # legacy vision keys only the flat layout has
            cfg["vision_config"].pop(key, None)
        cfg.pop("vision_token_id", None)
    assert flat == nested


def test_special_ids_come_from_the_tokenizer(tiny_ckpt, tiny_ckpt_tied):
    end, middle = _tokenizer_ids(tiny_ckpt), _tokenizer_ids(tiny_ckpt_tied)
    assert all(end[t] != middle[t] for t in SPECIAL_TOKENS)
    # Default variant: specials are the last ids, in Qwen's order.
    n_end = max(end.values()) + 1
    assert [end[t] for t in SPECIAL_TOKENS] == list(range(n_end - len(SPECIAL_TOKENS), n_end))
    assert max(middle.values()) > max(middle[t] for t in SPECIAL_TOKENS)
    assert min(middle[t] for t in SPECIAL_TOKENS) > min(v for k, v in middle.items() if k.startswith("<tool"))

    cfg = json.loads((tiny_ckpt_tied / "config.json").read_text())
    assert cfg["image_token_id"] == middle["<|image_pad|>"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_ckpt_tied)
    assert hf_tok.convert_tokens_to_ids("<|image_pad|>") == middle["<|image_pad|>"]
    assert hf_tok.eos_token == "<|im_end|>" and hf_tok.pad_token == "<|endoftext|>"


def test_tokenizer_build_is_deterministic(tmp_path):
    build_tokenizer(tmp_path / "a")
    build_tokenizer(tmp_path / "b")
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()


def test_random_weights_use_official_names(tiny_ckpt_random):
    with safe_open(tiny_ckpt_random / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        norm = f.get_tensor("model.norm.weight")
        patch = f.get_tensor("visual.patch_embed.proj.weight")
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" in keys
    assert "visual.merger.mlp.2.bias" in keys and "visual.blocks.1.attn.qkv.bias" in keys
    assert not any(k.startswith("model.language_model") or k.startswith("model.visual") for k in keys)
    assert tuple(patch.shape) == (32, 3, 2, 14, 14)
    assert 0.9 < norm.mean() < 1.1 and norm.std() > 0


def test_transformers_weights_are_perturbed(tiny_ckpt):
    with safe_open(tiny_ckpt / "model.safetensors", "pt") as f:
        for key in f.keys():
            if key.endswith("norm.weight") or key.endswith(".bias"):
                t = f.get_tensor(key)
                assert not (torch.all(t == 1) or torch.all(t == 0)), key


def test_cli_random_path_needs_no_transformers(tmp_path):
    code = ("import sys; from qvl.scripts.tiny import main; main([sys.argv[1], '--layout', 'nested', "
            "'--tie', '--dtype', 'bfloat16']); assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, capture_output=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and "text_config" in cfg
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16


@pytest.mark.parametrize("where", ["chat_template.json", "chat_template.jinja", "tokenizer_config.json"])
def test_chat_template_file_forms(tmp_path, where):
    main([str(tmp_path), "--chat-template-file", where])
    tok_cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert ("chat_template" in tok_cfg) == (where == "tokenizer_config.json")
    assert (tmp_path / where).exists()
    others = {"chat_template.json", "chat_template.jinja"} - {where}
    assert not any((tmp_path / o).exists() for o in others)
