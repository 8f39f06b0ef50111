"""The quantized benchmark's pieces on the tiny checkpoint, in-process: RTN checkpoints in the
official layouts (cached), core's qvl measurement with weight bytes, the table."""

import json
import shutil

import torch

from qvl.bench import fixtures, interleave, probe, quant
from qvl.runtime.loader import load_model
from qvl.runtime.weights import Checkpoint


def test_bench_quant_pieces(tiny_ckpt, tmp_path):
    src = shutil.copytree(tiny_ckpt, tmp_path / "base")
    (src / fixtures.BUILD_MARKER).write_text(json.dumps({"build_version": fixtures.BUILD_VERSION}))
    dirs = {kind: quant.ensure_quantized(src, kind, 32) for kind in ("gptq-int4", "gptq-int8", "awq")}
    stamp = (dirs["awq"] / "model.safetensors").stat().st_mtime_ns
    assert quant.ensure_quantized(src, "awq", 32) == dirs["awq"]  # cached, not rebuilt
    assert (dirs["awq"] / "model.safetensors").stat().st_mtime_ns == stamp

    # RTN: every dequantized weight within half a step of the original, plus a little for the
    # fp16 rounding of the scale (times up to 127.5 steps) and sym's clip at +amax
    name = "layers.1.mlp.down_proj"
    w = Checkpoint(src).get(f"model.{name}.weight").float()
    for kind, d in dirs.items():
        assert json.loads((d / "config.json").read_text())["quantization_config"]["group_size"] == 32
        m = load_model(d).get_submodule(name)
        step = m.quantized_weight().scales.float().t().repeat_interleave(32, dim=1)
        assert ((m.dequantize() - w).abs() <= 0.6 * step).all(), kind

    res = {}
    spec = {"ckpt": str(dirs["gptq-int4"]), "image": str(fixtures.make_image(tmp_path / "i.png", 112)),
            "dtype": "bfloat16", "new_tokens": 3, "repeats": 1, "threads": torch.get_num_threads()}
    quant.qvl_worker(spec, res)
    assert res["new_tokens"] == 3 and res["decode_tok_s"] > 0 and res["kernels"] == ["int4pack"]
    assert 0 < res["decoder_linear_bytes"] < res["bytes_per_token"]

    result = {"config": "tiny", "group_size": 32, "new_tokens": 3, "threads": 1, "schemes": ["bf16", "int4"],
              "machine": probe.machine_info() | {"loadavg_end": [0.0]}, "prompt_tokens": res["prompt_tokens"],
              "bandwidth": {"bandwidth_gb_s": 10.0, "method": "test"},
              "engines": {"int4": dict(res, act_dtype="bfloat16"), "bf16": {"error": "skipped"}}}
    models = {"bf16": [str(src), "bfloat16"], "int4": [str(dirs["gptq-int4"]), "bfloat16"]}
    result["interleaved"] = {"models": interleave.measure(models, steps=5)}
    result["interleaved"]["models"]["int4"]["bytes_per_token"] = res["bytes_per_token"]
    quant.summarize(result)
    quant.summarize_interleaved(result)
    md = quant.render_markdown(result)
    assert "| int4 | bfloat16 | int4pack |" in md and "| bf16 | ERROR: skipped" in md
    assert result["engines"]["int4"]["fraction_of_roofline"] > 0
    assert "| bf16 | " in md.split("interleaved")[1] and result["interleaved"]["models"]["int4"]["vs_bf16"] > 0
