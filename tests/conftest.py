"""Shared pytest fixtures: tiny Qwen2-VL checkpoints built once per session."""

import pytest

from qvl.scripts.tiny import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """transformers-initialised weights, untied, official flat config, mrope (2, 3, 3)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"), weights="transformers",
                                 tie_word_embeddings=False, layout="flat", mrope_section=(2, 3, 3))


@pytest.fixture(scope="session")
def tiny_ckpt_tied(tmp_path_factory):
    """Tied embeddings, transformers-5 nested config, mrope (4, 2, 2), special ids mid-vocab."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt_tied"), weights="transformers",
                                 tie_word_embeddings=True, layout="nested", mrope_section=(4, 2, 2),
                                 specials_in_middle=True)


@pytest.fixture(scope="session")
def tiny_ckpt_random(tmp_path_factory):
    """Weights written without transformers, under the official (pre-v5) key names."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt_random"), weights="random")


@pytest.fixture(scope="session")
def hf_processor():
    """Returns ``load(path) -> transformers.AutoProcessor``, usable without torchvision.

    Qwen2VLProcessor insists on a video processor, which needs torchvision; image and text
    paths never touch it, so None stands in for it while loading.
    """
    import importlib
    import importlib.util

    import transformers

    def load(path):
        return transformers.AutoProcessor.from_pretrained(path)

    if importlib.util.find_spec("torchvision") is not None:
        yield load
        return
    from transformers import ProcessorMixin

    # a plain `from ... import` can hand back the lazy module's placeholder: import the real one
    vpa = importlib.import_module("transformers.models.auto.video_processing_auto")
    auto_video = vpa.AutoVideoProcessor
    saved = vars(auto_video).get("from_pretrained")
    check = ProcessorMixin.check_argument_for_proper_class
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ProcessorMixin, "check_argument_for_proper_class",
                   lambda self, name, arg: None if arg is None and name == "video_processor"
                   else check(self, name, arg))
        # the placeholder raises on attribute reads, which MonkeyPatch does: swap by hand
        type.__setattr__(auto_video, "from_pretrained", classmethod(lambda cls, *a, **k: None))
        try:
            yield load
        finally:
            if saved is None:
                type.__delattr__(auto_video, "from_pretrained")
            else:
                type.__setattr__(auto_video, "from_pretrained", saved)


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving ``root`` (yielded with the base URL); a loopback
    address, so fetching from it needs ``FetchPolicy(allow_private_addresses=True)``.

    Extra paths: ``/slow`` stalls 2 s before answering, ``/redirect-ftp`` redirects off http,
    ``/big`` streams 8 MiB without a Content-Length.
    """
    import functools
    import http.server
    import threading
    import time

    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow":
                time.sleep(2)
            if self.path == "/redirect-ftp":
                self.send_response(302)
                self.send_header("Location", "ftp://127.0.0.1/x.png")
                self.end_headers()
                return
            if self.path == "/big":
                self.send_response(200)
                self.end_headers()
                for _ in range(128):
                    self.wfile.write(b"\0" * 65536)
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # clients that give up early (size cap, timeout) break the pipe; expected here

    server = Server(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
