"""OpenAI chat-completions requests: the pydantic schema, the checks, and the conversion to qvl's
messages and ``Engine.submit`` arguments. Imported only by ``qvl serve`` (pydantic is the
``[serve]`` extra's).

A field qvl does not implement is accepted only while it holds its default (``n=1``,
``logprobs=false``, no tools, ...), so a client never gets an answer to a question it did not ask.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qvl.model.config import read_json_object
from qvl.runtime.media_policy import MediaPolicy


class ApiError(Exception):
    """An error answer in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # qvl sizes images by pixels, not by detail


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Strict):
    url: str


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: VideoURL


Part = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class MMKwargs(_Strict):
    """vLLM's per-request processor settings; applied to every image and video of the request."""

    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)
    fps: float | None = Field(None, gt=0)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extra; -1 or 0: off
    repetition_penalty: float | None = Field(None, gt=0)  # vLLM's extra
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extra
    mm_processor_kwargs: MMKwargs | None = None


# fields qvl does not implement -> the values that mean "not used" (None always does)
UNSUPPORTED_DEFAULTS: dict[str, tuple] = {
    "n": (1,), "logprobs": (False,), "top_logprobs": (0,), "tools": ([],), "tool_choice": ("none", "auto"),
    "functions": ([],), "function_call": ("none", "auto"), "presence_penalty": (0,), "frequency_penalty": (0,),
    "logit_bias": ({},), "response_format": ({"type": "text"},), "modalities": (["text"],), "audio": (),
    "prediction": (), "best_of": (1,), "use_beam_search": (False,), "min_tokens": (0,), "min_p": (0,),
    "echo": (False,), "stop_token_ids": ([],), "store": (False,), "skip_special_tokens": (True,),
    "include_stop_str_in_output": (False,), "add_generation_prompt": (True,), "continue_final_message": (False,),
    "chat_template": (), "chat_template_kwargs": ({},), "reasoning_effort": (), "web_search_options": (),
    "guided_json": (), "guided_regex": (), "guided_choice": (), "guided_grammar": (), "structured_outputs": (),
}
# fields that change nothing qvl computes
IGNORED = {"user", "metadata", "service_tier", "safety_identifier", "prompt_cache_key", "parallel_tool_calls",
           "request_id", "priority"}


def _param(loc: tuple) -> str:
    """pydantic's error location as a field path: ('messages', 0, 'content') -> messages[0].content."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif any(c in part for c in "[]-") or part in ("str", "list", "int", "float", "bool", "none"):
            continue  # a union member's name, not a field
        else:
            out += f".{part}" if out else part
    return out


def parse_chat(data) -> ChatRequest:
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as e:
        err = max(e.errors(), key=lambda x: len(x["loc"]))  # the deepest: the branch that got furthest
        param = _param(err["loc"])
        raise ApiError(400, f"{param}: {err['msg']}" if param else err["msg"], param or None) from None
    for name, value in (req.model_extra or {}).items():
        if name in IGNORED or value is None:
            continue
        if name not in UNSUPPORTED_DEFAULTS:
            raise ApiError(400, f"unknown field {name!r}", name, "unsupported_parameter")
        if value not in UNSUPPORTED_DEFAULTS[name]:
            raise ApiError(400, f"{name}={json.dumps(value)[:80]} is not supported by qvl", name,
                           "unsupported_parameter")
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options is only allowed with stream=true", "stream_options")
    return req


def to_messages(req: ChatRequest, media: MediaPolicy) -> list[dict]:
    """qvl's messages (qwen-vl-utils style items) for an OpenAI conversation; every media source
    passes ``media``'s checks first."""
    pixel = {}
    if req.mm_processor_kwargs is not None:
        pixel = req.mm_processor_kwargs.model_dump(exclude_none=True)
    fps = pixel.pop("fps", None)
    out = []
    for i, msg in enumerate(req.messages):
        role = "system" if msg.role == "developer" else msg.role
        if isinstance(msg.content, str):
            out.append({"role": role, "content": msg.content})
            continue
        items = []
        for j, part in enumerate(msg.content):
            where = f"messages[{i}].content[{j}]"
            if isinstance(part, TextPart):
                items.append({"type": "text", "text": part.text})
                continue
            if role != "user":
                raise ApiError(400, f"{where}: images and videos are allowed in user messages only", where)
            if isinstance(part, ImagePart):
                src = media.check(part.image_url.url, f"{where}.image_url.url", "image")
                items.append({"type": "image", "image": src, **pixel})
            else:
                src = media.check(part.video_url.url, f"{where}.video_url.url", "video")
                items.append({"type": "video", "video": src, **pixel, **({"fps": fps} if fps else {})})
        out.append({"role": role, "content": items})
    return out


def generation_defaults(path) -> dict:
    """Sampling defaults: the checkpoint's generation_config.json where it has them (as vLLM
    does), else OpenAI's (temperature 1, top_p 1)."""
    defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
    f = Path(path) / "generation_config.json"
    if f.exists():
        cfg = read_json_object(f)
        for k in defaults:
            if isinstance(cfg.get(k), (int, float)) and not isinstance(cfg.get(k), bool):
                defaults[k] = cfg[k]
    return defaults


def submit_kwargs(req: ChatRequest, defaults: dict, default_max_tokens: int) -> dict:
    """``Engine.submit``'s keyword arguments for ``req``."""

    def pick(name):
        value = getattr(req, name)
        return defaults[name] if value is None else value

    stop = req.stop
    if isinstance(stop, str):
        stop = [stop]
    top_k = pick("top_k")
    return dict(max_new_tokens=req.max_completion_tokens or req.max_tokens or default_max_tokens,
                temperature=float(pick("temperature")), top_p=float(pick("top_p")), top_k=max(int(top_k), 0),
                repetition_penalty=float(pick("repetition_penalty")), seed=req.seed, stop=tuple(stop or ()),
                ignore_eos=req.ignore_eos)
