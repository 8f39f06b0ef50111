"""Remote (http/https) media download with the limits an edge device needs.

Off by default: a robot that answers prompts from a network should not fetch whatever URL a
prompt names (internal addresses, unbounded downloads, stalls). Turn it on per engine with
``qvl.load(..., allow_remote=True)`` or for the process with ``QVL_ALLOW_REMOTE=1``.
When on, a download is streamed with a per-read timeout, a total deadline and a byte cap, so a
slow or huge response fails with a clear error instead of exhausting memory or hanging.
"""

from __future__ import annotations

import http.client
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import BinaryIO

logger = logging.getLogger(__name__)

_TRUE = ("1", "true", "yes", "on")
_CHUNK = 1 << 16


@dataclass(frozen=True)
class FetchPolicy:
    """What remote sources may be read, and how much of them."""

    allow_remote: bool = False
    timeout_s: float = 10.0  # connect and each read
    deadline_s: float = 120.0  # the whole download
    max_image_bytes: int = 64 << 20
    max_video_bytes: int = 1 << 30

    @classmethod
    def from_env(cls, allow_remote: bool | None = None) -> "FetchPolicy":
        """``allow_remote=None`` reads ``QVL_ALLOW_REMOTE`` (1/true/yes/on enables)."""
        if allow_remote is None:
            allow_remote = os.environ.get("QVL_ALLOW_REMOTE", "").strip().lower() in _TRUE
        return cls(allow_remote=bool(allow_remote))


def is_url(source) -> bool:
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    # urllib would also follow a redirect to ftp://; a media fetch has no business there
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not is_url(newurl):
            raise urllib.error.HTTPError(newurl, code, f"redirect to a non-http URL {newurl!r} refused",
                                         headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_opener = urllib.request.build_opener(_HttpOnlyRedirects)


def download(url: str, out: BinaryIO, max_bytes: int, policy: FetchPolicy, what: str = "file") -> int:
    """Stream ``url`` into ``out``; returns the byte count. Every failure is a ValueError."""
    if not policy.allow_remote:
        raise ValueError(
            f"remote {what} fetching is disabled: {url[:200]}; pass allow_remote=True to qvl.load or set "
            "QVL_ALLOW_REMOTE=1 (or download it and pass a local path)"
        )
    start = time.monotonic()
    req = urllib.request.Request(url, headers={"User-Agent": "qvl"})
    n = 0
    try:
        with _opener.open(req, timeout=policy.timeout_s) as resp:
            length = resp.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise ValueError(f"{what} at {url} is {int(length)} bytes, over the {max_bytes}-byte limit")
            while chunk := resp.read(_CHUNK):
                n += len(chunk)
                if n > max_bytes:
                    raise ValueError(f"{what} at {url} exceeds the {max_bytes}-byte limit")
                if time.monotonic() - start > policy.deadline_s:
                    raise ValueError(f"downloading {url} took over {policy.deadline_s}s; gave up")
                out.write(chunk)
    except urllib.error.HTTPError as e:
        raise ValueError(f"cannot fetch {what} {url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        # socket timeouts are OSErrors; URLError wraps refused connections and DNS failures
        raise ValueError(f"cannot fetch {what} {url}: {type(e).__name__}: {e}") from e
    logger.debug("fetched %s (%d bytes in %.2fs)", url, n, time.monotonic() - start)
    return n
