"""End to end: qvl.load + generate against transformers' processor + generate, fp32 CPU.

Greedy continuations of 24 tokens must be token-identical; component logits parity
(1e-4) is in test_model_parity.py.
"""

import pytest
import torch
from PIL import Image
from transformers import Qwen2VLForConditionalGeneration

import qvl

N_NEW = 24


def _image(w, h, seed):
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    # sizes are multiples of 28 inside qwen-vl-utils' limits, so its pre-resize is the identity
    # and transformers' processor alone is the reference for the pixels
    d = tmp_path_factory.mktemp("imgs")
    out = {}
    for name, (w, h) in {"a": (224, 168), "b": (112, 140), "c": (56, 280)}.items():
        p = d / f"{name}.png"
        _image(w, h, ord(name)).save(p)
        out[name] = p
    return out


@pytest.fixture(scope="module", params=["tiny_ckpt", "tiny_ckpt_tied"])
def setup(request, hf_processor):
    path = request.getfixturevalue(request.param)
    hf = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # run the full length, as ignore_eos does
    proc = hf_processor(path)
    eng = qvl.load(path, max_seq_len=512, max_batch=2)
    return path, hf, proc, eng


def _conversations(images):
    return {
        "text": [{"role": "user", "content": [{"type": "text", "text": "Tell me a story about cats."}]}],
        "one_image": [{"role": "user", "content": [
            {"type": "image", "image": str(images["a"])}, {"type": "text", "text": "Describe this."}]}],
        "multi_turn_multi_image": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "image", "image": str(images["b"])},
                                         {"type": "image", "image": f"file://{images['c']}"},
                                         {"type": "text", "text": "Compare them."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "The first is taller."}]},
            {"role": "user", "content": [{"type": "image", "image": Image.open(images["a"])},
                                         {"type": "text", "text": "And this one?"}]},
        ],
    }


def _hf_generate(hf, proc, conv):
    imgs = [Image.open(it["image"].removeprefix("file://")) if isinstance(it["image"], str) else it["image"]
            for m in conv if isinstance(m["content"], list) for it in m["content"] if it["type"] == "image"]
    text = proc.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    inputs = proc(text=[text], images=imgs or None, return_tensors="pt")
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == hf.config.image_token_id).int()
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=N_NEW, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("name", ["text", "one_image", "multi_turn_multi_image"])
def test_greedy_matches_transformers(setup, images, name):
    _, hf, proc, eng = setup
    conv = _conversations(images)[name]
    ref_ids = _hf_generate(hf, proc, conv)
    got = eng.generate_ids(conv, max_new_tokens=N_NEW, ignore_eos=True)
    assert got == ref_ids
    assert eng.last_stats.new_tokens == N_NEW


def test_batch_equals_one_by_one(setup, images):
    _, _, _, eng = setup
    convs = list(_conversations(images).values())[:2]  # different lengths -> left padding
    single = [eng.generate_ids(c, max_new_tokens=N_NEW, ignore_eos=True) for c in convs]
    batched = eng.generate_ids(convs, max_new_tokens=N_NEW, ignore_eos=True)
    assert batched == single


def test_stream_equals_generate(setup, images):
    _, _, _, eng = setup
    conv = _conversations(images)["one_image"]
    text = eng.generate(conv, max_new_tokens=N_NEW, ignore_eos=True)
    pieces = list(eng.stream(conv, max_new_tokens=N_NEW, ignore_eos=True))
    assert "".join(pieces) == text


def test_sampling_seeded_is_reproducible(setup, images):
    _, _, _, eng = setup
    conv = _conversations(images)["text"]
    kw = dict(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.1, ignore_eos=True)
    a = eng.generate_ids(conv, seed=3, **kw)
    b = eng.generate_ids(conv, seed=3, **kw)
    assert a == b
    greedy = eng.generate_ids(conv, max_new_tokens=16, ignore_eos=True)
    assert any(eng.generate_ids(conv, seed=s, **kw) != greedy for s in range(4))


def test_stops_on_eos(setup, images):
    path, _, _, eng = setup
    conv = _conversations(images)["text"]
    ids = eng.generate_ids(conv, max_new_tokens=N_NEW, ignore_eos=True)
    # make the first generated token a stop token: generation must end right there
    eng.stop_ids = eng.stop_ids | {ids[0]}
    try:
        assert eng.generate_ids(conv, max_new_tokens=N_NEW) == ids[:1]
    finally:
        eng.stop_ids = eng.stop_ids - {ids[0]}


def test_prompt_longer_than_cache_is_a_clear_error(setup, images):
    _, _, _, eng = setup
    conv = [{"role": "user", "content": "word " * 2000}]
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        eng.generate(conv, max_new_tokens=4)


@pytest.mark.parametrize("bad,match", [
    ([], "non-empty"),
    ([{"content": "hi"}], "role"),
    ([{"role": "user", "content": 3}], "content"),
])
def test_bad_messages(setup, bad, match):
    _, _, _, eng = setup
    with pytest.raises(ValueError, match=match):
        eng.generate(bad, max_new_tokens=2)


def test_unreadable_image(setup, tmp_path):
    _, _, _, eng = setup
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    conv = [{"role": "user", "content": [{"type": "image", "image": str(bad)}, {"type": "text", "text": "?"}]}]
    with pytest.raises(ValueError, match="broken.png"):
        eng.generate(conv, max_new_tokens=2)


def test_text_logprobs_match_transformers_over_the_whole_chat(setup, images):
    """Engine.text_logprobs: one causal pass over a multi-image, multi-turn prompt plus an
    answer, log-probs of every text token that follows another (image pads skipped), fp32 against
    transformers' logits on the processor's ids and pixels (1e-4); the answer rows equal
    ``score``'s, which runs prefill + cached decode steps (1e-4)."""
    path, hf, proc, eng = setup
    conv = _conversations(images)["multi_turn_multi_image"]
    answer = eng.generate_ids(conv, max_new_tokens=4, ignore_eos=True)
    lp, targets = eng.text_logprobs(conv, answer)
    imgs = [Image.open(it["image"].removeprefix("file://")) if isinstance(it["image"], str) else it["image"]
            for m in conv if isinstance(m["content"], list) for it in m["content"] if it["type"] == "image"]
    text = proc.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    inputs = proc(text=[text], images=imgs, return_tensors="pt")
    ids = torch.cat([inputs["input_ids"], torch.tensor([answer])], dim=1)
    inputs["input_ids"] = ids
    inputs["attention_mask"] = torch.ones_like(ids)
    inputs["mm_token_type_ids"] = (ids == hf.config.image_token_id).int()
    with torch.no_grad():
        logits = hf(**inputs).logits[0, :-1]
    nxt = ids[0, 1:]
    keep = nxt != hf.config.image_token_id
    assert torch.equal(targets, nxt[keep]) and int((~keep).sum()) > 0
    torch.testing.assert_close(lp, torch.log_softmax(logits[keep], -1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lp[-len(answer):], eng.score(conv, answer), atol=1e-4, rtol=1e-4)
