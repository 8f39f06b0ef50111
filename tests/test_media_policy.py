"""What a network client may name as media: file:// under one directory, http(s) to public
addresses only (every resolved address, after every redirect), nothing else."""

import http.server
import io
import ipaddress
import socket
import threading
import urllib.request

import pytest

from qvl.runtime import fetch
from qvl.runtime.fetch import AddressRefused, FetchPolicy, address_allowed, download
from qvl.runtime.media_policy import MediaPolicy, MediaRefused
from qvl.runtime.options import LoadOptions


@pytest.mark.parametrize("addr,ok", [
    ("8.8.8.8", True), ("2606:4700::1", True), ("127.0.0.1", False), ("10.1.2.3", False), ("192.168.0.1", False),
    ("172.16.0.1", False), ("169.254.169.254", False), ("100.100.100.200", False), ("0.0.0.0", False),
    ("224.0.0.1", False), ("::1", False), ("::ffff:127.0.0.1", False), ("fe80::1", False), ("fd00:ec2::254", False),
    ("64:ff9b::7f00:1", False), ("64:ff9b::808:808", True),
])
def test_address_allowed(addr, ok):
    assert address_allowed(ipaddress.ip_address(addr)) is ok


def test_every_resolved_address_is_checked(monkeypatch):
    def resolve(host, port, *a, **kw):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port))]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with pytest.raises(AddressRefused, match="10.0.0.7"):
        fetch._checked_connection(("mixed.example", 80), timeout=1)


@pytest.fixture
def redirecting_server():
    """127.0.0.1: /to?URL answers 302 to URL; anything else 200 with a few bytes."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/to?"):
                self.send_response(302)
                self.send_header("Location", self.path[4:])
            else:
                self.send_response(200)
                self.send_header("Content-Length", "3")
            self.end_headers()
            if not self.path.startswith("/to?"):
                self.wfile.write(b"abc")

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_private_addresses_refused_and_rechecked_after_redirects(redirecting_server, monkeypatch):
    port = redirecting_server
    open_ = FetchPolicy(allow_remote=True, allow_private_addresses=True)
    strict = FetchPolicy(allow_remote=True)
    assert download(f"http://127.0.0.1:{port}/x", io.BytesIO(), 100, open_) == 3
    with pytest.raises(AddressRefused, match="127.0.0.1"):
        download(f"http://127.0.0.1:{port}/x", io.BytesIO(), 100, strict)
    with pytest.raises(AddressRefused):
        download(f"http://localhost:{port}/x", io.BytesIO(), 100, strict)
    # treat 127.0.0.1 as public and 127.0.0.2 as private: the redirect's target is checked again
    monkeypatch.setattr(fetch, "address_allowed", lambda ip: str(ip) == "127.0.0.1")
    assert download(f"http://127.0.0.1:{port}/x", io.BytesIO(), 100, strict) == 3
    with pytest.raises(AddressRefused, match="127.0.0.2"):
        download(f"http://127.0.0.1:{port}/to?http://127.0.0.2:{port}/x", io.BytesIO(), 100, strict)


def test_loopback_refused_by_default_and_fetched_when_allowed(redirecting_server, monkeypatch):
    monkeypatch.delenv("QVL_ALLOW_PRIVATE_ADDRESSES", raising=False)
    url = f"http://127.0.0.1:{redirecting_server}/x"
    for default in (FetchPolicy(allow_remote=True), FetchPolicy.from_env(True, LoadOptions().allow_private_addresses)):
        with pytest.raises(AddressRefused, match=r"resolves to 127\.0\.0\.1, a loopback, private, link-local .*"
                                                 r"refused unless allow_private_addresses is set"):
            download(url, io.BytesIO(), 100, default, "image")
    assert download(url, io.BytesIO(), 100, FetchPolicy(allow_remote=True, allow_private_addresses=True)) == 3
    monkeypatch.setenv("QVL_ALLOW_PRIVATE_ADDRESSES", "1")
    assert download(url, io.BytesIO(), 100, FetchPolicy.from_env(True)) == 3


def test_no_proxy_when_strict():
    # a proxy would connect on our behalf to an address we never checked
    opener = fetch._opener(FetchPolicy(allow_remote=True), deadline=0.0)
    assert not [h for h in opener.handlers if isinstance(h, urllib.request.ProxyHandler)]


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"x")
    (root / "out.png").symlink_to(tmp_path / "secret.png")
    (root / "in.png").symlink_to(root / "sub" / "a.png")
    return tmp_path, root


def test_local_files_only_under_the_root(tree):
    tmp, root = tree
    policy = MediaPolicy.make(root, allow_remote=False)
    assert policy.check(f"file://{root}/sub/a.png", "p") == str(root / "sub" / "a.png")
    assert policy.check(f"file://{root}/in.png", "p") == str(root / "sub" / "a.png")  # a link inside is fine
    assert policy.check(f"file://localhost{root}/sub/%61.png", "p") == str(root / "sub" / "a.png")
    for url in (f"file://{tmp}/secret.png", f"file://{root}/../secret.png", f"file://{root}/sub/../../secret.png",
                f"file://{root}/out.png", f"file://{root}/sub", f"file://{root}/nope.png", f"file://host{root}/sub/a.png",
                "file://sub/a.png", str(root / "sub" / "a.png"), "a.png", "ftp://x/a.png"):
        with pytest.raises(MediaRefused) as e:
            policy.check(url, "messages[0].content[0].image_url.url")
        assert e.value.param == "messages[0].content[0].image_url.url"
    with pytest.raises(MediaRefused, match="disabled"):
        MediaPolicy().check(f"file://{root}/sub/a.png", "p")


def test_remote_and_data_sources():
    assert MediaPolicy().check("data:image/png;base64,AAAA", "p") == "data:image/png;base64,AAAA"
    with pytest.raises(MediaRefused, match="--allow-remote"):
        MediaPolicy().check("https://example.com/a.png", "p")
    assert MediaPolicy(allow_remote=True).check("https://example.com/a.png", "p") == "https://example.com/a.png"
    with pytest.raises(MediaRefused, match="data: URIs"):
        MediaPolicy().check("data:video/mp4;base64,AAAA", "p", "video")
