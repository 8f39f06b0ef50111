"""Build tiny Qwen2-VL and Qwen2.5-VL checkpoints for tests and demos.

The checkpoints mimic the official Qwen2-VL-Instruct / Qwen2.5-VL-Instruct releases file by file
(config layouts, key names, tokenizer files, chat template) at toy sizes, so code paths that read
real checkpoints are exercised without downloading anything. The default ``weights="random"`` path needs only torch,
safetensors and tokenizers; ``weights="transformers"`` imports transformers to produce weights
that a reference model can be compared against.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib

logger = logging.getLogger(__name__)

# Verbatim from Qwen/Qwen2-VL-7B-Instruct's chat_template.json; tests compare against transformers
# rendering this same text, so any drift here would go unnoticed by them.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2-VL's special tokens, in the order the official tokenizer assigns them ids.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Ordinary (non-special) added tokens, as Qwen2.5 ships for tool calls and FIM; used only by the
# specials_in_middle variant.
_EXTRA_ADDED_TOKENS = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                       "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")

# Same regex as Qwen2's tokenizer.json; transformers' Qwen2Tokenizer rebuilds its pipeline with it,
# so using anything else would make our files and transformers disagree.
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Non-ASCII text is included so that some merges cover partial UTF-8 sequences, which is what
# makes streaming detokenization non-trivial.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Describe this image in detail. What is shown in the picture? There is a dog and a cat.
The image shows a red apple on a wooden table next to a cup of coffee.
You are a helpful assistant. Please answer the question about the video.
How many people are in the photo? Two people are walking along the beach at sunset.
The weather is sunny and the sky is blue with a few white clouds over the mountains.
Count the objects: one, two, three, four, five, six, seven, eight, nine, ten.
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 2024 3.14 and symbols ( ) [ ] { } < > : ; , . ! ? - _ / \\
Café, naïve, résumé, déjà vu, crème brûlée. 中文 测试 图片 视频 你好 世界. 日本語 テスト.
Emoji 😀 🐶 🍎 ☀️ and accents é è ê à ç ü ö ß ñ.
"""


def _train_bpe(vocab_size: int, corpus: str = _CORPUS):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(dropout=None, unk_token=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    lines = corpus.splitlines(keepends=True)
    tok.train_from_iterator(lines * 4, trainer=trainer)
    return tok


def build_tokenizer(out_dir, *, specials_in_middle: bool = False, corpus: str | None = None,
                    vocab_size: int = 400) -> dict[str, int]:
    """Write tokenizer.json and tokenizer_config.json (without a chat template) into ``out_dir``.

    ``corpus`` (default: a small general text) is what the byte-level BPE is trained on.
    Returns ``{special_token: id}`` for Qwen's special tokens.
    """
    from tokenizers import AddedToken

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_bpe(vocab_size, _CORPUS if corpus is None else corpus)
    # Splitting the extras around the specials both moves the special ids and keeps them off the
    # end of the vocab, so code that hard-codes either assumption fails against this variant.
    half = len(_EXTRA_ADDED_TOKENS) // 2
    before, after = (_EXTRA_ADDED_TOKENS[:half], _EXTRA_ADDED_TOKENS[half:]) if specials_in_middle else ((), ())
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in before])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in after])
    tok.save(str(out / "tokenizer.json"))

    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    added = {t: ids[t] for t in SPECIAL_TOKENS}
    if specials_in_middle:
        added.update({t: tok.token_to_id(t) for t in _EXTRA_ADDED_TOKENS})
    tokenizer_config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": t in ids}
            for t, i in sorted(added.items(), key=lambda kv: kv[1])
        },
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "processor_class": "Qwen2VLProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    return ids


def _write_json(path: pathlib.Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# Toy dimensions. head_dim = 64 / 4 = 16, so mrope_section (halves of the rotary dims) sums to 8.
TEXT_DIMS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
                 max_position_embeddings=4096)
VISION_DIMS = dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=4, patch_size=14,
                   temporal_patch_size=2, spatial_merge_size=2, in_chans=3)


# Qwen2.5-VL's tower at toy size. A window of 56 px is 2x2 merged tokens, smaller than any test
# picture, so windows matter; block 1 attends over whole frames between windowed blocks 0, 2, 3.
# intermediate_size is not a multiple of the width, as 3420 is not of 1280 in the releases.
VISION_DIMS_25 = dict(depth=4, embed_dim=32, num_heads=4, intermediate_size=48, patch_size=14,
                      temporal_patch_size=2, spatial_merge_size=2, in_chans=3, window_size=56,
                      fullatt_block_indexes=[1], tokens_per_second=2)
MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
_ARCH = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
_PROCESSOR = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}


def _vision_config(v: dict, text_hidden: int, model_type: str, layout: str) -> dict:
    """vision_config as the official release (``flat``) or transformers 5 (``nested``) writes it."""
    flat = layout == "flat"
    chans = {"in_chans": v["in_chans"]} if flat else {"in_channels": v["in_chans"]}
    if model_type == "qwen2_vl":
        out = {"depth": v["depth"], "embed_dim": v["embed_dim"], "mlp_ratio": v["mlp_ratio"],
               "num_heads": v["num_heads"], **chans, "hidden_size": text_hidden}
        if not flat:
            out.update(hidden_act="quick_gelu", model_type="qwen2_vl_vision")
    else:
        # Mirrors Qwen/Qwen2.5-VL-3B-Instruct's vision_config: hidden_size is the tower's width
        out = {"depth": v["depth"], "hidden_act": "silu", "hidden_size": v["embed_dim"],
               "intermediate_size": v["intermediate_size"], "num_heads": v["num_heads"], **chans,
               "out_hidden_size": text_hidden, "window_size": v["window_size"],
               "fullatt_block_indexes": list(v["fullatt_block_indexes"]),
               "tokens_per_second": v["tokens_per_second"]}
        if not flat:
            out["model_type"] = "qwen2_5_vl_vision"
    out.update(patch_size=v["patch_size"], spatial_merge_size=v["spatial_merge_size"],
               temporal_patch_size=v["temporal_patch_size"])
    if flat:
        out["spatial_patch_size"] = v["patch_size"]
    else:
        out.update(initializer_range=0.02, rope_parameters={"rope_theta": 10000.0, "rope_type": "axial"})
    return out


def _padded_vocab(n: int) -> int:
    # Real Qwen configs pad the embedding past the tokenizer (151936 vs 151665); keep a gap here too.
    return -(-(n + 1) // 64) * 64


def make_config(ids: dict[str, int], vocab_size: int, *, tie_word_embeddings: bool = False,
                mrope_section=(2, 3, 3), layout: str = "flat", dtype: str = "float32",
                text_dims: dict | None = None, vision_dims: dict | None = None,
                model_type: str = "qwen2_vl") -> dict:
    """config.json contents in the official flat layout or the transformers-5 nested layout.

    ``text_dims`` / ``vision_dims`` override entries of ``TEXT_DIMS`` / ``VISION_DIMS``
    (``VISION_DIMS_25`` for ``model_type="qwen2_5_vl"``).
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {MODEL_TYPES}")
    t = {**TEXT_DIMS, **(text_dims or {})}
    v = {**(VISION_DIMS if model_type == "qwen2_vl" else VISION_DIMS_25), **(vision_dims or {})}
    if sum(mrope_section) * 2 != t["hidden_size"] // t["num_attention_heads"]:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2")
    token_ids = {
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
    }
    text = {
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "hidden_act": "silu",
        "hidden_size": t["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": t["intermediate_size"],
        "max_position_embeddings": t["max_position_embeddings"],
        "max_window_layers": t["num_hidden_layers"],
        "num_attention_heads": t["num_attention_heads"],
        "num_hidden_layers": t["num_hidden_layers"],
        "num_key_value_heads": t["num_key_value_heads"],
        "rms_norm_eps": t["rms_norm_eps"],
        "sliding_window": t["max_position_embeddings"],
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }
    if layout == "flat":
        # Mirrors Qwen/Qwen2-VL-*-Instruct/config.json (written by transformers 4.4x); the
        # Qwen2.5-VL releases have the same layout
        return {
            "architectures": [_ARCH[model_type]],
            **text,
            **token_ids,
            "model_type": model_type,
            "rope_theta": t["rope_theta"],
            "rope_scaling": {"type": "mrope", "mrope_section": list(mrope_section)},
            "tie_word_embeddings": tie_word_embeddings,
            "torch_dtype": dtype,
            "transformers_version": "4.41.2",
            "vision_config": _vision_config(v, t["hidden_size"], model_type, layout),
        }
    if layout == "nested":
        # Mirrors what transformers 5 save_pretrained writes for Qwen2VLConfig / Qwen2_5_VLConfig.
        return {
            "architectures": [_ARCH[model_type]],
            "dtype": dtype,
            **{k: token_ids[k] for k in ("image_token_id", "video_token_id",
                                         "vision_end_token_id", "vision_start_token_id")},
            "model_type": model_type,
            "text_config": {
                **text,
                "dtype": dtype,
                "layer_types": ["full_attention"] * t["num_hidden_layers"],
                "model_type": f"{model_type}_text",
                "pad_token_id": None,
                "sliding_window": None,
                "rope_parameters": {"mrope_section": list(mrope_section), "rope_theta": t["rope_theta"],
                                    "rope_type": "default"},
            },
            "tie_word_embeddings": tie_word_embeddings,
            "transformers_version": "5.24.0",
            "vision_config": _vision_config(v, t["hidden_size"], model_type, layout),
        }
    raise ValueError(f"unknown layout {layout!r}; expected 'flat' or 'nested'")


PREPROCESSOR_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}


def _random_state_dict(vocab_size: int, tie: bool, seed: int, model_type: str = "qwen2_vl") -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    t, v = TEXT_DIMS, (VISION_DIMS if model_type == "qwen2_vl" else VISION_DIMS_25)
    H, I = t["hidden_size"], t["intermediate_size"]
    hd = H // t["num_attention_heads"]
    kv = t["num_key_value_heads"] * hd
    E = v["embed_dim"]
    merged = E * v["spatial_merge_size"] ** 2
    sd = {}

    def w(name, *shape):
        sd[name] = torch.randn(*shape, generator=g) * 0.02

    def norm(name, dim, bias=False):
        sd[name + ".weight"] = 1.0 + torch.randn(dim, generator=g) * 0.02
        if bias:
            sd[name + ".bias"] = torch.randn(dim, generator=g) * 0.02

    def linear(name, out_f, in_f, bias=True):
        w(name + ".weight", out_f, in_f)
        if bias:
            w(name + ".bias", out_f)

    w("model.embed_tokens.weight", vocab_size, H)
    for i in range(t["num_hidden_layers"]):
        p = f"model.layers.{i}."
        linear(p + "self_attn.q_proj", H, H)
        linear(p + "self_attn.k_proj", kv, H)
        linear(p + "self_attn.v_proj", kv, H)
        linear(p + "self_attn.o_proj", H, H, bias=False)
        linear(p + "mlp.gate_proj", I, H, bias=False)
        linear(p + "mlp.up_proj", I, H, bias=False)
        linear(p + "mlp.down_proj", H, I, bias=False)
        norm(p + "input_layernorm", H)
        norm(p + "post_attention_layernorm", H)
    norm("model.norm", H)
    if not tie:
        w("lm_head.weight", vocab_size, H)
    w("visual.patch_embed.proj.weight", E, v["in_chans"], v["temporal_patch_size"], v["patch_size"],
      v["patch_size"])
    layer_norm = model_type == "qwen2_vl"  # Qwen2.5-VL's tower has RMSNorms: weights only
    for i in range(v["depth"]):
        p = f"visual.blocks.{i}."
        norm(p + "norm1", E, bias=layer_norm)
        norm(p + "norm2", E, bias=layer_norm)
        linear(p + "attn.qkv", 3 * E, E)
        linear(p + "attn.proj", E, E)
        if layer_norm:
            linear(p + "mlp.fc1", E * v["mlp_ratio"], E)
            linear(p + "mlp.fc2", E, E * v["mlp_ratio"])
        else:
            linear(p + "mlp.gate_proj", v["intermediate_size"], E)
            linear(p + "mlp.up_proj", v["intermediate_size"], E)
            linear(p + "mlp.down_proj", E, v["intermediate_size"])
    norm("visual.merger.ln_q", E, bias=layer_norm)
    linear("visual.merger.mlp.0", merged, merged)
    linear("visual.merger.mlp.2", H, merged)
    return sd


def _transformers_weights(out: pathlib.Path, flat_config: dict, seed: int, dtype: str) -> None:
    import torch
    import transformers

    prefix = "Qwen2VL" if flat_config["model_type"] == "qwen2_vl" else "Qwen2_5_VL"
    config_cls = getattr(transformers, f"{prefix}Config")
    config = config_cls(**{k: v for k, v in flat_config.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config).eval()
    # Fresh init leaves norms at exactly 1 and biases at 0, which would let a parity test pass even
    # with those tensors ignored; nudge every parameter so each one matters.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.02)
    model.to(getattr(torch, dtype)).save_pretrained(out)


def write_tiny_checkpoint(out_dir, *, tie_word_embeddings: bool = False, mrope_section=(2, 3, 3),
                          layout: str = "flat", weights: str = "random", seed: int = 0,
                          specials_in_middle: bool = False, dtype: str = "float32",
                          chat_template_file: str = "chat_template.json",
                          model_type: str = "qwen2_vl") -> pathlib.Path:
    """Write a complete tiny Qwen2-VL (or, with ``model_type="qwen2_5_vl"``, Qwen2.5-VL)
    checkpoint directory and return its path.

    ``weights="random"`` writes ``model.safetensors`` under the official (pre-transformers-5) key
    names without importing transformers; ``weights="transformers"`` saves a perturbed randomly
    initialised ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``
    (transformers-5 key names).
    ``chat_template_file`` picks where the template lives: ``chat_template.json``,
    ``chat_template.jinja`` or ``tokenizer_config.json``, the three forms real checkpoints use.
    """
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"unsupported dtype {dtype!r}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = build_tokenizer(out, specials_in_middle=specials_in_middle)
    n_tokens = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    n_tokens = len(n_tokens["model"]["vocab"]) + len(n_tokens["added_tokens"])
    vocab_size = _padded_vocab(n_tokens)
    config = make_config(ids, vocab_size, tie_word_embeddings=tie_word_embeddings,
                         mrope_section=tuple(mrope_section), layout=layout, dtype=dtype, model_type=model_type)

    if weights == "transformers":
        flat = make_config(ids, vocab_size, tie_word_embeddings=tie_word_embeddings,
                           mrope_section=tuple(mrope_section), layout="flat", dtype=dtype, model_type=model_type)
        _transformers_weights(out, flat, seed, dtype)
    elif weights == "random":
        import torch
        from safetensors.torch import save_file

        sd = _random_state_dict(vocab_size, tie_word_embeddings, seed, model_type)
        sd = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in sd.items()}
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        raise ValueError(f"unknown weights {weights!r}; expected 'random' or 'transformers'")

    # Written after save_pretrained so these files, not transformers' own, describe the checkpoint.
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    })
    _write_json(out / "preprocessor_config.json", {**PREPROCESSOR_CONFIG, "processor_class": _PROCESSOR[model_type]})
    if model_type != "qwen2_vl":
        path = out / "tokenizer_config.json"
        _write_json(path, {**json.loads(path.read_text(encoding="utf-8")), "processor_class": _PROCESSOR[model_type]})
    _write_chat_template(out, chat_template_file)
    logger.info("wrote tiny %s checkpoint to %s (%s weights, %s layout)", model_type, out, weights, layout)
    return out


def _write_chat_template(out: pathlib.Path, where: str) -> None:
    for stale in ("chat_template.json", "chat_template.jinja"):
        (out / stale).unlink(missing_ok=True)
    if where == "chat_template.json":
        _write_json(out / "chat_template.json", {"chat_template": QWEN2_VL_CHAT_TEMPLATE})
    elif where == "chat_template.jinja":
        (out / "chat_template.jinja").write_text(QWEN2_VL_CHAT_TEMPLATE, encoding="utf-8")
    elif where == "tokenizer_config.json":
        path = out / "tokenizer_config.json"
        cfg = json.loads(path.read_text(encoding="utf-8"))
        cfg["chat_template"] = QWEN2_VL_CHAT_TEMPLATE
        _write_json(path, cfg)
    else:
        raise ValueError(f"unknown chat_template_file {where!r}; expected chat_template.json, "
                         "chat_template.jinja or tokenizer_config.json")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--layout", choices=("flat", "nested"), default="flat")
    ap.add_argument("--tie", action="store_true", help="tie lm_head to the input embedding")
    ap.add_argument("--weights", choices=("random", "transformers"), default="random")
    ap.add_argument("--mrope-section", type=int, nargs=3, default=(2, 3, 3))
    ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    ap.add_argument("--specials-in-middle", action="store_true")
    ap.add_argument("--chat-template-file", default="chat_template.json",
                    choices=("chat_template.json", "chat_template.jinja", "tokenizer_config.json"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-type", choices=MODEL_TYPES, default="qwen2_vl")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_tiny_checkpoint(args.out_dir, tie_word_embeddings=args.tie, mrope_section=args.mrope_section,
                          layout=args.layout, weights=args.weights, seed=args.seed,
                          specials_in_middle=args.specials_in_middle, dtype=args.dtype,
                          chat_template_file=args.chat_template_file, model_type=args.model_type)


if __name__ == "__main__":
    main()
