"""Which media sources a network client may name: the server's gate before ``qvl.runtime.inputs``.

A library caller may read any path its process can; a client of ``qvl serve`` may not. Here a
source is one of: a ``data:`` URI; an ``http(s)://`` URL, only when remote fetching is on (the
fetch policy then refuses non-public addresses, see ``qvl.runtime.fetch``); a ``file://`` URL,
only under the allowed directory, judged after resolving symlinks and ``..`` so neither escapes
it. Bare paths and other schemes are refused. Torch-free.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from qvl.runtime.fetch import is_url


class MediaRefused(ValueError):
    """A media source the server does not allow; ``param`` names the request field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class MediaPolicy:
    local_root: Path | None = None  # resolved; None: no file:// at all
    allow_remote: bool = False

    @classmethod
    def make(cls, local_root: str | Path | None, allow_remote: bool) -> "MediaPolicy":
        root = None
        if local_root is not None:
            root = Path(local_root).expanduser().resolve(strict=True)
            if not root.is_dir():
                raise ValueError(f"--allowed-local-media-path {local_root} is not a directory")
        return cls(root, allow_remote)

    def check(self, url: str, param: str, what: str = "image") -> str:
        """The source to hand to the runtime for ``url``, or ``MediaRefused``."""
        if not isinstance(url, str) or not url:
            raise MediaRefused(f"{what} url must be a non-empty string", param)
        if url.startswith("data:"):
            if what != "image":
                raise MediaRefused(f"data: URIs are not supported for {what}s", param)
            return url
        if is_url(url):
            if not self.allow_remote:
                raise MediaRefused(f"remote {what} URLs are disabled on this server (start it with --allow-remote)",
                                   param)
            return url
        if url.lower().startswith("file:"):
            return str(self._local(url, param, what))
        raise MediaRefused(f"unsupported {what} url {url[:80]!r}: use a data: URI, http(s):// or file:// URL",
                           param)

    def _local(self, url: str, param: str, what: str) -> Path:
        if self.local_root is None:
            raise MediaRefused(f"file:// {what}s are disabled on this server (start it with "
                               "--allowed-local-media-path DIR)", param)
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise MediaRefused(f"file:// URL with a host ({parts.netloc!r}) refused", param)
        path = Path(urllib.parse.unquote(parts.path))
        if not path.is_absolute():
            raise MediaRefused("file:// URL needs an absolute path", param)
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):  # missing, a symlink loop
            raise MediaRefused(f"{what} file not found under the allowed media path: {parts.path[:200]}",
                               param) from None
        if not real.is_relative_to(self.local_root) or not real.is_file():
            # same message as a missing file: a client learns nothing about paths outside the root
            raise MediaRefused(f"{what} file not found under the allowed media path: {parts.path[:200]}", param)
        return real
