"""Remote (http/https) media download with the limits an edge device needs.

Off by default: a robot that answers prompts from a network should not fetch whatever URL a
prompt names (internal addresses, unbounded downloads, stalls). Turn it on per engine with
``qvl.load(..., allow_remote=True)`` or for the process with ``QVL_ALLOW_REMOTE=1``.
When on, a download is streamed with a per-read timeout, a total deadline and a byte cap, so a
slow or huge response fails with a clear error instead of exhausting memory or hanging.

``allow_private_addresses=False`` (what ``qvl serve`` uses) also refuses hosts that resolve to
loopback, private, link-local (cloud metadata), multicast or otherwise non-global addresses.
Every address a name resolves to is checked, the connection goes to an address that was checked
(so a second lookup cannot swap it), each redirect opens a new, checked connection, and
environment proxies are not used (they would hide the real destination).
"""

from __future__ import annotations

import http.client
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
    allow_private_addresses: bool = True  # False: only hosts whose every address is global

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
                                 "non-public address; refused")
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


class _CheckedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._create_connection = _checked_connection


class _CheckedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._create_connection = _checked_connection  # TLS still verifies the certificate for the name


class _CheckedHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_CheckedHTTPConnection, req)


class _CheckedHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_CheckedHTTPSConnection, req, context=self._context)


_opener = urllib.request.build_opener(_HttpOnlyRedirects)
_public_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _HttpOnlyRedirects, _CheckedHTTPHandler,
                                             _CheckedHTTPSHandler)


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
        opener = _opener if policy.allow_private_addresses else _public_opener
        with opener.open(req, timeout=policy.timeout_s) as resp:
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
