"""bench/llamacpp.py: reading llama-bench's and llama-mtmd-cli's output, the cache key, the ratios
and the table (no build needed); the build itself, a conversion and a llama-bench run (slow)."""

import json
import subprocess
import sys

import pytest

from qvl.bench import llamacpp, probe

BENCH_JSON = json.dumps([{
    "build_commit": "0c1e570", "model_type": "qwen2vl 1.5B Q4_0", "model_size": 1_200_000_000,
    "model_n_params": 1_543_714_304, "n_threads": 2, "n_prompt": 0, "n_gen": 32, "n_depth": 0,
    "avg_ns": 3_500_000_000, "avg_ts": 9.1, "stddev_ts": 0.4, "samples_ns": [1, 2, 3],
    "samples_ts": [8.7, 9.6, 9.0]}])

MTMD_LOG = """\
load_hparams: projector:          qwen2vl_merger
0.28.667.415 I encoding mtmd batch, n_chunks = 1 (done = 1, total = 3)
2.48.792.895 I mtmd batch encoding done in 5123 ms
decoding image batch 1/1, n_tokens_batch = 256
image decoded (batch 1/1) in 2345 ms

w414 w9 w77
llama_perf_context_print:        load time =    1500.00 ms
llama_perf_context_print: prompt eval time =    2600.50 ms /   280 tokens (    9.29 ms per token,   107.67 tokens per second)
llama_perf_context_print:        eval time =    3100.00 ms /    31 runs   (  100.00 ms per token,    10.00 tokens per second)
llama_perf_context_print:       total time =   12000.00 ms /   311 tokens
"""


def test_parse_bench_json():
    r = llamacpp.parse_bench_json(BENCH_JSON)
    assert r["tg_tok_s"] == 9.6 and r["tg_tok_s_avg"] == 9.1 and r["n_gen"] == 32
    assert r["model_size_gb"] == pytest.approx(1.2)
    with pytest.raises(ValueError):  # a prompt-processing test only
        llamacpp.parse_bench_json(json.dumps([{"n_prompt": 512, "n_gen": 0, "avg_ts": 50.0}]))


def test_parse_mtmd_log():
    r = llamacpp.parse_mtmd_log(MTMD_LOG)
    assert r["image_encode_s"] == pytest.approx(5.123) and r["image_decode_s"] == pytest.approx(2.345)
    assert r["prompt_tokens"] == 280 and r["decode_steps"] == 31
    assert r["first_token_s"] == pytest.approx(5.123 + 2.6005)
    assert r["decode_tok_s"] == pytest.approx(10.0) and r["load_s"] == pytest.approx(1.5)
    with pytest.raises(ValueError):
        llamacpp.parse_mtmd_log("error: failed to load model\n")


def test_build_key():
    key = llamacpp.build_key()
    assert key == llamacpp.build_key() and len(key) == 12
    assert llamacpp.build_key(version="0.3.35") != key
    assert llamacpp.build_key(flags=llamacpp.CMAKE_FLAGS + ("-DGGML_AMX_INT8=ON",)) != key
    assert all(f.endswith("=OFF") for f in llamacpp.CMAKE_FLAGS if "AMX" in f)


def test_ratios_within_rounds_and_table():
    def bench(tg, ft, dec):
        return {"tg_tok_s": tg, "first_token_s": ft, "decode_tok_s": dec, "model_size_gb": 1.2}

    result = {"llama_cpp_python": llamacpp.LLAMA_CPP_PYTHON, "threads": 2, "new_tokens": 32, "rounds_run": 2,
              "kl_chats": 8, "machine": probe.machine_info(), "rows": {
                  "llama.cpp Q4_0": {"weights": "Q4_0", "head": "Q6_K",
                                     "rounds": [bench(10.0, 8.0, 9.0), bench(5.0, 16.0, 4.5)]},
                  "qvl int4": {"weights": "gptq-int4", "head": "checkpoint", "kl": 1e-3, "top1": 0.95,
                               "rounds": [{"decode_tok_s": 7.0, "first_token_s": 4.0},
                                          {"decode_tok_s": 3.5, "first_token_s": 8.0, "other_cpu_share": 0.3}]},
                  "qvl int4-q8head": {"weights": "gptq-int4", "head": "int8",
                                      "rounds": [{"error": "child exit code 1"}, {"decode_tok_s": 4.5}]}}}
    llamacpp.summarize(result)
    q4 = result["rows"]["qvl int4"]
    # the speed halved between rounds; the ratio within each round did not move
    assert q4["ratio_decode_vs_tg32_rounds"] == pytest.approx([0.7, 0.7])
    assert q4["ratio_decode"] == pytest.approx(7 / 9) and q4["ratio_first_token"] == pytest.approx(0.5)
    assert result["rows"]["qvl int4-q8head"]["ratio_decode"] == pytest.approx(1.0)  # the failed round is skipped
    md = llamacpp.render(result)
    assert "| qvl int4 | gptq-int4 | checkpoint |" in md and "0.70x" in md and "1.00e-03" in md
    assert "qvl int4-q8head round 1: child exit code 1" in md


@pytest.mark.slow
def test_build_convert_and_bench(tiny_ckpt, tmp_path):
    """The cached build runs; the tiny checkpoint's text model converts, quantizes and benches."""
    bin_dir = llamacpp.ensure_build() / "bin"
    assert llamacpp.ensure_build() / "bin" == bin_dir  # cached
    tree = llamacpp.ensure_source() / "vendor" / "llama.cpp"
    f16, q8 = tmp_path / "tiny-f16.gguf", tmp_path / "tiny-Q8_0.gguf"
    subprocess.run([sys.executable, "-c", llamacpp.CONVERT_SHIM, str(tree), str(tiny_ckpt), "--outtype", "f16",
                    "--outfile", str(f16)], check=True)
    subprocess.run([str(bin_dir / "llama-quantize"), str(f16), str(q8), "Q8_0"], check=True)
    r = llamacpp.llama_bench(bin_dir, q8, threads=1, n_gen=4, reps=1, timeout=300)
    assert r["tg_tok_s"] > 0 and r["n_gen"] == 4
