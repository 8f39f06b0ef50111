"""Qwen2.5-VL video through qwen-vl-utils' own pipeline, against qvl's engine given the same
messages (opt-in: skipped unless ``qwen_vl_utils`` imports).

Reference, as Qwen's model card runs it: ``qwen_vl_utils.process_vision_info`` (0.0.14: decord
for files, PIL for frame lists, torchvision's bicubic resize) -> transformers'
``Qwen2_5_VLProcessor`` (``second_per_grid_ts`` = temporal patch size / each video's sampled fps)
-> ``Qwen2_5_VLForConditionalGeneration.generate``. One test video (24 frames, 6 fps, 128x96, so
the frames are resized) asked for at 1 and at 3 fps, and a 5-frame list at 1 and at 4 fps.
Everything exact: sampled indices, frames, fps, ``second_per_grid_ts``, position ids, greedy tokens.

qwen-vl-utils imports torchvision, and the registry's torchvision wheels are CUDA builds that do
not load against the CPU torch of the dev venv; decord is needed because torchvision 0.29 lost
``read_video``. So it runs in its own venv, e.g.::

    python3 -m venv /tmp/qvu && . /tmp/qvu/bin/activate && pip install torch==2.14.1 torchvision==0.29.1
    pip install qwen-vl-utils==0.0.14 decord && pip install -e ".[dev]"
    python -m pytest -q tests/test_qwen25_vl_utils.py

(qwen-vl-utils' decord path takes plain paths: it hands ``file://`` URLs to decord, which cannot
open them, and falls back to the missing ``read_video``.)
"""

import pytest
import torch
from PIL import Image

try:
    from qwen_vl_utils import process_vision_info
except Exception as e:  # ImportError, or torchvision's RuntimeError when its build does not fit torch
    pytest.skip(f"qwen-vl-utils is not importable here ({type(e).__name__}: {e})", allow_module_level=True)

from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor  # noqa: E402

import qvl  # noqa: E402
from qvl.model.rope import rope_index  # noqa: E402
from qvl.runtime.prompt import build_request  # noqa: E402
from qvl.runtime.video import fetch_video  # noqa: E402
from qvl.scripts.sample_videos import moving_squares, write_video  # noqa: E402
from qvl.scripts.tiny import write_tiny_checkpoint  # noqa: E402

N_NEW = 16
VIDEO_KW = {"min_pixels": 784 * 4, "max_pixels": 784 * 12}
NAMES = ["file_1fps", "file_3fps", "frames_1fps", "frames_4fps"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("q25_vlu"), weights="transformers",
                                 model_type="qwen2_5_vl", mrope_section=(3, 2, 3))
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # run the full length, as ignore_eos does
    proc = AutoProcessor.from_pretrained(path)
    assert isinstance(proc, Qwen2_5_VLProcessor)
    return hf, proc, qvl.load(path, max_seq_len=1024, max_batch=1)


@pytest.fixture(scope="module")
def messages(tmp_path_factory):
    d = tmp_path_factory.mktemp("q25_vlu_media")
    video = str(write_video(d / "v.mp4", moving_squares(24, 128, 96), fps=6))
    frames = [Image.fromarray(f) for f in moving_squares(5, 84, 56, start=30)]  # odd: one padded

    def chat(item):
        return [{"role": "user", "content": [{"type": "video", **item, **VIDEO_KW},
                                             {"type": "text", "text": "What happens in this video?"}]}]

    return {"file_1fps": chat({"video": video, "fps": 1.0}), "file_3fps": chat({"video": video, "fps": 3.0}),
            "frames_1fps": chat({"video": frames, "sample_fps": 1.0}),
            "frames_4fps": chat({"video": frames, "sample_fps": 4.0})}


def _sampled_fps(meta: dict) -> float:
    """transformers' ``VideoMetadata.sampled_fps`` of qwen-vl-utils' metadata dict."""
    return len(meta["frames_indices"]) / meta["total_num_frames"] * meta["fps"]


def _reference(hf, proc, conv):
    """qwen-vl-utils -> Qwen2_5_VLProcessor: (processor inputs, video tensors, metadata)."""
    _, vids, kwargs = process_vision_info(conv, return_video_kwargs=True, return_video_metadata=True)
    videos, metas = [v for v, _ in vids], [m for _, m in vids]
    text = proc.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    # frames are sampled already (kwargs: do_sample_frames=False); the fps comes from the metadata
    inputs = proc(text=[text], videos=videos, video_metadata=metas, return_tensors="pt", **kwargs)
    return inputs, videos, metas


def _hf_positions(hf, inputs):
    pos, _ = hf.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                     video_grid_thw=inputs["video_grid_thw"],
                                     second_per_grid_ts=torch.as_tensor(inputs["second_per_grid_ts"]),
                                     attention_mask=inputs["attention_mask"])
    return pos


@pytest.mark.parametrize("name,backend", [("file_1fps", "decord"), ("file_3fps", "decord"), ("file_1fps", "pyav"),
                                          ("file_3fps", "pyav"), ("frames_1fps", None), ("frames_4fps", None)])
def test_sampling_matches_qwen_vl_utils(setup, messages, name, backend):
    """The frames qvl samples and resizes, and their rate, are qwen-vl-utils' (with either file
    reader; frame lists go through no reader)."""
    item = messages[name][0]["content"][0]
    (ref_video, meta), fps_list = (process_vision_info(messages[name], return_video_kwargs=True,
                                                       return_video_metadata=True)[1][0],
                                   process_vision_info(messages[name], return_video_kwargs=True)[2]["fps"])
    got = fetch_video(item, backend=backend)
    assert got.indices == list(meta["frames_indices"])
    assert torch.equal(got.frames.float(), ref_video)
    assert got.sample_fps == _sampled_fps(meta)
    assert got.sample_fps == pytest.approx(fps_list[0], rel=1e-12)  # the model card's `fps` kwarg


@pytest.mark.parametrize("name", NAMES)
def test_greedy_matches_transformers(setup, messages, name):
    hf, proc, eng = setup
    conv = messages[name]
    inputs, _, _ = _reference(hf, proc, conv)
    req = build_request(conv, eng.tokenizer, eng.processor, 2, video_processor=eng.video_processor)
    assert req.ids == inputs["input_ids"][0].tolist()
    # the processor hands the model float32 seconds; qvl keeps the Python float it came from
    ref_seconds = torch.as_tensor(inputs["second_per_grid_ts"])
    assert torch.equal(torch.tensor(req.vision_seconds, dtype=ref_seconds.dtype), ref_seconds)
    torch.testing.assert_close(req.videos[0].rows(0, req.videos[0].grid[0]), inputs["pixel_values_videos"],
                               atol=0, rtol=0)
    # the position ids the runner computes from the request
    ours, _ = rope_index(torch.tensor([req.ids]), req.vision_grids, (hf.config.image_token_id,
                         hf.config.video_token_id), 2, seconds=req.vision_seconds,
                         tokens_per_second=eng.model.cfg.tokens_per_second)
    assert torch.equal(ours, _hf_positions(hf, inputs))
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=N_NEW, do_sample=False)
    ref = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert eng.generate_ids(conv, max_new_tokens=N_NEW, ignore_eos=True) == ref


@pytest.mark.parametrize("pair", [("file_1fps", "file_3fps"), ("frames_1fps", "frames_4fps")])
def test_two_fps_give_other_positions(setup, messages, pair):
    """The tests above can fail on the time ids: the same video at another fps gets other ones.
    The file is sampled to other frame counts; the frame list keeps its frames and tokens, and
    only the video's time ids move (and the text after it, which starts past them)."""
    hf, proc, _ = setup
    (a, _, ma), (b, _, mb) = (_reference(hf, proc, messages[n]) for n in pair)
    assert not torch.equal(torch.as_tensor(a["second_per_grid_ts"]), torch.as_tensor(b["second_per_grid_ts"]))
    pa, pb = _hf_positions(hf, a), _hf_positions(hf, b)
    if pair[0].startswith("frames"):
        assert torch.equal(a["input_ids"], b["input_ids"])
        video = a["input_ids"][0] == hf.config.video_token_id
        assert torch.equal(pa[1:, :, video], pb[1:, :, video])  # rows and columns as they were
        assert not torch.equal(pa[0, :, video], pb[0, :, video])
    else:
        assert len(ma[0]["frames_indices"]) != len(mb[0]["frames_indices"])
        assert pa.shape != pb.shape
