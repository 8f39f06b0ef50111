"""Remote (http/https) media download with the limits an edge device needs.

Off by default: a robot that answers prompts from a network should not fetch whatever URL a
prompt names (internal addresses, unbounded downloads, stalls). Turn it on per engine with
``qvl.load(..., allow_remote=True)`` or for the process with ``QVL_ALLOW_REMOTE=1``.
When on, a download is streamed with a per-read timeout, a byte cap and a total deadline that
holds whatever the server does (every connect and recv waits at most the time left), so a slow,
trickling or huge response fails with a clear error instead of exhausting memory or hanging.

Hosts that resolve to loopback, private, link-local (cloud metadata), multicast or otherwise
non-global addresses are refused unless ``allow_private_addresses`` is set (``qvl.load(...,
allow_private_addresses=True)``, ``QVL_ALLOW_PRIVATE_ADDRESSES=1``, ``qvl serve --allow-private-addresses``).
Every address a name resolves to is checked, the connection goes to an address that was checked
(so a second lookup cannot swap it), each redirect opens a new, checked connection, and
environment proxies are not used (they would hide the real destination).
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import logging
import os
import socket
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
    allow_private_addresses: bool = False  # False: only hosts whose every address is global

    @classmethod
    def from_env(cls, allow_remote: bool | None = None,
                 allow_private_addresses: bool | None = None) -> "FetchPolicy":
        """``None`` reads ``QVL_ALLOW_REMOTE`` / ``QVL_ALLOW_PRIVATE_ADDRESSES`` (1/true/yes/on enables)."""
        if allow_remote is None:
            allow_remote = _env_flag("QVL_ALLOW_REMOTE")
        if allow_private_addresses is None:
            allow_private_addresses = _env_flag("QVL_ALLOW_PRIVATE_ADDRESSES")
        return cls(allow_remote=bool(allow_remote), allow_private_addresses=bool(allow_private_addresses))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def is_url(source) -> bool:
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    # urllib would also follow a redirect to ftp://; a media fetch has no business there
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not is_url(newurl):
            raise urllib.error.HTTPError(newurl, code, f"redirect to a non-http URL {newurl!r} refused",
                                         headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class AddressRefused(ValueError):
    """A URL's host resolves to an address the policy does not allow."""


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def address_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for a global unicast address; IPv4-mapped and NAT64 IPv6 are judged by their IPv4."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.is_global and not ip.is_multicast


def _checked_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):
    """``socket.create_connection`` that refuses a host if any address it resolves to is not
    global, and connects only to the addresses it checked."""
    host, port = address
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise OSError(f"cannot resolve {host!r}: {e}") from e
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
        if not address_allowed(ip):
            raise AddressRefused(f"host {host!r} resolves to {ip}, a loopback, private, link-local or otherwise "
                                 "non-public address; refused unless allow_private_addresses is set "
                                 "(qvl.load(..., allow_private_addresses=True), QVL_ALLOW_PRIVATE_ADDRESSES=1 "
                                 "or qvl serve --allow-private-addresses)")
    err: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            err = e
    raise err or OSError(f"cannot connect to {host!r}")


class _DeadlineIO(io.RawIOBase):
    """A socket reader whose every recv waits at most the time left to the download: a per-read
    timeout alone restarts with each byte, so a server sending one a second would never hit it."""

    def __init__(self, raw: socket.SocketIO, sock, deadline: float, read_timeout: float):
        super().__init__()
        self._raw, self._sock = raw, sock
        self._deadline, self._read_timeout = deadline, read_timeout

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._raw.fileno()

    def readinto(self, b):
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("download deadline passed")
        self._sock.settimeout(min(self._read_timeout, left))
        return self._raw.readinto(b)

    def close(self):
        if not self.closed:
            self._raw.close()  # the socket really closes once its readers and the connection let go
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    # the status line and headers are read through the same reader as the body
    def __init__(self, sock, *a, deadline: float, read_timeout: float, **kw):
        super().__init__(sock, *a, **kw)
        raw = self.fp.detach()  # nothing read yet
        self.fp = io.BufferedReader(_DeadlineIO(raw, sock, deadline, read_timeout))


class _DeadlineConnection:
    """Connects within the time left, reads every response through ``_DeadlineResponse``, and with
    ``public_only`` connects only to checked global addresses."""

    def __init__(self, *a, deadline: float, public_only: bool, **kw):
        super().__init__(*a, **kw)
        self._deadline = deadline
        self.response_class = functools.partial(_DeadlineResponse, deadline=deadline, read_timeout=self.timeout)
        if public_only:
            self._create_connection = _checked_connection  # TLS still verifies the certificate for the name

    def connect(self):
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("download deadline passed")
        self.timeout = min(self.timeout, left)  # also bounds the TLS handshake, one call under this timeout
        super().connect()


class _HTTPConnection(_DeadlineConnection, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_DeadlineConnection, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, **conn):
        super().__init__()
        self._conn = conn

    def http_open(self, req):
        return self.do_open(functools.partial(_HTTPConnection, **self._conn), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, **conn):
        super().__init__()
        self._conn = conn

    def https_open(self, req):
        return self.do_open(functools.partial(_HTTPSConnection, **self._conn), req, context=self._context)


def _opener(policy: FetchPolicy, deadline: float) -> urllib.request.OpenerDirector:
    """An opener for one download: its connections (redirects too) share ``deadline``."""
    public_only = not policy.allow_private_addresses
    handlers = [_HttpOnlyRedirects, _HTTPHandler(deadline=deadline, public_only=public_only),
                _HTTPSHandler(deadline=deadline, public_only=public_only)]
    if public_only:
        handlers.insert(0, urllib.request.ProxyHandler({}))  # a proxy would connect to an unchecked address
    return urllib.request.build_opener(*handlers)


def download(url: str, out: BinaryIO, max_bytes: int, policy: FetchPolicy, what: str = "file") -> int:
    """Stream ``url`` into ``out``; returns the byte count. Every failure is a ValueError.

    Takes at most about ``policy.deadline_s`` from the first connect to the last byte, however
    slowly the server sends its headers or body (name resolution aside).
    """
    if not policy.allow_remote:
        raise ValueError(
            f"remote {what} fetching is disabled: {url[:200]}; pass allow_remote=True to qvl.load or set "
            "QVL_ALLOW_REMOTE=1 (or download it and pass a local path)"
        )
    start = time.monotonic()
    deadline = start + policy.deadline_s
    late = f"downloading {what} {url} took over {policy.deadline_s:g}s; gave up"
    req = urllib.request.Request(url, headers={"User-Agent": "qvl"})
    n = 0
    try:
        with _opener(policy, deadline).open(req, timeout=policy.timeout_s) as resp:
            length = resp.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise ValueError(f"{what} at {url} is {int(length)} bytes, over the {max_bytes}-byte limit")
            while chunk := resp.read(_CHUNK):
                n += len(chunk)
                if n > max_bytes:
                    raise ValueError(f"{what} at {url} exceeds the {max_bytes}-byte limit")
                out.write(chunk)
                if time.monotonic() > deadline:
                    raise ValueError(late)
    except urllib.error.HTTPError as e:
        raise ValueError(f"cannot fetch {what} {url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        if time.monotonic() >= deadline:  # a read cut short by the time left, not by the server
            raise ValueError(late) from e
        # socket timeouts are OSErrors; URLError wraps refused connections and DNS failures
        raise ValueError(f"cannot fetch {what} {url}: {type(e).__name__}: {e}") from e
    logger.debug("fetched %s (%d bytes in %.2fs)", url, n, time.monotonic() - start)
    return n
