"""The machine, as the benchmarks see it: /proc readers, CPU and memory, copy bandwidth, quiet.

Every reader returns None (or a fallback) where there is no /proc, so the benchmarks still run,
with fewer figures, elsewhere.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import pathlib
import platform
import time

log = logging.getLogger("qvl.bench.probe")

GB = 1e9


# --------------------------------------------------------------------------------------------
# this process


def status_kb(key: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: its peak); None without /proc."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_kb() -> int:
    """This process's own peak RSS in KiB: VmHWM, not ``ru_maxrss`` (the fallback without /proc).
    Linux carries a parent's ``ru_maxrss`` into a child spawned by vfork + exec, which is how
    Python's subprocess starts one, so a worker started by a large parent would report the
    parent's peak instead of its own."""
    hwm = status_kb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def rss_now_gb() -> float | None:
    rss = status_kb("VmRSS")
    return rss * 1024 / GB if rss is not None else None


def memory_report(res: dict) -> None:
    """Add this process's peak RSS, its parts and its major page faults to ``res``."""
    import resource

    res["major_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    for key, name in (("VmHWM", "vmhwm_gb"), ("RssAnon", "rss_anon_gb"), ("RssFile", "rss_file_gb")):
        kb = status_kb(key)
        res[name] = kb * 1024 / GB if kb is not None else None
    res["peak_rss_gb"] = peak_rss_kb() * 1024 / GB


def children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's finished, waited-for children."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# --------------------------------------------------------------------------------------------
# the machine


def meminfo_gb(key: str) -> float | None:
    """A field of /proc/meminfo (MemTotal, MemAvailable, ...) in GB; None without /proc."""
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return None


def cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    try:
        f = [int(x) for x in pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return sum(f) - idle, sum(f)


def other_cpu_share(jiffies0, jiffies1, own_cpu_s: float) -> float | None:
    """Share of all CPUs that other processes used between two :func:`cpu_jiffies` readings,
    given the CPU seconds ``own_cpu_s`` our own work used meanwhile."""
    if not (jiffies0 and jiffies1):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    busy_s, total_s = (jiffies1[0] - jiffies0[0]) / hz, (jiffies1[1] - jiffies0[1]) / hz
    return max(0.0, (busy_s - own_cpu_s) / total_s) if total_s > 0 else None


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_info() -> dict:
    import torch

    try:
        import transformers
        tf_version = transformers.__version__
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        tf_version = f"unavailable ({e})"
    import qvl

    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mem_total_gb": meminfo_gb("MemTotal"),
        "mem_available_gb": meminfo_gb("MemAvailable"),
        "loadavg_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": tf_version,
        "qvl": qvl.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------------------------
# rooflines


def copy_bandwidth(n: int = 1 << 30, tries: int = 5) -> dict:
    """Memory copy bandwidth: ``dst.copy_(src)`` of ``n`` bytes, read + write bytes, best of ``tries``."""
    import torch

    src = torch.empty(n, dtype=torch.uint8)
    src.fill_(1)
    dst = torch.empty_like(src)
    dst.fill_(0)  # touch every page before timing
    times = []
    for _ in range(tries):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return dict(bytes=n, copy_s=times, bandwidth_gb_s=2 * n / min(times) / GB,
                method=f"torch uint8 dst.copy_(src) of {n / 2**30:.2f} GiB, read+write bytes, best of {tries}")


def matmul_peak_gflops(n: int = 2048, tries: int = 5) -> float:
    """fp32 matmul throughput: torch ``n``^3 matmul, best of ``tries`` after one warm-up."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


# --------------------------------------------------------------------------------------------
# waiting for a fair measurement


def warm_page_cache(ckpt: pathlib.Path) -> None:
    """Read the weight files once so that no engine pays for (or benefits from) a cold disk."""
    buf = bytearray(64 << 20)
    for f in sorted(pathlib.Path(ckpt).glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def wait_for_idle(max_wait: float, threshold: float = 0.3) -> float:
    """Wait up to ``max_wait`` s until other processes use under ``threshold`` of the CPUs."""
    t0 = time.perf_counter()
    while True:
        a = cpu_jiffies()
        time.sleep(5)
        b = cpu_jiffies()
        busy = (b[0] - a[0]) / max(b[1] - a[1], 1) if a and b else 0.0
        waited = time.perf_counter() - t0
        if busy < threshold or waited >= max_wait:
            if busy >= threshold:
                log.warning("machine still %.0f%% busy after waiting %.0fs; measuring anyway", 100 * busy, waited)
            return busy
        if int(waited) // 60 != int(waited - 5) // 60 or waited < 6:
            log.info("machine %.0f%% busy with other work; waiting (%.0fs so far)", 100 * busy, waited)


def wait_for_memory(need_gb: float, max_wait: float) -> float | None:
    """Wait up to ``max_wait`` s for ``need_gb`` of MemAvailable; returns what is available."""
    t0 = time.perf_counter()
    while True:
        avail = meminfo_gb("MemAvailable")
        if avail is None or avail >= need_gb:
            return avail
        waited = time.perf_counter() - t0
        if waited >= max_wait:
            return avail
        if int(waited) // 60 != int(waited - 10) // 60 or waited < 1:
            log.info("%.1f GB available, this engine needs ~%.1f GB; waiting (%.0fs so far)", avail, need_gb, waited)
        time.sleep(10)
