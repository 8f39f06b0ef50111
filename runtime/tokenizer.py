"""Tokenizer, chat template and streaming detokenizer for Qwen2-VL checkpoints.

Reads the checkpoint's own files (tokenizer.json, the chat template, tokenizer_config.json) with
`tokenizers` and `jinja2` only, and reproduces what transformers produces from the same files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections.abc import Iterable, Mapping
from datetime import datetime

from qvl.model.config import read_json_object

logger = logging.getLogger(__name__)

# Token attributes transformers exposes to chat templates (its special_tokens_map), e.g. templates
# that write {{ bos_token }}.
_TEMPLATE_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                        "mask_token")

# Searched in transformers' processor order: the legacy chat_template.json (what official Qwen2-VL
# checkpoints ship) wins over chat_template.jinja when both exist; tokenizer_config.json is last.
CHAT_TEMPLATE_FILES = ("chat_template.json", "chat_template.jinja", "tokenizer_config.json")


def _token_content(value) -> str | None:
    # Older tokenizer_config.json files store special tokens as serialized AddedToken dicts.
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def _pick_template(value, source: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        by_name = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        if "default" in by_name:
            return by_name["default"]
        raise ValueError(f"{source} holds named chat templates {sorted(map(str, by_name))} but none named 'default'")
    raise ValueError(f"{source}: chat_template must be a string or a list of {{name, template}}, "
                     f"got {type(value).__name__}")


def load_chat_template(path) -> tuple[str, str]:
    """Return ``(template, file_name)`` for the checkpoint directory ``path``."""
    path = pathlib.Path(path)
    for name in CHAT_TEMPLATE_FILES:
        file = path / name
        if name.endswith(".jinja"):
            if file.is_file():
                return file.read_text(encoding="utf-8"), name
        elif file.is_file():
            data = read_json_object(file)
            if data.get("chat_template") is not None:
                return _pick_template(data["chat_template"], str(file)), name
    raise FileNotFoundError(
        f"no chat template in {path}: looked for a 'chat_template' key in {CHAT_TEMPLATE_FILES[0]}, "
        f"{CHAT_TEMPLATE_FILES[1]}, and a 'chat_template' key in {CHAT_TEMPLATE_FILES[2]}")


def _compile_template(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # The same environment transformers renders in (chat_template_utils), so whitespace control and
    # the helpers templates call behave identically.
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson HTML-escapes, which would change prompts that embed JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def _plain(value):
    # Templates only test whether media keys exist; rebuilding everything from JSON types keeps
    # images/arrays (whose methods the sandbox knows nothing about) out of the template.
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "shape", None) == ():  # numpy / torch scalars
        return _plain(item())
    return f"<{type(value).__name__}>"


def _normalize_messages(messages) -> list[dict]:
    out = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TypeError(f"chat messages must be dicts with 'role' and 'content', got {message!r}")
        # Keys set to None are dropped, as transformers does, so templates see them as undefined
        # rather than rendering "None".
        out.append({k: v for k, v in message.items() if v is not None})
    return _plain(out)


class StreamDecoder:
    """Incremental detokenizer: ``push`` ids one at a time, get text as soon as it is complete.

    Byte-level BPE tokens can end inside a multi-byte UTF-8 character; such text decodes with a
    trailing U+FFFD, so it is held back until a later token completes the character. Text is
    produced by decoding a short window of ids and diffing against the window without the new ids
    (the scheme vLLM uses), which stays exact for decoders that are not simply concatenative.
    The joined output equals ``Tokenizer.decode`` of all pushed ids.
    """

    def __init__(self, tokenizer: "Tokenizer", skip_special_tokens: bool = True):
        self._decode = tokenizer.decode
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the decoding window: already-emitted context
        self._read = 0  # ids before this have been emitted

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Emit whatever is held back (possibly ending in U+FFFD if the ids end mid-character)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix:self._read], skip_special_tokens=self._skip)
        text = self._decode(self._ids[self._prefix:], skip_special_tokens=self._skip)
        # A genuinely invalid byte sequence also ends in U+FFFD; it is held only until the next
        # complete character (or flush), so the output is delayed, never lost.
        if not final and (len(text) <= len(prefix_text) or text.endswith("\ufffd")):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix_text):]


class Tokenizer:
    """A checkpoint's tokenizer.json plus its chat template, without transformers."""

    def __init__(self, tokenizer, chat_template: str | None = None, special_tokens: Mapping | None = None):
        self._tok = tokenizer
        self.chat_template = chat_template
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self._compiled = None

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        from tokenizers import Tokenizer as _HFTokenizer

        path = pathlib.Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file} not found; qvl needs the fast-tokenizer file tokenizer.json")
        tok = _HFTokenizer.from_file(str(tok_file))
        config_file = path / "tokenizer_config.json"
        config = read_json_object(config_file) if config_file.is_file() else {}
        special = {k: _token_content(config.get(k)) for k in _TEMPLATE_TOKEN_KEYS}
        try:
            template, source = load_chat_template(path)
            logger.debug("chat template from %s", path / source)
        except FileNotFoundError:
            # Base (non-Instruct) checkpoints ship no template; failing later, in
            # apply_chat_template, keeps plain encode/decode usable for them.
            logger.info("%s has no chat template; apply_chat_template will fail", path)
            template = None
        return cls(tok, template, special)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    def encode(self, text: str) -> list[int]:
        # Chat prompts already carry every control token the template wants, so nothing is added
        # around the text; special tokens inside it still map to their ids, as in transformers.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise ValueError(f"token {token!r} is not in this tokenizer's vocabulary")
        return tid

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, add_vision_id: bool = False,
                            **kwargs) -> str:
        """Render ``messages`` to the prompt string transformers' ``apply_chat_template`` gives.

        ``content`` may be a string or a list of items such as ``{"type": "image", "image": ...}``,
        ``{"type": "video", ...}`` and ``{"type": "text", "text": ...}``. Extra keyword arguments
        reach the template as variables.
        """
        if self.chat_template is None:
            raise ValueError("this checkpoint has no chat template (looked for " + ", ".join(CHAT_TEMPLATE_FILES) + ")")
        if self._compiled is None:
            self._compiled = _compile_template(self.chat_template)
        variables = {**self.special_tokens, **kwargs}
        tools = variables.pop("tools", None)
        documents = variables.pop("documents", None)
        return self._compiled.render(
            messages=_normalize_messages(messages),
            tools=_plain(tools),
            documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
            add_vision_id=add_vision_id,
            **_plain(variables),
        )

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)
