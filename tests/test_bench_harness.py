"""bench/harness.py: a worker in a fresh process, its result, and failures reported, not raised."""

from qvl.bench import core, harness


def test_a_worker_runs_in_a_fresh_process_and_reports_its_own_memory():
    res = harness.run(core.bandwidth_worker, {"bandwidth_bytes": 1 << 20, "threads": 1}, timeout=120)
    assert "error" not in res, res
    assert res["kind"] == "bandwidth" and res["threads"] == 1 and res["bandwidth_gb_s"] > 0
    assert res["peak_rss_gb"] > 0 and res["child_wall_s"] > 0


def test_failures_come_back_as_an_error_field():
    res = harness.run("qvl.bench.core:main", {}, timeout=120)  # not marked as a worker
    assert "not marked" in res["error"] and res["log_tail"]
    res = harness.run("qvl.bench.nowhere:worker", {}, timeout=120)
    assert "ModuleNotFoundError" in res["error"]
    res = harness.run(core.bandwidth_worker, {"bandwidth_bytes": 1 << 20}, timeout=0.01)
    assert res["error"].startswith("timed out")


def test_kind_names_the_module_and_function():
    assert harness.kind_of(core.qvl_worker) == "qvl.bench.core:qvl_worker"
