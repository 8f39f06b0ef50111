"""qvl.runtime.tokenizer against transformers on the tiny checkpoints."""

import json
import random

import pytest
from PIL import Image

from qvl.runtime.tokenizer import Tokenizer
from qvl.scripts.tiny import QWEN2_VL_CHAT_TEMPLATE, write_tiny_checkpoint

transformers = pytest.importorskip("transformers")

TEMPLATE_FILES = ["chat_template.json", "chat_template.jinja", "tokenizer_config.json"]

IMG = {"type": "image", "image": "file:///tmp/cat.png"}
MESSAGES = {
    "text_only": [{"role": "user", "content": [{"type": "text", "text": "Hello there!"}]}],
    "one_image": [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (28, 28))},
                                               {"type": "text", "text": "Describe this image."}]}],
    "several_images": [{"role": "user", "content": [
        IMG, {"type": "text", "text": "Compare"}, {"type": "image", "url": "http://x/y.jpg"},
        {"type": "image_url", "image_url": {"url": "data:"}}, {"type": "text", "text": " these."}]}],
    "multi_turn": [
        {"role": "user", "content": [IMG, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, IMG,
                                     {"type": "video", "video": "clip.mp4"}]},
    ],
    "system_prompt": [{"role": "system", "content": "Answer in French."},
                      {"role": "user", "content": [IMG, {"type": "text", "text": "Qu'est-ce?"}]}],
    "string_content": [{"role": "user", "content": "Plain text, é 中文 😀"},
                       {"role": "assistant", "content": "Sure."},
                       {"role": "user", "content": "Again <|im_end|> with a special."}],
}


@pytest.fixture(scope="module", params=TEMPLATE_FILES)
def ckpt(request, tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tmpl"), chat_template_file=request.param)


@pytest.fixture(scope="module")
def ckpt_middle(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("middle"), specials_in_middle=True)


def _hf_renderer(load_processor, path):
    # transformers 5 quirk: AutoProcessor reads only chat_template.{json,jinja}; a template that
    # lives solely in tokenizer_config.json is seen by the tokenizer alone.
    proc = load_processor(path)
    return proc if proc.chat_template else proc.tokenizer


@pytest.mark.parametrize("add_vision_id", [False, True])
@pytest.mark.parametrize("case", sorted(MESSAGES))
def test_chat_template_matches_transformers(ckpt, hf_processor, case, add_vision_id):
    ours = Tokenizer.from_dir(ckpt)
    assert ours.chat_template == QWEN2_VL_CHAT_TEMPLATE
    hf = _hf_renderer(hf_processor, ckpt)
    kw = {"add_vision_id": True} if add_vision_id else {}
    expected = hf.apply_chat_template(MESSAGES[case], tokenize=False, add_generation_prompt=True, **kw)
    assert ours.apply_chat_template(MESSAGES[case], add_generation_prompt=True, **kw) == expected
    if add_vision_id and case in ("several_images", "multi_turn"):
        assert "Picture 2: " in expected


def test_chat_template_without_generation_prompt(ckpt, hf_processor):
    hf = _hf_renderer(hf_processor, ckpt)
    msgs = MESSAGES["multi_turn"]
    expected = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert Tokenizer.from_dir(ckpt).apply_chat_template(msgs, add_generation_prompt=False) == expected
    assert not expected.endswith("assistant\n")


PROMPTS = [
    "Hello world",
    "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>Hi<|im_end|>\n",
    "Café naïve résumé é è ß ñ 中文 测试 日本語 😀🐶🍎 ☀️",
    "  leading spaces\n\n\ttabs and trailing   ",
    "<|im_end <|im_end|><|im_end|>x<|endoftext|>",
    "<tool_call>{\"name\": \"f\"}</tool_call>",
    "numbers 12345 3.14159 and (punct)!?",
]


@pytest.mark.parametrize("variant", ["end", "middle"])
def test_encode_decode_match_transformers(ckpt, ckpt_middle, variant):
    path = ckpt_middle if variant == "middle" else ckpt
    ours, hf = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    prompts = PROMPTS + [Tokenizer.from_dir(ckpt).apply_chat_template(MESSAGES["multi_turn"])]
    for prompt in prompts:
        ids = ours.encode(prompt)
        assert ids == hf(prompt).input_ids, prompt
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.batch_decode(
                [ids], skip_special_tokens=skip, clean_up_tokenization_spaces=False)[0]
    assert ours.token_id("<|image_pad|>") == hf.convert_tokens_to_ids("<|image_pad|>")
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(ours)) for _ in range(rng.randrange(1, 30))]
        assert ours.decode(ids) == hf.batch_decode([ids], skip_special_tokens=True,
                                                   clean_up_tokenization_spaces=False)[0]


_POOL = list("abc xyz.,!\n") + ["é", "ß", "中", "文", "日本", "😀", "🐶", "☀️", " Café", "<|im_end|>",
                                  "<|image_pad|>", "<tool_call>"]


@pytest.mark.parametrize("skip", [True, False])
def test_stream_decoder_never_splits_characters(ckpt_middle, skip):
    tok = Tokenizer.from_dir(ckpt_middle)
    rng = random.Random(1)
    split_chars = 0
    for _ in range(60):
        text = "".join(rng.choice(_POOL) for _ in range(rng.randrange(1, 25)))
        ids = tok.encode(text)
        split_chars += sum("\ufffd" in tok.decode([i]) for i in ids)
        stream = tok.stream_decoder(skip_special_tokens=skip)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in p for p in pieces)
        assert pieces[-1] == "", "complete text must not wait for flush"
    assert split_chars > 0, "corpus never split a character; the test would prove nothing"


def test_stream_decoder_on_arbitrary_ids(ckpt_middle):
    tok = Tokenizer.from_dir(ckpt_middle)
    rng = random.Random(2)
    for _ in range(50):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(0, 40))]
        stream = tok.stream_decoder()
        assert "".join([stream.push(i) for i in ids] + [stream.flush()]) == tok.decode(ids)


def test_missing_template_and_token_errors(tmp_path, ckpt_middle):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((ckpt_middle / name).read_bytes())
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.encode("hi") == Tokenizer.from_dir(ckpt_middle).encode("hi")
    with pytest.raises(ValueError, match="chat_template.json.*chat_template.jinja.*tokenizer_config.json"):
        tok.apply_chat_template(MESSAGES["text_only"])
    with pytest.raises(ValueError, match="<nope>"):
        tok.token_id("<nope>")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "missing")


def test_named_templates_in_tokenizer_config(tmp_path, ckpt_middle):
    (tmp_path / "tokenizer.json").write_bytes((ckpt_middle / "tokenizer.json").read_bytes())
    cfg = json.loads((ckpt_middle / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "TOOLS"},
                            {"name": "default", "template": "{{ messages[0]['content'] }}|{{ eos_token }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "hey"}]) == "hey|<|im_end|>"
