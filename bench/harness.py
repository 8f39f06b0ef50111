"""Run one measurement in a fresh Python process: a spec (a JSON-able dict) in, a result dict out.

A fresh process per measurement gives each one its own peak memory, its own allocator and thread
pools, and no state left by the previous one. A benchmark marks a module-level function as a
worker and runs it::

    @harness.worker(memory=True)          # memory: add the child's peak RSS etc. (probe.memory_report)
    def decode(spec: dict, res: dict) -> None:
        res["tok_s"] = ...                # fill res; whatever it holds when the worker raises is kept

    res = harness.run(decode, {"ckpt": "...", "threads": 4}, timeout=600, label="decode")
    if "error" in res: ...                # harness.run never raises for the child's failures

In the child, ``spec["threads"]`` (when present) sets ``torch.set_num_threads`` and comes back as
``res["threads"]``. The parent adds ``child_wall_s`` and ``other_cpu_share`` (CPU that other
processes used meanwhile, a share of all CPUs); on failure ``error`` (the exception, a timeout or
the exit status) and ``log_tail`` (the child's last output lines). The child's stdout and stderr
are echoed to stderr, each line prefixed with ``[label]``.

The child is ``python -m qvl.bench.harness MODULE:FUNCTION SPEC.json [RESULT.json]``, which also
runs a worker by hand (without RESULT.json the result goes to stdout). A benchmark's main calls
:func:`setup` first.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque

from qvl.bench import probe

log = logging.getLogger("qvl.bench.harness")

TAIL_LINES = 40


def worker(fn=None, *, memory: bool = False):
    """Mark ``fn(spec, res)`` as runnable by :func:`run`; ``memory``: after it returns or raises,
    add the child's memory figures (:func:`qvl.bench.probe.memory_report`) to ``res``."""
    def mark(f):
        f.harness_worker = {"memory": memory}
        return f

    return mark(fn) if fn is not None else mark


def setup() -> None:
    """For a benchmark's main: INFO logging with times, and SIGTERM (kill, nohup'd runs) unwinding
    like Ctrl-C, so that :func:`run` kills the running child and temp files are removed."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def kind_of(fn) -> str:
    """``MODULE:FUNCTION`` for a worker, also when its module runs as ``python -m MODULE``."""
    if isinstance(fn, str):
        return fn
    module = fn.__module__
    if module == "__main__":
        module = getattr(sys.modules["__main__"].__spec__, "name", None) or module
    return f"{module}:{fn.__qualname__}"


def run(fn, spec: dict, *, timeout: float | None = None, env: dict | None = None, label: str | None = None) -> dict:
    """Run worker ``fn`` (or ``"MODULE:FUNCTION"``) on ``spec`` in a fresh interpreter.

    Never raises for the child's failures: they come back as ``error``. Ctrl-C or SIGTERM in the
    parent (as ``SystemExit``) kills the child and propagates.
    """
    kind = kind_of(fn)
    label = label or kind.rsplit(":", 1)[1]
    with tempfile.TemporaryDirectory(prefix="qvl-harness-") as work:
        spec_path, result_path = pathlib.Path(work) / "spec.json", pathlib.Path(work) / "result.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "qvl.bench.harness", kind, str(spec_path), str(result_path)]
        child_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        jiffies0, cpu0 = probe.cpu_jiffies(), probe.children_cpu_s()
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env,
                                    text=True, errors="replace")
        except OSError as e:
            return {"error": f"could not start child: {e}"}

        def pump():
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                print(f"  [{label}] {line}", file=sys.stderr, flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
        except BaseException:  # interrupted: take the child down with us
            proc.kill()
            proc.wait()
            raise
        reader.join(timeout=5)
        wall = time.perf_counter() - t0
        share = probe.other_cpu_share(jiffies0, probe.cpu_jiffies(), probe.children_cpu_s() - cpu0)
        res = json.loads(result_path.read_text()) if result_path.is_file() else {}
    res["child_wall_s"] = wall
    res["other_cpu_share"] = share
    if rc is None:
        res["error"] = f"timed out after {timeout:.0f}s"
    elif rc != 0 and "error" not in res:
        why = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
        if rc == -9:
            why += " (out of memory?)"
        res["error"] = f"child {why}"
    if "error" in res:
        res["log_tail"] = list(tail)
        log.error("%s: %s", label, res["error"])
    return res


def child_main(kind: str, spec_path: str, result_path: str | None = None) -> int:
    """Run worker ``kind`` on the spec file in this process; write its result (atomically)."""
    spec = json.loads(pathlib.Path(spec_path).read_text())
    res: dict = {}
    memory, rc = False, 0
    try:
        module, name = kind.split(":", 1)
        fn = getattr(importlib.import_module(module), name)
        if not hasattr(fn, "harness_worker"):
            raise TypeError(f"{kind} is not marked with @harness.worker")
        memory = fn.harness_worker["memory"]
        if "threads" in spec:
            import torch

            torch.set_num_threads(spec["threads"])
            res["threads"] = torch.get_num_threads()
        fn(spec, res)
    except Exception as e:  # noqa: BLE001 - the parent reports it
        log.error("%s failed: %s", kind, traceback.format_exc())
        res["error"] = f"{type(e).__name__}: {e}"
        rc = 1
    if memory:
        probe.memory_report(res)
    text = json.dumps(res, indent=2) + "\n"
    if result_path is None:
        sys.stdout.write(text)
    else:
        tmp = pathlib.Path(result_path + ".part")
        tmp.write_text(text)
        tmp.rename(result_path)
    return rc


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3):
        print("usage: python -m qvl.bench.harness MODULE:FUNCTION SPEC.json [RESULT.json]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return child_main(*argv)


if __name__ == "__main__":
    sys.exit(main())
