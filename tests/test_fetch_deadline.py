"""A download ends by ``FetchPolicy.deadline_s`` however slowly the server sends: a per-read
timeout restarts with every byte, so a server trickling one byte a second must still be cut off."""

import http.server
import threading
import time

import pytest

from qvl.runtime.fetch import FetchPolicy
from qvl.runtime.inputs import fetch_image
from qvl.runtime.video import fetch_video

DEADLINE = 1.5
# the per-read timeout alone would never fire: each byte comes well within it
POLICY = FetchPolicy(allow_remote=True, allow_private_addresses=True, timeout_s=10.0, deadline_s=DEADLINE)


@pytest.fixture
def trickling_server():
    """127.0.0.1: ``/body/*`` sends its headers, then one body byte a second; ``/headers/*`` sends
    a status line, then its headers one byte a second."""
    stop = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self):
            if self.path.startswith("/body/"):
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                drip = b"\0"
            else:
                self.wfile.write(b"HTTP/1.0 200 OK\r\n")
                drip = b"a"
            for _ in range(60):
                if stop.is_set():
                    return
                self.wfile.write(drip)
                self.wfile.flush()
                stop.wait(1.0)

        def log_message(self, *a):
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # the client hangs up mid-drip; expected

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    stop.set()
    server.shutdown()
    server.server_close()


def _image(url):
    fetch_image({"image": url}, policy=POLICY)


def _video(url):
    fetch_video({"video": url}, policy=POLICY)


@pytest.mark.parametrize("phase", ["body", "headers"])
@pytest.mark.parametrize("what,fetch", [("image", _image), ("video", _video)])
def test_trickling_server_stops_at_the_deadline(trickling_server, phase, what, fetch):
    url = f"{trickling_server}/{phase}/x.{'png' if what == 'image' else 'mp4'}"
    start = time.monotonic()
    with pytest.raises(ValueError, match=rf"^downloading {what} {url} took over {DEADLINE:g}s; gave up$"):
        fetch(url)
    assert time.monotonic() - start < DEADLINE + 2
