"""The serving core: many threads, one engine, answers equal to one-by-one.

One-by-one answers are the reference (test_generate.py and test_video_generate.py show them
equal to transformers). Concurrent requests share the KV cache's slots, decode together and
prefill in chunks between decode steps; greedy tokens must be identical to running each request
alone, seeded sampling too, and a request that fails or is cancelled must leave the others as
they would have been.
"""

import gc
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import qvl
from qvl.scripts.sample_videos import moving_squares

N_NEW = 12


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _text(s):
    return [{"role": "user", "content": [{"type": "text", "text": s}]}]


@pytest.fixture(scope="module")
def convs(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    paths = []
    for i, (w, h) in enumerate([(112, 84), (56, 140), (84, 84)]):
        p = d / f"{i}.png"
        _image(w, h, i).save(p)
        paths.append(str(p))
    frames = [Image.fromarray(f) for f in moving_squares(4, 56, 56)]
    return {
        "text_short": _text("Hi."),
        "text_long": _text("Tell me a long story about robots that learn to count. " * 6),
        "image": [{"role": "user", "content": [{"type": "image", "image": paths[0]},
                                               {"type": "text", "text": "Describe this."}]}],
        "multi_image": [{"role": "user", "content": [{"type": "image", "image": paths[1]},
                                                     {"type": "image", "image": paths[2]},
                                                     {"type": "text", "text": "Compare them."}]}],
        "video": [{"role": "user", "content": [{"type": "video", "video": frames},
                                               {"type": "text", "text": "What moves?"}]}],
        "multi_turn": [{"role": "user", "content": [{"type": "image", "image": paths[2]},
                                                    {"type": "text", "text": "What is it?"}]},
                       {"role": "assistant", "content": "A square."},
                       {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]}],
    }


# (conversation, max_new_tokens, sampling): different lengths, greedy and seeded sampling
JOBS = [("text_short", 12, {}), ("image", 9, {"temperature": 0.8, "seed": 1}), ("multi_image", 15, {}),
        ("video", 7, {"temperature": 1.0, "top_k": 20, "seed": 2}), ("text_long", 12, {"repetition_penalty": 1.3}),
        ("multi_turn", 10, {"temperature": 0.7, "top_p": 0.9, "seed": 3}), ("image", 5, {}), ("video", 11, {})]


@pytest.fixture(scope="module")
def alone(tiny_ckpt, convs):
    eng = qvl.load(tiny_ckpt, max_seq_len=512, max_batch=1)
    return {i: eng.generate_ids(convs[name], max_new_tokens=n, ignore_eos=True, **kw)
            for i, (name, n, kw) in enumerate(JOBS)}


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    # a small prefill chunk: every image prompt is prefilled in several chunks between decode steps
    return qvl.load(tiny_ckpt, max_seq_len=512, max_batch=4, prefill_chunk=16)


def _run_threads(fn, n):
    out, errors = {}, []

    def work(i):
        try:
            out[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append((i, e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for i, t in enumerate(threads):
        t.start()
        time.sleep(0.003 * (i % 3))  # staggered: some arrive while others decode
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return out


def _free(engine, timeout=10.0):
    """Wait until every slot is free and nobody waits (the loop frees them between steps)."""
    sch = engine._core.scheduler
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sch.live():
            return True
        time.sleep(0.01)
    return False


def test_concurrent_threads_equal_one_by_one(engine, convs, alone, monkeypatch):
    runner = engine._core.runner
    sizes, chunks, real_decode, real_prefill = [], [], runner.decode, runner.prefill_step

    def decode(live, lengths):
        sizes.append(len(live))
        return real_decode(live, lengths)

    def prefill_step(seq):  # a prefill item taken while other requests decode
        chunks.append(bool(engine._core.scheduler.decoding()))
        return real_prefill(seq)

    monkeypatch.setattr(runner, "decode", decode)
    monkeypatch.setattr(runner, "prefill_step", prefill_step)
    got = _run_threads(lambda i: engine.generate_ids(convs[JOBS[i][0]], max_new_tokens=JOBS[i][1],
                                                     ignore_eos=True, **JOBS[i][2]), len(JOBS))
    assert got == alone
    assert max(sizes) >= 2 and any(chunks)  # rows decoded together; prefill between their steps
    assert _free(engine)


def test_all_slots_decode_together(engine, convs, alone, monkeypatch):
    """Four requests admitted at once fill the four slots and decode as one batch of 4."""
    sch, runner = engine._core.scheduler, engine._core.runner
    sizes, real_admit, real_decode = [], sch.admit, runner.decode
    held = threading.Event()

    def admit():  # hold the first admission until all four wait
        deadline = time.monotonic() + 10
        while not held.is_set() and len(sch.waiting) < 4 and time.monotonic() < deadline:
            time.sleep(0.005)
        held.set()
        return real_admit()

    def decode(live, lengths):
        sizes.append(len(live))
        return real_decode(live, lengths)

    monkeypatch.setattr(sch, "admit", admit)
    monkeypatch.setattr(runner, "decode", decode)
    kw = [dict(max_new_tokens=JOBS[i][1], ignore_eos=True, **JOBS[i][2]) for i in range(4)]
    handles = [engine.submit(convs[JOBS[i][0]], max_new_tokens=40, ignore_eos=True, **JOBS[i][2])
               for i in range(4)]
    got = [h.result()[: kw[i]["max_new_tokens"]] for i, h in enumerate(handles)]
    assert got == [alone[i] for i in range(4)]
    assert max(sizes) == 4


@pytest.mark.parametrize("decode_kv", ["full", "live"])
def test_fixed_shape_step_equals_the_live_prefix_step(tiny_ckpt, convs, alone, decode_kv):
    eng = qvl.load(tiny_ckpt, max_seq_len=512, max_batch=4, decode_kv=decode_kv)
    assert eng._core.runner.decode_kv == decode_kv
    got = _run_threads(lambda i: eng.generate_ids(convs[JOBS[i][0]], max_new_tokens=JOBS[i][1],
                                                  ignore_eos=True, **JOBS[i][2]), 4)
    assert got == {i: alone[i] for i in range(4)}


def test_fixed_shape_logits_match_at_tolerance(tiny_ckpt, convs):
    """Teacher-forced rows through decode steps: full-buffer mask vs longest-live-prefix, fp32."""
    answer = list(range(20, 40))
    rows = {}
    for kv in ("full", "live"):
        eng = qvl.load(tiny_ckpt, max_seq_len=512, max_batch=2, decode_kv=kv)
        rows[kv] = eng.score(convs["image"], answer)
    torch.testing.assert_close(rows["full"], rows["live"], atol=1e-5, rtol=1e-5)


def test_chunked_prefill_equals_one_pass(tiny_ckpt, convs):
    one = qvl.load(tiny_ckpt, max_seq_len=512, prefill_chunk=4096)
    chunked = qvl.load(tiny_ckpt, max_seq_len=512, prefill_chunk=7)
    for name in ("image", "video", "text_long"):
        answer = one.generate_ids(convs[name], max_new_tokens=8, ignore_eos=True)
        assert chunked.generate_ids(convs[name], max_new_tokens=8, ignore_eos=True) == answer
        torch.testing.assert_close(chunked.score(convs[name], answer), one.score(convs[name], answer),
                                   atol=1e-5, rtol=1e-5)
        a, ta = one.text_logprobs(convs[name], answer)
        b, tb = chunked.text_logprobs(convs[name], answer)
        assert torch.equal(ta, tb)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_seeded_sampling_is_the_same_alone_and_with_neighbours(engine, convs, alone):
    kw = dict(max_new_tokens=9, ignore_eos=True, temperature=0.8, seed=1)
    neighbours = [engine.submit(convs["text_long"], max_new_tokens=20, ignore_eos=True, temperature=1.0, seed=s)
                  for s in range(3)]
    assert engine.generate_ids(convs["image"], **kw) == alone[1]
    for h in neighbours:
        h.result()


def test_cancel_mid_stream_frees_the_slot_and_the_others_go_on(engine, convs, alone):
    others = [engine.submit(convs[JOBS[i][0]], max_new_tokens=JOBS[i][1], ignore_eos=True, **JOBS[i][2])
              for i in (0, 2)]
    victim = engine.submit(convs["text_long"], max_new_tokens=400, ignore_eos=True)
    it = iter(victim)
    for _ in range(3):
        next(it)
    victim.cancel()
    assert victim.finish_reason in (None, "cancelled")
    assert [h.result() for h in others] == [alone[0], alone[2]]
    assert len(victim.result()) < 400
    assert victim.finish_reason == "cancelled"
    assert _free(engine)


def test_an_abandoned_stream_cancels_its_request(engine, convs):
    gen = engine.stream(convs["text_long"], max_new_tokens=400, ignore_eos=True)
    next(gen)
    del gen
    gc.collect()
    assert _free(engine)


def test_a_dropped_handle_cancels_its_request(engine, convs):
    engine.submit(convs["text_long"], max_new_tokens=400, ignore_eos=True)
    gc.collect()
    assert _free(engine)


def test_two_streams_consumed_in_turn_in_one_thread(engine, convs, alone):
    a = engine.stream(convs["text_short"], max_new_tokens=12, ignore_eos=True)
    b = engine.stream(convs["multi_image"], max_new_tokens=15, ignore_eos=True)
    pieces = {"a": [], "b": []}
    live = {"a": a, "b": b}
    while live:  # one piece from each in turn
        for k in list(live):
            try:
                pieces[k].append(next(live[k]))
            except StopIteration:
                del live[k]
    tok = engine.tokenizer
    assert "".join(pieces["a"]) == tok.decode(alone[0])
    assert "".join(pieces["b"]) == tok.decode(alone[2])


def test_a_failing_request_leaves_the_others_intact(tiny_ckpt, convs, alone):
    eng = qvl.load(tiny_ckpt, max_seq_len=512, max_batch=4, prefill_chunk=16)
    tower = eng.model.visual
    real = tower.encode

    def encode(pv, grid):  # the multi-image prompt's first picture breaks the tower
        if grid.tolist()[0] == [1, 10, 4]:
            raise RuntimeError("tower failure for this request")
        return real(pv, grid)

    tower.encode = encode
    good = [eng.submit(convs[JOBS[i][0]], max_new_tokens=JOBS[i][1], ignore_eos=True, **JOBS[i][2])
            for i in (0, 1, 3)]
    bad = eng.submit(convs["multi_image"], max_new_tokens=5)
    with pytest.raises(RuntimeError, match="tower failure"):
        bad.result()
    assert bad.finish_reason == "error"
    assert [h.result() for h in good] == [alone[0], alone[1], alone[3]]
    assert _free(eng)


def test_a_prompt_over_the_cache_fails_alone_with_a_clear_error(tiny_ckpt, convs, alone):
    eng = qvl.load(tiny_ckpt, max_seq_len=128, max_batch=2)
    running = eng.submit(convs["text_short"], max_new_tokens=12, ignore_eos=True)
    with pytest.raises(qvl.PromptTooLongError, match="does not fit the KV cache"):
        eng.submit(convs["text_long"] * 3)
    with pytest.raises(ValueError, match="no such file|does not exist|not found"):
        eng.submit([{"role": "user", "content": [{"type": "image", "image": "/nonexistent/x.png"},
                                                 {"type": "text", "text": "?"}]}])
    assert running.result() == alone[0]


def test_the_queue_bound_holds(tiny_ckpt, convs):
    eng = qvl.load(tiny_ckpt, max_seq_len=512, max_batch=1, max_queue=2)
    gate = threading.Event()
    runner = eng._core.runner
    real = runner.start

    def start(seq):  # hold the loop at the first admission, so nothing leaves the queue
        gate.wait(30)
        real(seq)

    runner.start = start
    handles = [eng.submit(convs["text_short"], max_new_tokens=3, ignore_eos=True) for _ in range(3)]
    with pytest.raises(qvl.QueueFullError, match="max_queue=2"):
        eng.submit(convs["text_short"], max_new_tokens=3)
    # refused before its pictures are read: a file that does not exist is never looked at
    with pytest.raises(qvl.QueueFullError):
        eng.submit([{"role": "user", "content": [{"type": "image", "image": "/nonexistent/x.png"}]}])
    state = eng.state()  # the loop may not have admitted the first one yet
    assert state["running"] and state["slots_total"] == 1 and state["queue_depth"] + state["slots_in_use"] == 3
    gate.set()
    assert all(len(h.result()) == 3 for h in handles)
    # a list longer than slots + queue waits for its own answers instead of failing
    many = eng.generate_ids([convs["text_short"]] * 7, max_new_tokens=3, ignore_eos=True)
    assert many == [handles[0].result()] * 7


def test_stop_strings_cut_the_answer(engine, convs, alone):
    text = engine.tokenizer.decode(alone[2])
    assert len(text) > 4
    stop = text[3:5]
    cut = text[: text.index(stop)]
    assert engine.generate(convs["multi_image"], max_new_tokens=15, ignore_eos=True, stop=[stop]) == cut
    assert "".join(engine.stream(convs["multi_image"], max_new_tokens=15, ignore_eos=True, stop=stop)) == cut


def test_per_request_stats(engine, convs):
    conv = [{"role": "user", "content": [{"type": "image", "image": _image(70, 42, 99)},
                                         {"type": "text", "text": "Seen only here."}]}]
    for again in (False, True):
        h = engine.submit(conv, max_new_tokens=6, ignore_eos=True)
        ids = h.result()
        s = h.stats
        assert s.new_tokens == len(ids) == 6
        assert s.prompt_tokens == len(engine._request(conv, False).ids)
        assert 0 < s.prefill_s <= s.ttft_s and s.decode_tok_s > 0
        assert h.finish_reason == "length"
        if again:  # the prefix cache holds the whole prompt but its last token; the picture is not encoded
            assert s.cached_tokens == s.prompt_tokens - 1 and s.vision_s == 0
        else:
            assert s.vision_s > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_step_equals_the_eager_step(tiny_ckpt, convs):
    runs = {}
    for graphs in (False, True):
        eng = qvl.load(tiny_ckpt, device="cuda", max_seq_len=512, max_batch=4, cuda_graphs=graphs, decode_kv="full")
        runs[graphs] = _run_threads(lambda i: eng.generate_ids(convs[JOBS[i][0]], max_new_tokens=JOBS[i][1],
                                                               ignore_eos=True, **JOBS[i][2]), len(JOBS))
        runs[(graphs, "rows")] = eng.score(convs["image"], list(range(20, 40)))
        assert bool(eng._core.runner._graphs) == graphs
    assert runs[True] == runs[False]
    torch.testing.assert_close(runs[(True, "rows")], runs[(False, "rows")], atol=1e-5, rtol=1e-5)


def test_a_request_cancelled_while_waiting_never_runs(tiny_ckpt, convs, alone):
    eng = qvl.load(tiny_ckpt, max_seq_len=512, max_batch=1)
    gate, runner = threading.Event(), eng._core.runner
    started, real = [], runner.start

    def start(seq):
        started.append(seq.id)
        gate.wait(30)
        real(seq)

    runner.start = start
    first = eng.submit(convs["text_short"], max_new_tokens=12, ignore_eos=True)
    waiting = [eng.submit(convs["image"], max_new_tokens=5, ignore_eos=True) for _ in range(2)]
    last = eng.submit(convs["multi_image"], max_new_tokens=15, ignore_eos=True)
    for h in waiting:
        h.cancel()
    gate.set()
    assert first.result() == alone[0] and last.result() == alone[2]
    assert [h.result() for h in waiting] == [[], []]
    assert all(h.finish_reason == "cancelled" for h in waiting)
    assert started == [first.id, last.id]
    assert _free(eng)


def test_max_new_tokens_none_fills_the_cache(tiny_ckpt, convs):
    eng = qvl.load(tiny_ckpt, max_seq_len=64)
    prompt = len(eng._request(convs["text_short"], False).ids)
    h = eng.submit(convs["text_short"], max_new_tokens=None, ignore_eos=True)
    assert len(h.result()) == 64 - prompt and h.finish_reason == "length"
    eng.close()
    assert eng.state()["running"] is False
