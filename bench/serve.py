"""HTTP load test of ``qvl serve``: N clients x M requests on loopback, with the openai client.

Run as ``python -m qvl.bench.serve [--config qwen2vl-2b|tiny] [--clients 8] [--requests 4]``.
The 2B config serves the benchmarks' random-weight Qwen2-VL-2B in its RTN GPTQ-Int4 layout
(:mod:`qvl.bench.quant`, bf16 activations); ``tiny`` is a smoke test. The server is a child
process on a free loopback port; each client thread sends its M requests one after another,
streamed, greedy, eos ignored, ``--new-tokens`` each, so every answer has a known length. The
run stops by itself: every request has a client timeout, the server a request timeout, and the
whole run a deadline, after which the server is stopped and what was measured is reported.

Reported: p50 / p99 time to first token (request sent -> first content chunk) and latency
(request sent -> last chunk), aggregate tokens/s (completion tokens over the wall time from the
first request to the last answer), errors, and whether every request got its full answer.
"""

from __future__ import annotations

import argparse
import base64
import logging
import pathlib
import socket
import subprocess
import sys
import tempfile
import threading
import time

from qvl.bench import fixtures, probe, report
from qvl.bench.report import fmt
from qvl.bench.serving import TOPICS, _percentile

log = logging.getLogger("qvl.bench.serve")
NAME = "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image_uri(tmp: pathlib.Path) -> str:
    png = fixtures.make_image(tmp / "picture.png").read_bytes()
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _messages(i: int, image: str | None) -> list[dict]:
    text = {"type": "text", "text": f"Write a short story about {TOPICS[i % len(TOPICS)]} ({i})."}
    parts = [{"type": "image_url", "image_url": {"url": image}}, text] if image else [text]
    return [{"role": "user", "content": parts}]


class ServerProcess:
    def __init__(self, ckpt, dtype: str, args, log_path: pathlib.Path):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        cmd = [sys.executable, "-m", "qvl.cli", "serve", str(ckpt), "--port", str(self.port), "--served-model-name",
               NAME, "--dtype", dtype, "--device", args.device, "--max-batch", str(args.max_batch), "--max-queue",
               str(args.max_queue), "--max-seq-len", str(args.max_seq_len), "--request-timeout",
               str(args.request_timeout)]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}): {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server not ready in {timeout}s")

    def metrics(self) -> str:
        import httpx

        return httpx.get(self.base + "/metrics", timeout=10).text

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def _one(client, i: int, args, image) -> dict:
    t0 = time.perf_counter()
    row = {"i": i, "t0": t0, "ttft_s": None, "latency_s": None, "tokens": 0, "error": None}
    try:
        stream = client.chat.completions.create(
            model=NAME, messages=_messages(i, image), max_tokens=args.new_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and row["ttft_s"] is None:
                row["ttft_s"] = time.perf_counter() - t0
            if chunk.usage is not None:
                row["tokens"] = chunk.usage.completion_tokens
        row["latency_s"] = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - a failed request is a row of the report
        row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
    row["t1"] = time.perf_counter()
    return row


def load_test(base: str, args, image: str | None, deadline: float) -> tuple[list[dict], float]:
    import openai

    rows: list[dict] = []
    lock = threading.Lock()

    def client_thread(c: int):
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=args.request_timeout + 30)
        for m in range(args.requests):
            if time.monotonic() > deadline:
                break
            row = _one(client, c * args.requests + m, args, image)
            with lock:
                rows.append(row)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_thread, args=(c,), daemon=True) for c in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(deadline - time.monotonic(), 0) + 1)
    with lock:
        done = list(rows)
    wall = max((r["t1"] for r in done), default=t0) - t0
    return done, wall


def summarize(rows: list[dict], wall: float, expected: int, new_tokens: int) -> dict:
    ok = [r for r in rows if r["error"] is None]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    lat = [r["latency_s"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    full = sum(1 for r in ok if r["tokens"] == new_tokens)
    pct = (lambda xs, q: _percentile(xs, q) if xs else None)
    return {"requests": expected, "finished": len(rows), "errors": len(rows) - len(ok), "full_answers": full,
            "all_answered": full == expected, "ttft_seen": len(ttft), "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall if wall > 0 else 0.0, "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
            "latency_p50_s": pct(lat, 0.5), "latency_p99_s": pct(lat, 0.99),
            "error_samples": sorted({r["error"] for r in rows if r["error"]})[:5]}


def render(result: dict) -> str:
    s = result["summary"]
    lines = [f"# qvl serve under load ({result['config']}, {result['device']})", "",
             f"{result['clients']} clients x {result['requests']} requests over HTTP on loopback (openai client, "
             f"streamed), {result['new_tokens']} new tokens each (greedy, eos ignored), "
             f"{'an image and ' if result['image'] else ''}a short text prompt; server max_batch "
             f"{result['max_batch']}, max_queue {result['max_queue']}; {probe.cpu_model()}.", "",
             "TTFT = request sent -> first content chunk; latency = request sent -> last chunk; tok/s = all "
             "completion tokens / wall time from the first request to the last answer.", ""]
    lines += report.table(
        ["requests", "answered in full", "errors", "tok/s", "TTFT p50 s", "TTFT p99 s", "latency p50 s",
         "latency p99 s"],
        [[s["requests"], s["full_answers"], s["errors"], fmt(s["tok_s"]), fmt(s["ttft_p50_s"]), fmt(s["ttft_p99_s"]),
          fmt(s["latency_p50_s"]), fmt(s["latency_p99_s"])]])
    lines += ["", f"Every request got its full answer: {'yes' if s['all_answered'] else 'no'}."]
    if s["error_samples"]:
        lines += ["", "Errors: " + "; ".join(s["error_samples"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=("qwen2vl-2b", "tiny"), default="qwen2vl-2b")
    ap.add_argument("--ckpt", help="serve this checkpoint instead of the config's cached one")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="per client, one after another")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--image", action="store_true", help="attach the benchmarks' test picture to every request")
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--request-timeout", type=float, default=600.0)
    ap.add_argument("--deadline", type=float, default=1800.0, help="seconds for the whole load test")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("httpx", "httpx2"):  # one line a request
        logging.getLogger(name).setLevel(logging.WARNING)

    if args.ckpt:
        ckpt, dtype = pathlib.Path(args.ckpt), "float32"
    elif args.config == "tiny":
        ckpt, dtype = fixtures.ensure_checkpoint("tiny"), "float32"
    else:
        from qvl.bench.quant import ensure_quantized

        ckpt, dtype = ensure_quantized(fixtures.ensure_checkpoint("qwen2vl-2b"), "gptq-int4", 128), "bfloat16"
        ckpt = fixtures.full_vocab_view(ckpt)  # so the streamed chunks carry the tokens' text
    probe.warm_page_cache(ckpt)
    with tempfile.TemporaryDirectory(prefix="qvl-bench-serve-") as tmp:
        image = _image_uri(pathlib.Path(tmp)) if args.image else None
        server = ServerProcess(ckpt, dtype, args, pathlib.Path(tmp) / "server.log")
        try:
            server.wait_ready(timeout=600)
            log.info("server up on %s; warming up", server.base)
            warm = _one(__import__("openai").OpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0,
                                                    timeout=args.request_timeout), 10_000, args, image)
            if warm["error"]:
                raise RuntimeError(f"warm-up request failed: {warm['error']}; server log: "
                                   f"{server.log_path.read_text()[-2000:]}")
            rows, wall = load_test(server.base, args, image, time.monotonic() + args.deadline)
            metrics = server.metrics()
        finally:
            server.stop()
    summary = summarize(rows, wall, args.clients * args.requests, args.new_tokens)
    result = {"config": args.config if not args.ckpt else str(args.ckpt), "device": args.device,
              "clients": args.clients, "requests": args.requests, "new_tokens": args.new_tokens,
              "image": bool(image), "max_batch": args.max_batch, "max_queue": args.max_queue,
              "machine": probe.machine_info(), "summary": summary, "rows": rows,
              "server_metrics": [ln for ln in metrics.splitlines() if ln.startswith("qvl_requests_total")]}
    md = render(result)
    report.write_outputs(result, md, pathlib.Path(args.out), f"serve-{args.config}")
    print(md)
    return 0 if summary["all_answered"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
