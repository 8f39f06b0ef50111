"""Qwen2.5-VL against transformers' Qwen2_5_VLForConditionalGeneration, fp32 CPU.

Tiny checkpoints: a 4-block tower whose 56-pixel windows (2x2 merged tokens) are smaller than
every picture, so windows matter and some are cut at the picture's edges; block 1 attends over
whole frames between windowed blocks; uneven mrope sections (3, 2, 3) and (2, 3, 3).

Tolerances: window index, rope ids and greedy tokens exact; vision features 1e-4 absolute
(observed ~2e-7: summation order of matmul vs conv3d and of batched vs per-window SDPA).
Videos reach the reference as in test_video_generate.py: pixels and frame rates from qvl's video
pipeline (qwen-vl-utils' semantics), ``second_per_grid_ts`` = temporal_patch_size / sampled fps
as Qwen2_5_VLProcessor computes it from qwen-vl-utils' metadata. test_qwen25_vl_utils.py runs
qwen-vl-utils and the processor themselves (opt-in: they need torchvision).
"""

import dataclasses
import json

import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.vision_utils import get_vision_window_index

import qvl
from qvl.model.config import ConfigError, Qwen2VLConfig
from qvl.model.rope import rope_index
from qvl.model.vision import window_index
from qvl.runtime.inputs import extract_vision
from qvl.runtime.loader import load_model
from qvl.runtime.prompt import build_request
from qvl.runtime.video import fetch_video
from qvl.scripts.sample_videos import moving_squares, write_video
from qvl.scripts.tiny import write_tiny_checkpoint

ATOL = 1e-4
N_NEW = 20
VIDEO_KW = {"min_pixels": 784 * 4, "max_pixels": 784 * 12}

# Qwen/Qwen2.5-VL-3B-Instruct config.json, vision part and the fields that differ from Qwen2-VL
RELEASE_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
    "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "max_position_embeddings": 128000, "tie_word_embeddings": True, "use_sliding_window": False,
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                      "temporal_patch_size": 2},
}


@pytest.fixture(scope="module", params=["flat", "nested"])
def setup(request, tmp_path_factory, hf_processor):
    nested = request.param == "nested"
    path = write_tiny_checkpoint(tmp_path_factory.mktemp(f"q25_{request.param}"), weights="transformers",
                                 model_type="qwen2_5_vl", layout=request.param, tie_word_embeddings=nested,
                                 specials_in_middle=nested, mrope_section=(2, 3, 3) if nested else (3, 2, 3))
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # run the full length, as ignore_eos does
    return path, hf, hf_processor(path), qvl.load(path, max_seq_len=768, max_batch=2)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("q25_media")
    out = {}
    for name, (w, h) in {"a": (224, 168), "b": (112, 140), "c": (56, 280)}.items():
        g = torch.Generator().manual_seed(ord(name))
        out[name] = d / f"{name}.png"
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()).save(out[name])
    out["video"] = write_video(d / "v.mp4", moving_squares(24, 112, 84), fps=6)
    return out


# --- config ------------------------------------------------------------------------------------

def test_release_config_reads_as_qwen25():
    cfg = Qwen2VLConfig.from_hf(RELEASE_3B)
    v = cfg.vision
    assert cfg.model_type == "qwen2_5_vl" and v.windowed
    assert (v.embed_dim, v.hidden_size, v.intermediate_size, v.num_heads, v.depth) == (1280, 2048, 3420, 16, 32)
    assert (v.window_size, v.window_units, v.fullatt_block_indexes) == (112, 4, (7, 15, 23, 31))
    assert cfg.tokens_per_second == 2 and cfg.text.mrope_section == (16, 24, 24)


@pytest.mark.parametrize("change,match", [
    ({"model_type": "qwen3_vl"}, "model_type is 'qwen3_vl'"),
    ({"vision_config": {**RELEASE_3B["vision_config"], "out_hidden_size": 1024}}, "out_hidden_size 1024"),
    ({"vision_config": {**RELEASE_3B["vision_config"], "window_size": 100}}, "window_size 100"),
    ({"vision_config": {**RELEASE_3B["vision_config"], "fullatt_block_indexes": [32]}}, r"\[32\]"),
    ({"vision_config": {k: v for k, v in RELEASE_3B["vision_config"].items() if k != "window_size"}},
     "window_size"),
])
def test_bad_release_config(change, match):
    with pytest.raises(ConfigError, match=match):
        Qwen2VLConfig.from_hf({**RELEASE_3B, **change})


# --- vision tower ------------------------------------------------------------------------------

@pytest.mark.parametrize("grids,window", [
    ([(1, 12, 20)], 56),                 # windows cut at the right and bottom edges
    ([(1, 16, 16)], 56),                 # the grid divides into whole windows
    ([(2, 8, 6), (1, 4, 28), (3, 6, 6)], 56),
    ([(1, 32, 44), (2, 10, 14)], 112),   # the releases' window
    ([(1, 4, 4)], 112),                  # one window larger than the picture
])
def test_window_index_matches_transformers(grids, window):
    g = torch.tensor(grids)
    ref_index, ref_cu = get_vision_window_index(g, spatial_merge_size=2, window_size=window, patch_size=14)
    index, cu = window_index(g, 2, window // 28)
    assert torch.equal(index, ref_index)
    assert cu.tolist() == ref_cu.tolist()


@pytest.mark.parametrize("grids", [[(1, 12, 20)], [(1, 8, 12), (1, 4, 4)], [(2, 6, 10)], [(1, 2, 40), (3, 8, 8)]])
def test_vision_features(setup, grids):
    _, hf, _, eng = setup
    g = torch.Generator().manual_seed(len(grids))
    pv = torch.randn(sum(t * h * w for t, h, w in grids), 1176, generator=g)
    with torch.no_grad():
        ref = hf.model.visual(pv, grid_thw=torch.tensor(grids)).pooler_output
        got = eng.model.visual.encode(pv, torch.tensor(grids))
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_window_order_matters(setup):
    """The same tower with every block on full attention gives other features: the test above
    would catch a window order that did nothing."""
    _, hf, _, eng = setup
    tower = eng.model.visual
    pv, grids = torch.randn(12 * 20, 1176), torch.tensor([(1, 12, 20)])
    full = dataclasses.replace(tower.cfg, fullatt_block_indexes=tuple(range(tower.cfg.depth)))
    saved = tower.cfg
    try:
        with torch.no_grad():
            windowed = tower.encode(pv, grids)
            tower.cfg = full
            everywhere = tower.encode(pv, grids)
    finally:
        tower.cfg = saved
    assert (windowed - everywhere).abs().max() > 1e-3


# --- M-RoPE index ------------------------------------------------------------------------------

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


SEGMENTS = [
    [("t", 5), ("v", (4, 4, 6)), ("t", 3)],
    [("t", 3), ("i", (1, 6, 4)), ("t", 2), ("v", (6, 4, 4)), ("t", 5)],
    [("t", 1), ("v", (3, 2, 4)), ("t", 2), ("i", (1, 2, 2)), ("t", 1), ("v", (5, 6, 2)), ("t", 2)],
]


@pytest.mark.parametrize("segments", SEGMENTS)
@pytest.mark.parametrize("fps", [(2.0, 2.0), (1.0, 3.0), (3.0, 0.5), (6.0, 24 / 7)])
def test_rope_index_matches_transformers(setup, segments, fps):
    """fps 3 gives 2/3 s per frame pair: in float32 3 * (2 * 2/3) is 4, in float64 just under."""
    _, hf, _, eng = setup
    img, vid = hf.config.image_token_id, hf.config.video_token_id
    ids, mm, grids = _ids(segments, img, vid)
    videos = [g for k, g in grids if k == "v"]
    seconds_v = [2 / f for f, _ in zip(fps * 2, videos)]
    images = [g for k, g in grids if k == "i"]
    ref, ref_delta = hf.model.get_rope_index(ids, mm, image_grid_thw=torch.tensor(images) if images else None,
                                             video_grid_thw=torch.tensor(videos),
                                             second_per_grid_ts=torch.tensor(seconds_v))
    it = iter(seconds_v)
    seconds = [next(it) if k == "v" else None for k, _ in grids]
    ours, delta = rope_index(ids, [g for _, g in grids], (img, vid), 2, seconds=seconds,
                             tokens_per_second=eng.model.cfg.tokens_per_second)
    assert torch.equal(ours, ref)
    assert delta.tolist() == ref_delta.view(-1).tolist()


def test_rope_index_time_follows_fps(setup):
    _, hf, _, eng = setup
    img, vid = hf.config.image_token_id, hf.config.video_token_id
    ids, _, grids = _ids(SEGMENTS[0], img, vid)
    tps = eng.model.cfg.tokens_per_second
    a, _ = rope_index(ids, [g for _, g in grids], (img, vid), 2, seconds=[1.0], tokens_per_second=tps)
    b, _ = rope_index(ids, [g for _, g in grids], (img, vid), 2, seconds=[0.5], tokens_per_second=tps)
    first = 5  # the video's first token; 6 tokens per frame pair
    # frame pair k at 1 s per pair: offset + 2k; at 0.5 s: offset + k
    assert a[0, 0, first:first + 24:6].tolist() == [5, 7, 9, 11]
    assert b[0, 0, first:first + 24:6].tolist() == [5, 6, 7, 8]
    assert torch.equal(a[1:], b[1:])


def test_rope_index_left_padded_batch(setup):
    _, hf, _, eng = setup
    img, vid = hf.config.image_token_id, hf.config.video_token_id
    a, mm_a, ga = _ids([("t", 2), ("v", (4, 2, 4)), ("t", 3)], img, vid)
    b, mm_b, gb = _ids([("t", 1), ("i", (1, 2, 2)), ("t", 1), ("v", (2, 2, 2)), ("t", 1)], img, vid)
    T = max(a.shape[1], b.shape[1])
    ids, mm, mask = (torch.zeros(2, T, dtype=torch.int64) for _ in range(3))
    for row, (x, m) in enumerate(((a, mm_a), (b, mm_b))):
        ids[row, T - x.shape[1]:], mm[row, T - x.shape[1]:], mask[row, T - x.shape[1]:] = x[0], m[0], 1
    ref, _ = hf.model.get_rope_index(ids, mm, image_grid_thw=torch.tensor([(1, 2, 2)]),
                                     video_grid_thw=torch.tensor([(4, 2, 4), (2, 2, 2)]), attention_mask=mask,
                                     second_per_grid_ts=torch.tensor([2 / 3, 0.5]))
    ours, _ = rope_index(ids, [g for _, g in ga + gb], (img, vid), 2, mask, seconds=[2 / 3, None, 0.5],
                         tokens_per_second=eng.model.cfg.tokens_per_second)
    assert torch.equal(ours * mask, ref * mask)


# --- greedy tokens -----------------------------------------------------------------------------

def _conversations(media):
    frames = [Image.fromarray(f) for f in moving_squares(6, 84, 56, start=30)]
    return {
        "one_image": [{"role": "user", "content": [
            {"type": "image", "image": str(media["a"])}, {"type": "text", "text": "Describe this."}]}],
        "multi_turn_multi_image": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "image", "image": str(media["b"])},
                                         {"type": "image", "image": f"file://{media['c']}"},
                                         {"type": "text", "text": "Compare them."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "The first is taller."}]},
            {"role": "user", "content": [{"type": "image", "image": Image.open(media["a"])},
                                         {"type": "text", "text": "And this one?"}]},
        ],
        "video_2fps": [{"role": "user", "content": [
            {"type": "video", "video": str(media["video"]), "fps": 2.0, **VIDEO_KW},
            {"type": "text", "text": "What happens in this video?"}]}],
        "video_3fps_and_image": [{"role": "user", "content": [
            {"type": "image", "image": str(media["b"])},
            {"type": "video", "video": f"file://{media['video']}", "fps": 3.0, **VIDEO_KW},
            {"type": "text", "text": "What happens?"}]}],
        "frames_at_1fps": [{"role": "user", "content": [
            {"type": "video", "video": frames, "sample_fps": 1.0, **VIDEO_KW},
            {"type": "text", "text": "And these frames?"}]}],
        "frames_at_4fps": [{"role": "user", "content": [
            {"type": "video", "video": frames, "sample_fps": 4.0, **VIDEO_KW},
            {"type": "text", "text": "And these frames?"}]}],
    }


def _hf_generate(hf, proc, eng, conv):
    """transformers' generate on the reference's own template, tokenizer and image processor;
    videos' pixels and sampled fps from qvl's qwen-vl-utils pipeline."""
    items = extract_vision(conv)
    images = []
    for k, it in items:
        if k == "image":
            im = it["image"]
            images.append(Image.open(im.removeprefix("file://")) if isinstance(im, str) else im)
    videos = [fetch_video(it) for k, it in items if k == "video"]
    text = proc.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    inputs = {}
    if images:
        inputs = dict(proc.image_processor(images, return_tensors="pt"))
        for g in inputs["image_grid_thw"].tolist():
            text = text.replace("<|image_pad|>", "<|placeholder|>" * (g[0] * g[1] * g[2] // 4), 1)
        text = text.replace("<|placeholder|>", "<|image_pad|>")
    if videos:
        pv, video_grid = eng.video_processor([v.frames for v in videos])
        for g in video_grid.tolist():
            text = text.replace("<|video_pad|>", "<|placeholder|>" * (g[0] * g[1] * g[2] // 4), 1)
        text = text.replace("<|placeholder|>", "<|video_pad|>")
        # Qwen2_5_VLProcessor: temporal_patch_size / metadata.sampled_fps, as a float32 tensor
        inputs.update(pixel_values_videos=pv, video_grid_thw=video_grid,
                      second_per_grid_ts=torch.tensor([2 / v.sample_fps for v in videos]))
    ids = proc.tokenizer([text], return_tensors="pt")["input_ids"]
    mm = (ids == hf.config.image_token_id).int() + 2 * (ids == hf.config.video_token_id).int()
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                          max_new_tokens=N_NEW, do_sample=False, **inputs)
    return out[0, ids.shape[1]:].tolist(), ids[0].tolist()


@pytest.mark.parametrize("name", ["one_image", "multi_turn_multi_image", "video_2fps", "video_3fps_and_image",
                                  "frames_at_1fps", "frames_at_4fps"])
def test_greedy_matches_transformers(setup, media, name):
    _, hf, proc, eng = setup
    conv = _conversations(media)[name]
    ref, ref_ids = _hf_generate(hf, proc, eng, conv)
    req = build_request(conv, eng.tokenizer, eng.processor, 2, video_processor=eng.video_processor)
    assert req.ids == ref_ids
    assert eng.generate_ids(conv, max_new_tokens=N_NEW, ignore_eos=True) == ref


def test_same_frames_at_two_fps_get_other_time_ids(setup, media):
    _, _, _, eng = setup
    convs = _conversations(media)
    reqs = [build_request(convs[n], eng.tokenizer, eng.processor, 2, video_processor=eng.video_processor)
            for n in ("frames_at_1fps", "frames_at_4fps")]
    assert reqs[0].ids == reqs[1].ids
    assert torch.equal(reqs[0].videos[0].frames, reqs[1].videos[0].frames)
    assert [r.vision_seconds for r in reqs] == [[2.0], [0.5]]
    # and their prefix-cache keys differ, since the KV they make does
    assert reqs[0].vision_keys != reqs[1].vision_keys


def test_batch_equals_one_by_one(setup, media):
    _, _, _, eng = setup
    convs = _conversations(media)
    batch = [convs["multi_turn_multi_image"], convs["video_3fps_and_image"]]  # different lengths
    single = [eng.generate_ids(c, max_new_tokens=N_NEW, ignore_eos=True) for c in batch]
    assert eng.generate_ids(batch, max_new_tokens=N_NEW, ignore_eos=True) == single


def test_random_weights_checkpoint_loads(tmp_path):
    """The transformers-free builder writes the official key names the loader maps."""
    path = write_tiny_checkpoint(tmp_path / "r", weights="random", model_type="qwen2_5_vl")
    model = load_model(path)
    assert json.loads((path / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    out = model.visual.encode(torch.randn(8 * 12, 1176), torch.tensor([(1, 8, 12)]))
    assert out.shape == (24, 64) and torch.isfinite(out).all()


def test_cli_boxes_read_in_the_models_frame(tmp_path, capsys):
    """qvl run --boxes reads a Qwen2.5-VL answer in pixels of the resized picture, a Qwen2-VL
    answer in 0..1000: the CLI passes the loaded model's type."""
    from types import SimpleNamespace

    from qvl.cli import _draw_answer_boxes
    from qvl.runtime.boxes import model_image_size, parse_boxes
    from qvl.runtime.processor import ImageProcessor

    picture = tmp_path / "p.png"
    Image.new("RGB", (300, 200), (20, 20, 20)).save(picture)
    text = '```json\n[{"bbox_2d": [28, 56, 140, 112], "label": "cup"}]\n```'
    seen = {}
    for model_type in ("qwen2_5_vl", "qwen2_vl"):
        engine = SimpleNamespace(processor=ImageProcessor(),
                                 model=SimpleNamespace(cfg=SimpleNamespace(model_type=model_type)))
        _draw_answer_boxes(engine, str(picture), text, str(tmp_path / f"{model_type}.png"))
        seen[model_type] = capsys.readouterr().err
    (box,) = parse_boxes(text, (300, 200), model_type="qwen2_5_vl",
                         resized_size=model_image_size((300, 200), ImageProcessor()))
    assert f"box cup: ({box.x1:.0f}, {box.y1:.0f}), ({box.x2:.0f}, {box.y2:.0f})" in seen["qwen2_5_vl"]
    assert f"({box.x1:.0f}, {box.y1:.0f})" not in seen["qwen2_vl"]
