"""Sessions: a robot's loop over camera frames, or a chat, on one engine.

A ``Session`` holds the instructions (a system message, and optionally fixed context turns) and,
for a chat, the turns so far. Each ``ask`` sends the whole conversation; the engine's prefix cache
(``qvl.runtime.prefix_cache``) finds the part it already ran, so the instructions are prefilled
once and each call costs only what is new: a frame and its question, or a chat's last turn.
"""

from __future__ import annotations

from collections.abc import Iterator

from qvl.runtime.sequence import Stats


class Session:
    """``engine.session(system=..., history=False, **generation)``; pictures are PIL images, paths,
    URLs, arrays, or item dicts with their own settings (``{"image": ..., "max_pixels": ...}``).

    ``history=False`` (a loop): every ``ask`` is one question about its own pictures under the
    same instructions. ``history=True`` (a chat): each answer joins the conversation. Generation
    keywords (``max_new_tokens``, ``temperature``, ``stop``...) given here are the defaults of every
    ``ask``. ``warm=True`` runs the instructions once now, so the first ``ask`` is as fast as the
    rest. One session is one conversation: call it from one thread at a time (sessions of the
    same engine may run in parallel).
    """

    def __init__(self, engine, system: str | None = None, *, context=(), history: bool = False, warm: bool = False,
                 **generation):
        self.engine, self.history, self.generation = engine, history, generation
        self.prefix: list[dict] = ([{"role": "system", "content": system}] if system else []) + list(context)
        self.turns: list[dict] = []
        self.last_stats = Stats()
        if warm and self.prefix:
            # a prompt of the instructions alone: its rows up to the first turn's start stay cached
            engine.generate(self.prefix, max_new_tokens=1)

    def messages(self, question: str, images=(), video=None) -> list[dict]:
        """The conversation ``ask`` sends for this question."""
        if isinstance(images, (str, bytes, dict)) or hasattr(images, "size"):  # one picture, not a list
            images = [images]
        # a picture, or an item with its own settings: {"image": ..., "max_pixels": ...}
        content = [{"type": "image", **im} if isinstance(im, dict) else {"type": "image", "image": im} for im in images]
        if video is not None:
            content.append({"type": "video", "video": video})
        content.append({"type": "text", "text": question})
        return self.prefix + self.turns + [{"role": "user", "content": content}]

    def ask(self, question: str, images=(), video=None, **generation) -> str:
        """The answer to ``question`` about ``images`` (one picture or a list) and/or ``video``."""
        return "".join(self.stream(question, images, video, **generation))

    def stream(self, question: str, images=(), video=None, **generation) -> Iterator[str]:
        """Like ``ask``, the answer's text pieces as they are decoded."""
        messages = self.messages(question, images, video)
        handle = self.engine.submit(messages, **{**self.generation, **generation})
        pieces = []
        try:
            for piece in handle.text():
                pieces.append(piece)
                yield piece
        finally:
            handle.cancel()
            self.last_stats = handle.stats
        if self.history:
            self.turns += [messages[-1], {"role": "assistant", "content": "".join(pieces)}]

    def reset(self) -> None:
        """Forget the chat's turns (the instructions stay)."""
        self.turns = []
