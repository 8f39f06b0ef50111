"""Prefix and vision-embedding caches: answers with the caches on equal the answers with them off.

Reference: the same engine options with both caches off, which prefills every prompt in full
(shown equal to transformers in test_generate.py and test_video_generate.py). Greedy tokens must
be identical; cached token counts are checked against the common prefix of the two prompts' ids
(vision placeholders compared by their picture), computed here from the tokenizer alone.
"""

import numpy as np
import pytest
import torch
from PIL import Image

import qvl
from qvl.runtime.prefix_cache import PrefixCache, VisionCache, common_prefix
from qvl.scripts.sample_videos import moving_squares

N_NEW = 10
SYSTEM = {"role": "system", "content": "You steer a small robot arm. Answer in one short line. " * 8}


def _image(seed, w=56, h=84):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _frame(seed, question="Where is the cup?"):
    return [SYSTEM, {"role": "user", "content": [{"type": "image", "image": _image(seed)},
                                                 {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def engines(tiny_ckpt):
    on = qvl.load(tiny_ckpt, max_seq_len=1024, max_batch=4, prefix_cache_mb=64, vision_cache_mb=16)
    off = qvl.load(tiny_ckpt, max_seq_len=1024, max_batch=4, prefix_cache_mb=0, vision_cache_mb=0)
    yield on, off
    on.close()
    off.close()


def _ids(engine, conv):
    return engine._request(conv, False).ids


def test_common_prefix():
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2, 3], [1, 2, 3]) == 3
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([b"a", b"a", 7], [b"a", b"b", 7]) == 1
    for n in range(0, 40):
        a = list(range(50))
        b = a[:n] + [-1] + a[n + 1 :]
        assert common_prefix(a, b) == n


def test_a_loop_of_frames_reuses_the_instructions(engines):
    on, off = engines
    first = _ids(on, _frame(0))
    image_start = first.index(on.image_token_id)
    for i, seed in enumerate([0, 1, 2, 1]):
        conv = _frame(seed)
        assert on.generate(conv, max_new_tokens=N_NEW) == off.generate(conv, max_new_tokens=N_NEW)
        st = on.last_stats
        if i == 0:
            continue
        if seed == 1 and i == 3:  # the same frame again: the cached rows run through the picture
            assert st.cached_tokens > image_start and st.vision_s == 0
        else:  # a new frame: everything before the picture, nothing of it
            assert st.cached_tokens == image_start
            assert st.vision_s > 0


def test_a_chat_resending_one_image_prefills_only_the_new_turn(engines):
    on, off = engines
    hist = [{"role": "user", "content": [{"type": "image", "image": _image(7)}, {"type": "text", "text": "Describe."}]}]
    prev_ids = None
    for turn in range(4):
        a = on.generate(hist, max_new_tokens=N_NEW)
        assert a == off.generate(hist, max_new_tokens=N_NEW)
        st, ids = on.last_stats, _ids(on, hist)
        if prev_ids is not None:
            # the turn before was prompt + answer; all of it that this prompt repeats is cached
            assert st.cached_tokens >= common_prefix(ids, prev_ids) and st.vision_s == 0
            assert st.cached_tokens < len(ids)
        prev_ids = ids
        hist = hist + [{"role": "assistant", "content": a}, {"role": "user", "content": f"And then {turn}?"}]


def test_video_and_batches_answer_the_same(engines):
    on, off = engines
    frames = [Image.fromarray(f) for f in moving_squares(4, 56, 56)]
    video = [SYSTEM, {"role": "user", "content": [{"type": "video", "video": frames},
                                                  {"type": "text", "text": "What moves?"}]}]
    convs = [video, _frame(3), video, _frame(3, "Is it red?"), _frame(4)]
    for _ in range(2):  # the second round runs from the caches the first filled
        assert on.generate(convs, max_new_tokens=N_NEW) == off.generate(convs, max_new_tokens=N_NEW)
    assert on.generate(video, max_new_tokens=N_NEW) == off.generate(video, max_new_tokens=N_NEW)
    assert on.last_stats.cached_tokens == len(_ids(on, video)) - 1


def test_the_vision_cache_skips_the_tower_for_a_picture_seen_before(engines, monkeypatch):
    on, off = engines
    runner = on._core.runner
    calls = []
    encode = runner.tower.encode
    monkeypatch.setattr(runner.tower, "encode", lambda *a, **kw: calls.append(1) or encode(*a, **kw))
    img = _image(11)
    a = [{"role": "user", "content": [{"type": "text", "text": "Look at this one."}, {"type": "image", "image": img}]}]
    b = [{"role": "user", "content": [{"type": "text", "text": "A different question first, then"},
                                      {"type": "image", "image": img}]}]
    assert on.generate(a, max_new_tokens=N_NEW) == off.generate(a, max_new_tokens=N_NEW)
    n = len(calls)
    hits = runner.vision_cache.hits
    assert on.generate(b, max_new_tokens=N_NEW) == off.generate(b, max_new_tokens=N_NEW)
    assert runner.vision_cache.hits == hits + 1
    assert len(calls) == n  # the picture's embeddings came from the cache, the tower did not run


def test_scores_and_prompt_logprobs_are_unchanged(engines):
    on, off = engines
    conv = _frame(5)
    ids = on.generate_ids(conv, max_new_tokens=N_NEW)
    torch.testing.assert_close(on.score(conv, ids), off.score(conv, ids), rtol=1e-4, atol=1e-4)
    rows_on, t_on = on.text_logprobs(conv, ids)
    rows_off, t_off = off.text_logprobs(conv, ids)
    assert torch.equal(t_on, t_off)
    torch.testing.assert_close(rows_on, rows_off, rtol=1e-4, atol=1e-4)


class _Cache:
    def __init__(self, n):
        self.k = torch.arange(2 * 2 * n * 4, dtype=torch.float32).reshape(2, 2, n, 4)
        self.v = -self.k


def test_prefix_store_keeps_to_its_budget_and_evicts_least_recently_used():
    caches = [_Cache(64) for _ in range(3)]
    per_token = 3 * 2 * 2 * 4 * 4  # layers * (k, v) * heads * dim * fp32
    cache = PrefixCache(budget_bytes=per_token * 50, min_tokens=4)
    cache.store(list(range(20)), caches, row=0)
    cache.store([100 + i for i in range(20)], caches, row=1)
    assert len(cache) == 2 and cache.nbytes == per_token * 40
    assert cache.lookup(list(range(10)) + [-1])[1] == 10  # touches the first: now the second is oldest
    cache.store([200 + i for i in range(20)], caches, row=0)
    assert cache.nbytes <= cache.budget and len(cache) == 2
    assert cache.lookup([100 + i for i in range(20)]) == (None, 0)  # evicted
    assert cache.lookup(list(range(20)))[1] == 20
    # an entry that extends one held replaces it; one held already is not copied again
    cache.store(list(range(30)), caches, row=0)
    assert len(cache) == 2 and cache.lookup(list(range(30)))[1] == 30
    before = cache.nbytes
    cache.store(list(range(25)), caches, row=0)
    assert cache.nbytes == before
    # what comes back is what the slot held
    entry, n = cache.lookup(list(range(30)))
    PrefixCache.load(entry, n, [_Cache(64) for _ in range(3)], row=1)
    target = [_Cache(64) for _ in range(3)]
    for c in target:
        c.k.zero_()
    PrefixCache.load(entry, 12, target, row=1)
    assert torch.equal(target[0].k[1, :, :12], caches[0].k[0, :, :12])
    assert not target[0].k[1, :, 12:].any()
    assert cache.lookup([5, 6, 7, 8, 9]) == (None, 0)
    tiny = PrefixCache(budget_bytes=per_token * 5, min_tokens=4)
    tiny.store(list(range(20)), caches, row=0)  # bigger than the whole budget: not kept
    assert len(tiny) == 0 and tiny.nbytes == 0


def test_vision_cache_budget():
    vc = VisionCache(budget_bytes=3 * 400)
    for i in range(5):
        vc.put(bytes([i]), torch.zeros(10, 10))
    assert len(vc) == 3 and vc.nbytes == 1200
    assert vc.get(bytes([0])) is None and vc.get(bytes([4])) is not None
    vc.put(b"big", torch.zeros(100, 100))
    assert vc.get(b"big") is None


def test_a_session_answers_as_generate_and_keeps_its_instructions_cached(engines):
    on, off = engines
    loop = on.session(system=SYSTEM["content"], warm=True, max_new_tokens=N_NEW)
    for seed in (20, 21):
        answer = loop.ask("Where is the cup?", _image(seed))
        assert answer == off.generate(_frame(seed), max_new_tokens=N_NEW)
        image_start = _ids(on, _frame(seed)).index(on.image_token_id)
        assert loop.last_stats.cached_tokens == image_start  # warm: the first frame too
    assert loop.turns == []
    chat = on.session(history=True, max_new_tokens=N_NEW)
    first = chat.ask("Describe.", [{"image": _image(22), "max_pixels": 56 * 56}])
    second = chat.ask("Anything else?")
    hist = [{"role": "user", "content": [{"type": "image", "image": _image(22), "max_pixels": 56 * 56},
                                         {"type": "text", "text": "Describe."}]}]
    assert first == off.generate(hist, max_new_tokens=N_NEW)
    hist += [{"role": "assistant", "content": first}, {"role": "user", "content": [{"type": "text",
                                                                                   "text": "Anything else?"}]}]
    assert second == off.generate(hist, max_new_tokens=N_NEW)
    assert chat.last_stats.cached_tokens > len(_ids(on, hist[:1]))
    chat.reset()
    assert chat.turns == []


def test_the_robot_loop_script_runs_on_a_video(tiny_ckpt, tmp_path, capsys):
    pytest.importorskip("av")
    from qvl.scripts import robot_loop
    from qvl.scripts.sample_videos import write_video

    clip = tmp_path / "clip.mp4"
    write_video(clip, moving_squares(6, 56, 56), fps=4)
    assert robot_loop.main([str(tiny_ckpt), "--video", str(clip), "--every", "2", "--frames", "3",
                            "--max-new-tokens", "4", "--max-pixels", str(56 * 56)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[1:-1]]
    assert [r[0] for r in rows] == ["0", "1", "2"]
    assert all(int(r[3]) > 0 for r in rows)  # every frame found the warm instructions
    assert lines[-1].startswith("median: time to first token")
