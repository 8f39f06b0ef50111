"""Qwen2.5-VL through the server and ``qvl eval``: the paths around the engine read the model as
they read Qwen2-VL, and a video's sampling rate reaches the model from an OpenAI request.

Answers are compared with ``Engine.generate`` on the same conversation (greedy, exact); the
engine itself is compared with transformers in tests/test_qwen25.py.
"""

import pytest

import qvl
from qvl.scripts.sample_videos import moving_squares, write_video
from qvl.scripts.tiny import write_tiny_checkpoint
from test_server import NAME, Server, _png

N_NEW = 8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("q25p"), weights="transformers", model_type="qwen2_5_vl",
                                 mrope_section=(3, 2, 3))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("q25p_media")
    (d / "a.png").write_bytes(_png(112, 84, 3))
    write_video(d / "clip.mp4", moving_squares(12, 84, 56), fps=4)
    return d


def test_server_answers_as_generate_with_the_requested_fps(ckpt, media, tmp_path):
    engine = qvl.load(ckpt, max_seq_len=1024, max_batch=2)
    server = Server(ckpt, tmp_path / "serve.log", "--max-batch", "2", "--max-seq-len", "1024",
                    "--allowed-local-media-path", str(media))
    try:
        server.wait_ready()
        client = server.client()
        video, image = str(media / "clip.mp4"), str(media / "a.png")
        answers = {}
        for fps in (1.0, 2.0):
            oa = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file://" + image}},
                                               {"type": "video_url", "video_url": {"url": "file://" + video}},
                                               {"type": "text", "text": "What moves?"}]}]
            conv = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "video", "video": video, "fps": fps},
                                                 {"type": "text", "text": "What moves?"}]}]
            r = client.chat.completions.create(model=NAME, messages=oa, max_tokens=N_NEW, temperature=0,
                                               extra_body={"mm_processor_kwargs": {"fps": fps}})
            ids = engine.generate_ids(conv, max_new_tokens=N_NEW)
            assert r.choices[0].message.content == engine.tokenizer.decode(ids)
            assert r.usage.prompt_tokens == engine.last_stats.prompt_tokens
            answers[fps] = r.usage.prompt_tokens
        assert answers[1.0] < answers[2.0]  # twice the rate, more frame pairs
    finally:
        server.stop()
        engine.close()


def test_eval_runs_on_qwen25(ckpt, tmp_path):
    from qvl.bench import eval as ev
    from qvl.export import synth

    data = synth.write_dataset(tmp_path / "synth", n=1, seed=1)
    summary = ev.evaluate([str(ckpt), f"{ckpt}@bfloat16"], data, out=tmp_path / "out", max_new_tokens=3,
                          in_process=True, plot=False)
    ref, bf16 = summary["models"]
    assert ref["rows"] and all(r.get("prediction") is not None for r in ref["rows"] if "error" not in r)
    assert bf16["kl"] is not None and bf16["kl"] >= 0 and bf16["kl_tokens"] > 0
