"""``qvl serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one ``Engine``.

The event loop never runs model or preprocessing work: each request gets a thread that calls
``engine.submit`` (messages are fetched and preprocessed there) and iterates the handle, passing
its events to the loop through an asyncio queue. Requests share the engine's slots; a full queue
answers 429; a client that disconnects, or a request past the timeout, cancels its handle, which
frees its slot. Only ``qvl serve`` imports this module: the runtime never imports FastAPI.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qvl.runtime.media_policy import MediaPolicy, MediaRefused
from qvl.runtime.openai_api import ApiError, ChatRequest, parse_chat, submit_kwargs, to_messages
from qvl.runtime.serve_metrics import Metrics
from qvl.runtime.errors import PromptTooLongError, QueueFullError

log = logging.getLogger("qvl.serve")


@dataclass
class ServeSettings:
    model_name: str
    api_key: str | None = None
    media: MediaPolicy = field(default_factory=MediaPolicy)
    request_timeout_s: float = 600.0
    max_body_bytes: int = 32 << 20
    default_max_tokens: int = 512
    sampling_defaults: dict = field(default_factory=lambda: {"temperature": 1.0, "top_p": 1.0, "top_k": 0,
                                                             "repetition_penalty": 1.0})
    max_model_len: int | None = None


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _submit_error(e: BaseException) -> ApiError:
    """The answer for an exception ``engine.submit`` raised (in the caller's thread: bad input, busy)."""
    if isinstance(e, QueueFullError):
        return ApiError(429, "the server is busy (every slot taken, the queue full); retry later", None,
                        "rate_limit_exceeded", "rate_limit_error", {"Retry-After": "1"})
    if isinstance(e, MediaRefused):
        return ApiError(400, str(e), e.param)
    if isinstance(e, PromptTooLongError):
        return ApiError(400, str(e), "messages", "context_length_exceeded")
    if isinstance(e, ValueError):  # unreadable image, refused address, bad pixel limits, ...
        return ApiError(400, str(e), "messages")
    log.error("request failed before it ran", exc_info=e)
    return ApiError(500, "internal server error", kind="internal_error")


def _run_error(e: BaseException) -> ApiError:
    log.error("request failed in the engine", exc_info=e)
    return ApiError(500, f"the request failed while generating ({type(e).__name__})", kind="internal_error")


class _Timeout(Exception):
    pass


class _ClientGone(Exception):
    pass


class _Run:
    """One request's thread: submit, then the handle's events onto the loop's queue as
    ``("admitted", handle)``, ``("token", text)`` (text may be ""), ``("done", finish_reason)``
    or ``("error", exc)``."""

    def __init__(self, engine, messages, kwargs, metrics: Metrics, loop: asyncio.AbstractEventLoop):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handle = None
        self._engine, self._messages, self._kwargs, self._metrics, self._loop = engine, messages, kwargs, metrics, loop
        self._lock = threading.Lock()
        self._cancelled = False
        threading.Thread(target=self._pump, name="qvl-serve-request", daemon=True).start()

    def _put(self, *event) -> None:
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is gone
            self.cancel()

    def _pump(self) -> None:
        try:
            h = self._engine.submit(self._messages, **self._kwargs)
        except BaseException as e:  # noqa: BLE001 - every failure is an answer to the client
            self._put("error", e)
            return
        with self._lock:
            self.handle, cancelled = h, self._cancelled
        if cancelled:
            h.cancel()
        self._put("admitted", h)
        try:
            for tok, text in h:
                if tok is not None:
                    self._metrics.token()
                self._put("token", text)
            self._put("done", h.finish_reason)
        except BaseException as e:  # noqa: BLE001
            self._put("error", e)

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            h = self.handle
        if h is not None:
            h.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Exchange:
    """A running request as the loop sees it: its deadline, its client, its metrics."""

    def __init__(self, app_state, request: Request, run: _Run, t0: float):
        self.state, self.run, self.t0 = app_state, run, t0
        self.deadline = t0 + app_state.settings.request_timeout_s
        self.gone = asyncio.ensure_future(_disconnected(request))
        self.gone.add_done_callback(lambda t: t.cancelled() or run.cancel())
        self.started = self.ended = False
        self.first = None

    async def next(self):
        get = asyncio.ensure_future(self.run.queue.get())
        done, _ = await asyncio.wait({get, self.gone}, timeout=max(self.deadline - time.monotonic(), 0),
                                     return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            event = get.result()
            if event[0] == "admitted":
                self.started = True
                self.state.metrics.request_started()
            elif event[0] == "token" and self.first is None:
                self.first = time.monotonic()
                self.state.metrics.first_token(self.first - self.t0)
            return event
        get.cancel()
        self.run.cancel()
        raise _ClientGone() if self.gone in done else _Timeout()

    async def settle(self, within: float = 5.0) -> None:
        """Cancel the request and wait, bounded, until it has left the engine: the slot is free
        by the time the answer that follows reaches the client, so a retry finds room."""
        self.run.cancel()
        try:
            async with asyncio.timeout(within):
                while (await self.run.queue.get())[0] not in ("done", "error"):
                    pass
        except TimeoutError:
            log.warning("a stopped request still held its slot after %gs", within)

    def end(self, outcome: str) -> None:
        if self.ended:
            return
        self.ended = True
        self.gone.cancel()
        self.run.cancel()  # a no-op for a finished request; frees the slot of any other
        m = self.state.metrics
        if self.started:
            h = self.run.handle
            m.request_ended(outcome, time.monotonic() - self.t0, h.stats.prompt_tokens if h else 0)
        else:
            m.refused(outcome)


def _usage(h) -> dict:
    s = h.stats
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.new_tokens,
            "total_tokens": s.prompt_tokens + s.new_tokens, "prompt_tokens_details": {"cached_tokens": s.cached_tokens}}


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = ApiError(413, f"request body over the {limit}-byte limit", None, "request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def create_app(engine, settings: ServeSettings) -> FastAPI:
    app = FastAPI(title="qvl", docs_url=None, redoc_url=None, openapi_url=None)
    state = app.state
    state.settings, state.metrics, state.engine = settings, Metrics(), engine
    created = int(time.time())

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", None, "invalid_api_key")

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return _error(ApiError(exc.status_code, str(exc.detail), None, None))

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return _error(ApiError(500, "internal server error", kind="internal_error"))

    def model_card() -> dict:
        card = {"id": settings.model_name, "object": "model", "created": created, "owned_by": "qvl"}
        if settings.max_model_len:
            card["max_model_len"] = settings.max_model_len
        return card

    @app.get("/health")
    async def health():
        if not engine.state()["running"]:
            return JSONResponse({"status": "stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        text = state.metrics.render({**engine.state(), "decode_steps": engine.decode_steps()})
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        check_key(request)
        if name != settings.model_name:
            raise ApiError(404, f"the model {name!r} does not exist", "model", "model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        t0 = time.monotonic()
        try:
            check_key(request)
            body = await _read_body(request, settings.max_body_bytes)
            try:
                data = json.loads(body)
            except ValueError as e:
                raise ApiError(400, f"the request body is not JSON: {e}") from None
            req = parse_chat(data)
            if req.model != settings.model_name:
                raise ApiError(404, f"the model {req.model!r} does not exist (this server has "
                               f"{settings.model_name!r})", "model", "model_not_found")
            try:
                messages = to_messages(req, settings.media)
            except MediaRefused as e:
                raise ApiError(400, str(e), e.param) from None
            kwargs = submit_kwargs(req, settings.sampling_defaults, settings.default_max_tokens)
        except ApiError as e:
            state.metrics.refused("invalid")
            return _error(e)
        run = _Run(engine, messages, kwargs, state.metrics, asyncio.get_running_loop())
        x = _Exchange(state, request, run, t0)
        try:
            first = await x.next()
        except _Timeout:
            await x.settle()
            x.end("timeout")
            return _error(ApiError(504, "the request timed out before it started", None, "request_timeout",
                                   "timeout_error"))
        except _ClientGone:
            x.end("cancelled")
            return Response(status_code=499)
        if first[0] == "error":
            err = _submit_error(first[1])
            x.end({429: "busy", 500: "error"}.get(err.status, "invalid"))
            return _error(err)
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return StreamingResponse(_stream(x, req, cid, now, settings.model_name), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(x, cid, now, settings.model_name)

    return app


async def _complete(x: _Exchange, cid: str, created: int, model: str):
    pieces = []
    try:
        while True:
            kind, value = await x.next()
            if kind == "token":
                pieces.append(value)
            elif kind == "done":
                break
            elif kind == "error":
                x.end("error")
                return _error(_run_error(value))
    except _Timeout:
        await x.settle()
        x.end("timeout")
        return _error(ApiError(504, f"the request ran past the server's {x.state.settings.request_timeout_s:g}s "
                               "limit and was stopped", None, "request_timeout", "timeout_error"))
    except _ClientGone:
        x.end("cancelled")
        return Response(status_code=499)
    h = x.run.handle
    reason = h.finish_reason
    x.end(reason if reason in ("stop", "length") else "cancelled")
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                         "logprobs": None, "finish_reason": _finish(reason)}],
            "usage": _usage(h)}


async def _stream(x: _Exchange, req: ChatRequest, cid: str, created: int, model: str):
    usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(delta: dict, finish: str | None = None) -> str:
        out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if usage:
            out["usage"] = None
        return _sse(out)

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await x.next()
            if kind == "token":
                if value:
                    yield chunk({"content": value})
            elif kind == "done":
                h = x.run.handle
                yield chunk({}, _finish(h.finish_reason))
                if usage:
                    yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                                "choices": [], "usage": _usage(h)})
                yield "data: [DONE]\n\n"
                x.end(h.finish_reason if h.finish_reason in ("stop", "length") else "cancelled")
                return
            elif kind == "error":
                yield _sse(_run_error(value).body())
                yield "data: [DONE]\n\n"
                x.end("error")
                return
    except _Timeout:
        await x.settle()
        limit = x.state.settings.request_timeout_s
        yield _sse(ApiError(504, f"the request ran past the server's {limit:g}s limit and was stopped", None,
                            "request_timeout", "timeout_error").body())
        yield "data: [DONE]\n\n"
        x.end("timeout")
    except _ClientGone:
        x.end("cancelled")
    finally:
        x.end("cancelled")  # closed by the server (the client went away while a chunk was sent)


def run_server(engine, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
               verbose: bool = False) -> int:
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach this port can use the model", host)
    app = create_app(engine, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level="info" if verbose else "warning",
                            access_log=verbose, timeout_graceful_shutdown=5)
    print(f"qvl serve: http://{host}:{port}/v1 (model {settings.model_name!r})", flush=True)
    try:
        uvicorn.Server(config).run()
    finally:
        engine.close()
    return 0
