"""`qvl serve`: a real server process on a free loopback port, driven with the official openai client.

Two servers run for the module: A (4 slots, an API key, file:// under one directory, remote
fetching on with private addresses refused, a 1 MiB body limit) and B (one slot, no queue, a 3 s
request timeout, private addresses allowed). Answers are checked against ``engine.generate`` on
the same conversation in this process.
"""

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

import qvl

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "test-key"
NAME = "tiny"
N_NEW = 12
TIMEOUT_B = 3.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, ckpt, log_path, *flags):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "qvl.cli", "serve", str(ckpt), "--port", str(self.port),
                                      "--served-model-name", NAME, *flags], stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout=90.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited ({self.proc.returncode}):\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        pytest.fail(f"server not ready in {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def client(self, key=KEY, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def metric(self, name: str) -> float:
        text = httpx.get(self.base + "/metrics", timeout=5).text
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert m, f"{name} not in /metrics"
        return float(m.group(1))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _png(w, h, seed) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(_png(56, 84, 1))
    (root / "outside.png").write_bytes(_png(28, 28, 2))
    (allowed / "link.png").symlink_to(root / "outside.png")
    from qvl.scripts.sample_videos import moving_squares, write_video

    write_video(allowed / "clip.mp4", moving_squares(8, 56, 56), fps=4)
    return allowed


@pytest.fixture(scope="module")
def servers(tiny_ckpt, media, tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve-logs")
    a = Server(tiny_ckpt, logs / "a.log", "--max-batch", "4", "--max-queue", "8", "--max-seq-len", "1024",
               "--api-key", KEY, "--allowed-local-media-path", str(media), "--allow-remote", "--max-body-mb", "1")
    b = Server(tiny_ckpt, logs / "b.log", "--max-batch", "1", "--max-queue", "0", "--max-seq-len", "8192",
               "--request-timeout", str(TIMEOUT_B), "--allow-remote", "--allow-private-addresses")
    try:
        a.wait_ready()
        b.wait_ready()
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    e = qvl.load(tiny_ckpt, max_seq_len=1024, max_batch=4)
    yield e
    e.close()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _conversations(media):
    """(OpenAI messages, the same conversation in qvl's message form)."""
    data = _data_uri(_png(84, 56, 7))
    path = str(media / "a.png")
    return [
        ([{"role": "user", "content": "Say something."}], [{"role": "user", "content": "Say something."}]),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data}},
                                       {"type": "text", "text": "What is this?"}]}],
         [{"role": "user", "content": [{"type": "image", "image": data}, {"type": "text", "text": "What is this?"}]}]),
        ([{"role": "system", "content": "Be brief."},
          {"role": "user", "content": [{"type": "text", "text": "Look:"},
                                       {"type": "image_url", "image_url": {"url": "file://" + path}}]},
          {"role": "assistant", "content": "A picture."},
          {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data}},
                                       {"type": "text", "text": "And this one?"}]}],
         [{"role": "system", "content": "Be brief."},
          {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image", "image": path}]},
          {"role": "assistant", "content": "A picture."},
          {"role": "user", "content": [{"type": "image", "image": data}, {"type": "text", "text": "And this one?"}]}]),
    ]


def test_greedy_answers_equal_generate(servers, engine, media):
    client = servers[0].client()
    for oa, conv in _conversations(media):
        r = client.chat.completions.create(model=NAME, messages=oa, max_tokens=N_NEW, temperature=0)
        ids = engine.generate_ids(conv, max_new_tokens=N_NEW)
        assert r.choices[0].message.content == engine.tokenizer.decode(ids)
        assert r.choices[0].message.role == "assistant"
        assert r.usage.completion_tokens == len(ids)
        assert r.usage.prompt_tokens == engine.last_stats.prompt_tokens
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert 0 <= r.usage.prompt_tokens_details.cached_tokens < r.usage.prompt_tokens
        assert r.choices[0].finish_reason == ("length" if len(ids) == N_NEW else "stop")
        # asked again: the prefix cache holds all of the prompt but the token that picks the answer
        again = client.chat.completions.create(model=NAME, messages=oa, max_tokens=N_NEW, temperature=0)
        assert again.choices[0].message.content == r.choices[0].message.content
        assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1


def test_a_video_url_answers_as_generate(servers, engine, media):
    path = str(media / "clip.mp4")
    oa = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "file://" + path}},
                                       {"type": "text", "text": "What moves?"}]}]
    conv = [{"role": "user", "content": [{"type": "video", "video": path}, {"type": "text", "text": "What moves?"}]}]
    r = servers[0].client().chat.completions.create(model=NAME, messages=oa, max_tokens=N_NEW, temperature=0)
    ids = engine.generate_ids(conv, max_new_tokens=N_NEW)
    assert r.choices[0].message.content == engine.tokenizer.decode(ids)
    assert r.usage.prompt_tokens == engine.last_stats.prompt_tokens


def test_streamed_text_equals_non_streamed(servers, media):
    client = servers[0].client()
    for oa, _ in _conversations(media)[:2]:
        for sampling in ({"temperature": 0}, {"temperature": 0.9, "top_p": 0.8, "seed": 5}):
            full = client.chat.completions.create(model=NAME, messages=oa, max_tokens=N_NEW, **sampling)
            chunks = list(client.chat.completions.create(model=NAME, messages=oa, max_tokens=N_NEW, stream=True,
                                                         stream_options={"include_usage": True}, **sampling))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == full.choices[0].message.content
            assert chunks[0].choices[0].delta.role == "assistant"
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
            assert all(c.usage is None for c in chunks[:-1])


def test_stop_and_pixel_limits(servers, engine, media):
    client = servers[0].client()
    oa, conv = _conversations(media)[1]
    full = engine.generate(conv, max_new_tokens=N_NEW)
    stop = full[3:5]
    r = client.chat.completions.create(model=NAME, messages=oa, max_tokens=N_NEW, temperature=0, stop=[stop])
    assert r.choices[0].message.content == engine.generate(conv, max_new_tokens=N_NEW, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    data = _data_uri(_png(224, 168, 4))
    oa = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data}}]}]
    sizes = []
    for kw in ({}, {"max_pixels": 28 * 28 * 4}):
        r = client.chat.completions.create(model=NAME, messages=oa, max_tokens=2, temperature=0,
                                           extra_body={"mm_processor_kwargs": kw})
        engine.generate([{"role": "user", "content": [{"type": "image", "image": data, **kw}]}], max_new_tokens=2)
        assert r.usage.prompt_tokens == engine.last_stats.prompt_tokens
        sizes.append(r.usage.prompt_tokens)
    assert sizes[1] < sizes[0]


def test_eight_concurrent_clients(servers, engine):
    convs = [[{"role": "user", "content": f"Tell me about number {i}."}] for i in range(8)]
    expected = engine.generate(convs, max_new_tokens=N_NEW)
    got: dict = {}

    def one(i):
        client = servers[0].client()
        kw = dict(model=NAME, messages=convs[i], max_tokens=N_NEW, temperature=0)
        if i % 2:
            got[i] = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw))
        else:
            got[i] = client.chat.completions.create(**kw).choices[0].message.content

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [got.get(i) for i in range(8)] == expected


def _refused(call, status):
    with pytest.raises(openai.APIStatusError) as e:
        call()
    assert e.value.status_code == status, e.value.body
    return e.value


def test_auth_model_and_unsupported_fields(servers):
    a = servers[0]
    msgs = [{"role": "user", "content": "hi"}]
    err = _refused(lambda: a.client(key="wrong").chat.completions.create(model=NAME, messages=msgs), 401)
    assert err.body["code"] == "invalid_api_key"
    r = httpx.post(a.base + "/v1/chat/completions", json={"model": NAME, "messages": msgs}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    _refused(lambda: a.client(key="wrong").models.list(), 401)
    assert [m.id for m in a.client().models.list()] == [NAME]
    err = _refused(lambda: a.client().chat.completions.create(model="gpt-4o", messages=msgs), 404)
    assert err.body["param"] == "model" and err.body["code"] == "model_not_found"
    create = a.client().chat.completions.create
    for extra, param in (({"logprobs": True}, "logprobs"), ({"n": 2}, "n"), ({"presence_penalty": 0.5},
                         "presence_penalty"), ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                         ({"temperature": 5}, "temperature"), ({"max_tokens": 0}, "max_tokens"),
                         ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
                         ({"extra_body": {"mm_processor_kwargs": {"size": 3}}}, "mm_processor_kwargs.size")):
        err = _refused(lambda: create(model=NAME, messages=msgs, **{"max_tokens": 2, **extra}), 400)
        assert err.body["param"] == param and err.body["type"] == "invalid_request_error", err.body
    bad = [{"role": "tool", "content": "x"}]
    assert _refused(lambda: create(model=NAME, messages=bad), 400).body["param"] == "messages[0].role"
    r = create(model=NAME, messages=msgs, max_tokens=2, n=1, logprobs=False, presence_penalty=0, user="u")
    assert r.choices[0].message.content is not None


def test_media_sources_refused(servers, media, http_server):
    create = servers[0].client().chat.completions.create
    root, base = http_server
    (root / "x.png").write_bytes(_png(28, 28, 3))
    outside = media.parent / "outside.png"
    for url in ("file://" + str(outside), f"file://{media}/../outside.png", f"file://{media}/link.png",
                str(media / "a.png"), "file://" + str(media / "missing.png"), "ftp://example.com/x.png",
                f"{base}/x.png", "http://169.254.169.254/latest/meta-data"):
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
        err = _refused(lambda: create(model=NAME, messages=msgs, max_tokens=2), 400)
        assert err.body["param"] in ("messages[0].content[0].image_url.url", "messages"), (url, err.body)
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"{base}/x.png"}}]}]
    assert "non-public" in _refused(lambda: create(model=NAME, messages=msgs, max_tokens=2), 400).body["message"]
    # B allows private addresses: the same local URL is fetched
    r = servers[1].client().chat.completions.create(model=NAME, messages=msgs, max_tokens=2)
    assert r.usage.prompt_tokens > 10


def test_body_json_and_length_errors(servers):
    a = servers[0]
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = a.base + "/v1/chat/completions"
    big = json.dumps({"model": NAME, "messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    r = httpx.post(url, content=big, headers=h, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(url, content=b"{not json", headers=h, timeout=30)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    long = [{"role": "user", "content": "word " * 2000}]
    err = _refused(lambda: a.client().chat.completions.create(model=NAME, messages=long, max_tokens=2), 400)
    assert err.body["code"] == "context_length_exceeded"
    r = httpx.get(a.base + "/nope", timeout=5)
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(a.base + "/health", timeout=5).json() == {"status": "ok"}


def _answers_as_generate(client, engine, msgs):
    """The server has room again, and a freed slot holds nothing of the request that left it."""
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=4, temperature=0)
    assert r.choices[0].message.content == engine.generate(msgs, max_new_tokens=4)


def test_busy_429_and_disconnect_frees_the_slot(servers, engine):
    b = servers[1]
    client = b.client()
    msgs = [{"role": "user", "content": "Go on and on."}]
    cancelled0 = b.metric('qvl_requests_total{outcome="cancelled"}')
    stream = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=7000, stream=True,
                                            extra_body={"ignore_eos": True})
    it = iter(stream)
    while not (next(it).choices[0].delta.content):
        pass
    assert b.metric("qvl_slots_in_use") == 1
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model=NAME, messages=msgs, max_tokens=2)
    assert e.value.response.headers["retry-after"] == "1"
    assert b.metric('qvl_requests_total{outcome="busy"}') >= 1
    stream.close()  # the client goes away: its request is cancelled, the slot freed well before the timeout
    deadline = time.monotonic() + TIMEOUT_B - 0.5
    while b.metric("qvl_slots_in_use") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b.metric("qvl_slots_in_use") == 0
    assert b.metric('qvl_requests_total{outcome="cancelled"}') == cancelled0 + 1
    _answers_as_generate(client, engine, msgs)


def test_request_timeout_frees_the_slot(servers, engine):
    b = servers[1]
    client = b.client()
    msgs = [{"role": "user", "content": "Go on and on."}]
    kw = dict(model=NAME, messages=msgs, max_tokens=7000, extra_body={"ignore_eos": True})
    t0 = time.monotonic()
    err = _refused(lambda: client.chat.completions.create(**kw), 504)
    assert TIMEOUT_B - 0.1 < time.monotonic() - t0 < TIMEOUT_B + 5
    assert err.body["code"] == "request_timeout"
    with pytest.raises(openai.APIError, match="limit"):
        for _ in client.chat.completions.create(stream=True, **kw):
            pass
    assert b.metric('qvl_requests_total{outcome="timeout"}') == 2
    _answers_as_generate(client, engine, msgs)
    text = httpx.get(b.base + "/metrics", timeout=5).text
    for name in ("qvl_queue_depth", "qvl_slots_total 1", "qvl_generation_tokens_per_second",
                 'qvl_time_to_first_token_seconds_bucket{le="+Inf"}', "qvl_request_latency_seconds_count"):
        assert name in text
    # one slot: every decode step carried one request, and the engine's own count is what is exposed
    assert b.metric('qvl_decode_steps_total{rows="1"}') > 0 and 'rows="2"' not in text
    assert b.metric('qvl_decode_step_seconds_total{rows="1"}') > 0


def test_internal_error_hides_the_traceback():
    from starlette.testclient import TestClient

    from qvl.runtime.server import ServeSettings, create_app

    class Broken:
        def submit(self, *a, **kw):
            raise RuntimeError("secret detail at /srv/model")

    app = create_app(Broken(), ServeSettings(model_name=NAME))
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "internal_error"
    assert "secret" not in r.text and "Traceback" not in r.text


def test_library_does_not_import_the_server_stack(tiny_ckpt):
    code = ("import sys, qvl\n"
            f"e = qvl.load({str(tiny_ckpt)!r}, max_seq_len=256)\n"
            "e.generate([{'role': 'user', 'content': 'hi'}], max_new_tokens=2)\n"
            "bad = [m for m in ('fastapi', 'uvicorn', 'pydantic', 'starlette') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
