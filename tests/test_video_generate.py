"""Videos through the model: M-RoPE ids, chunked vision tower, greedy tokens vs transformers.

transformers' processor needs torchvision for videos, so the reference gets the pixel values
from qvl's video pipeline (shown equal to qwen-vl-utils + transformers' video processor in
test_video_processor.py) and its prompt from its own chat template and tokenizer, expanded the
way Qwen2VLProcessor does (t*h*w / merge**2 pads per video).
"""

import pytest
import torch
from PIL import Image
from transformers import Qwen2VLForConditionalGeneration

import qvl
from qvl.model.rope import rope_index
from qvl.runtime.embed import encode_video
from qvl.runtime.prompt import build_request
from qvl.runtime.video import fetch_video
from qvl.scripts.sample_videos import moving_squares, write_video

N_NEW = 16
VIDEO_KW = {"min_pixels": 784 * 4, "max_pixels": 784 * 6}  # 56x84 frames: 6 tokens per frame pair


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    g = torch.Generator().manual_seed(0)
    img = d / "img.png"
    Image.fromarray((torch.rand(84, 112, 3, generator=g) * 255).to(torch.uint8).numpy()).save(img)
    return {
        "a": write_video(d / "a.mp4", moving_squares(16, 84, 56), fps=4),
        "b": write_video(d / "b.mkv", moving_squares(10, 56, 56, start=50), fps=2),
        "img": img,
    }


@pytest.fixture(scope="module")
def setup(tiny_ckpt, hf_processor):
    hf = Qwen2VLForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    return hf, hf_processor(tiny_ckpt), qvl.load(tiny_ckpt, max_seq_len=512, max_batch=2)


def _ids(segments, img, vid, text=7):
    out, grids, mm = [], [], []
    for kind, x in segments:
        if kind == "t":
            out += [text] * x
            mm += [0] * x
        else:
            n = x[0] * x[1] * x[2] // 4
            out += [img if kind == "i" else vid] * n
            mm += [1 if kind == "i" else 2] * n
            grids.append((kind, x))
    return torch.tensor([out]), torch.tensor([mm]), grids


@pytest.mark.parametrize("segments", [
    [("t", 5), ("v", (4, 4, 6)), ("t", 3)],  # video only
    [("t", 2), ("v", (8, 2, 2)), ("t", 4)],  # t beyond max(h, w)/merge: text overlaps the video's t ids
    [("t", 3), ("i", (1, 6, 4)), ("t", 2), ("v", (2, 4, 4)), ("t", 5)],  # image + video
    [("t", 1), ("v", (3, 2, 4)), ("t", 2), ("i", (1, 2, 2)), ("t", 1), ("v", (5, 6, 2)), ("t", 2)],
])
def test_rope_index_matches_transformers_with_videos(setup, segments):
    hf = setup[0]
    img, vid = hf.config.image_token_id, hf.config.video_token_id
    ids, mm, grids = _ids(segments, img, vid)
    image_grids = torch.tensor([g for k, g in grids if k == "i"]) if any(k == "i" for k, _ in grids) else None
    video_grids = torch.tensor([g for k, g in grids if k == "v"])
    ref, ref_delta = hf.model.get_rope_index(ids, mm, image_grid_thw=image_grids, video_grid_thw=video_grids)
    ours, delta = rope_index(ids, [g for _, g in grids], (img, vid), 2)
    assert torch.equal(ours, ref)
    assert delta.tolist() == ref_delta.view(-1).tolist()


def test_rope_index_left_padded_video_batch(setup):
    hf = setup[0]
    img, vid = hf.config.image_token_id, hf.config.video_token_id
    a, mm_a, ga = _ids([("t", 2), ("v", (4, 2, 4)), ("t", 3)], img, vid)
    b, mm_b, gb = _ids([("t", 1), ("i", (1, 2, 2)), ("t", 1), ("v", (2, 2, 2)), ("t", 1)], img, vid)
    T = max(a.shape[1], b.shape[1])
    ids = torch.zeros(2, T, dtype=torch.int64)
    mm = torch.zeros(2, T, dtype=torch.int64)
    mask = torch.zeros(2, T, dtype=torch.int64)
    for row, (x, m) in enumerate(((a, mm_a), (b, mm_b))):
        ids[row, T - x.shape[1]:], mm[row, T - x.shape[1]:], mask[row, T - x.shape[1]:] = x[0], m[0], 1
    grids = [g for _, g in ga + gb]
    ref, _ = hf.model.get_rope_index(ids, mm, image_grid_thw=torch.tensor([(1, 2, 2)]),
                                     video_grid_thw=torch.tensor([(4, 2, 4), (2, 2, 2)]), attention_mask=mask)
    ours, _ = rope_index(ids, grids, (img, vid), 2, mask)
    assert torch.equal(ours * mask, ref * mask)


def test_chunked_video_encode_equals_one_pass(setup, media):
    eng = setup[2]
    video = eng.video_processor.prepare(fetch_video({"video": str(media["a"]), **VIDEO_KW}).frames)
    t, h, w = video.grid
    assert t == 4
    whole = eng.model.visual.encode(video.rows(), torch.tensor([video.grid]))
    with torch.inference_mode():
        for max_patches in (1, 2 * h * w, 10**6):
            got = encode_video(eng.model.visual, video, "cpu", max_patches)
            torch.testing.assert_close(got, whole, rtol=0, atol=1e-5)


def _conversations(media):
    return {
        "video": [{"role": "user", "content": [
            {"type": "video", "video": str(media["a"]), **VIDEO_KW},
            {"type": "text", "text": "What happens in this video?"}]}],
        "image_and_videos": [
            {"role": "user", "content": [
                {"type": "image", "image": str(media["img"])},
                {"type": "video", "video": f"file://{media['b']}", "fps": 1.0, **VIDEO_KW},
                {"type": "text", "text": "Compare them."}]},
            {"role": "assistant", "content": "The first is a picture."},
            {"role": "user", "content": [
                {"type": "video", "video": [Image.fromarray(f) for f in moving_squares(3, 56, 56)], **VIDEO_KW},
                {"type": "text", "text": "And these frames?"}]},
        ],
    }


def _hf_generate(hf, proc, eng, conv):
    from qvl.runtime.inputs import extract_vision

    items = extract_vision(conv)
    images = [Image.open(it["image"]) for k, it in items if k == "image"]
    videos = [fetch_video(it).frames for k, it in items if k == "video"]
    text = proc.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    inputs = {}
    if images:
        inputs = dict(proc.image_processor(images, return_tensors="pt"))
        for g in inputs["image_grid_thw"].tolist():
            text = text.replace("<|image_pad|>", "<|placeholder|>" * (g[0] * g[1] * g[2] // 4), 1)
        text = text.replace("<|placeholder|>", "<|image_pad|>")
    pv, video_grid = eng.video_processor(videos)
    for g in video_grid.tolist():
        text = text.replace("<|video_pad|>", "<|placeholder|>" * (g[0] * g[1] * g[2] // 4), 1)
    text = text.replace("<|placeholder|>", "<|video_pad|>")
    ids = proc.tokenizer([text], return_tensors="pt")["input_ids"]
    mm = (ids == hf.config.image_token_id).int() + 2 * (ids == hf.config.video_token_id).int()
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                          pixel_values_videos=pv, video_grid_thw=video_grid, max_new_tokens=N_NEW,
                          do_sample=False, **inputs)
    return out[0, ids.shape[1]:].tolist(), ids[0].tolist()


@pytest.mark.parametrize("name", ["video", "image_and_videos"])
def test_greedy_matches_transformers(setup, media, name):
    hf, proc, eng = setup
    conv = _conversations(media)[name]
    ref, ref_ids = _hf_generate(hf, proc, eng, conv)
    req = build_request(conv, eng.tokenizer, eng.processor, 2, video_processor=eng.video_processor)
    assert req.ids == ref_ids
    assert eng.generate_ids(conv, max_new_tokens=N_NEW, ignore_eos=True) == ref


def test_video_batch_equals_one_by_one(setup, media):
    eng = setup[2]
    convs = list(_conversations(media).values())
    single = [eng.generate_ids(c, max_new_tokens=8, ignore_eos=True) for c in convs]
    assert eng.generate_ids(convs, max_new_tokens=8, ignore_eos=True) == single


def test_add_vision_id_numbers_images_and_videos(setup, media):
    eng = setup[2]
    conv = _conversations(media)["image_and_videos"]
    req = build_request(conv, eng.tokenizer, eng.processor, 2, add_vision_id=True,
                        video_processor=eng.video_processor)
    assert "Picture 1: <|vision_start|>" in req.text and "Video 2: <|vision_start|>" in req.text
    kinds = [g for g in req.vision_grids]
    assert len(kinds) == 3 and req.grids == [kinds[0]] and [v.grid for v in req.videos] == kinds[1:]
