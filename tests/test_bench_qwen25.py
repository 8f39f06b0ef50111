"""bench/qwen25.py on toy dims: both engines share the weights and compute the same function.

bf16 on both sides: merged vision features within 2% of transformers' largest (bf16 rounding
through 4 blocks, in other summation orders), and the first greedy token from the prefill equal.
"""

import torch

from qvl.bench import qwen25


def _toy():
    raw = qwen25.config_3b()
    raw.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=151936 // 64, image_token_id=2370, video_token_id=2371,
               vision_start_token_id=2368, vision_end_token_id=2369, vision_token_id=2367, bos_token_id=2365,
               eos_token_id=2366, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    raw["vision_config"].update(depth=4, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64,
                                window_size=56, fullatt_block_indexes=[1])
    return raw


def test_engines_share_weights_and_agree():
    hf, ours = qwen25.build_pair(_toy())
    assert ours.embed_tokens.weight.data_ptr() == hf.model.language_model.embed_tokens.weight.data_ptr()
    assert ours.visual.blocks[0].mlp.gate_proj.weight.data_ptr() == \
        hf.model.visual.blocks[0].mlp.gate_proj.weight.data_ptr()
    rows = qwen25.bench_vision(hf, ours, rounds=1, cases={"56x84": (1, 4, 6), "112x112": (1, 8, 8)})
    assert len(rows) == 4 and all(r["max_rel_diff"] < 2e-2 for r in rows)
    assert all(r["gflop"] > 0 and r["min_ms"] > 0 for r in rows)
    d = qwen25.bench_decode(hf, ours, steps=3)
    assert d["tokens"]["qvl"][0] == d["tokens"]["transformers"][0]
    assert d["qvl"]["steps"] == 3 and d["decode_bytes_per_token"] > 0
    md = qwen25.markdown({"machine": {"date": "d", "cpu_model": "c", "torch": torch.__version__,
                                      "transformers": "t", "loadavg_start": [1.0]},
                          "rounds": 1, "steps": 3, "threads": 1, "copy_gb_s": 1.0, "loadavg_end": 1.0,
                          "vision": rows, "decode": d})
    assert "| qvl |" in md and "56x84" in md


def test_cases_are_the_grids_of_their_pictures():
    """Each case's grid is what the image processor makes of a picture of that name's size (the
    release's pixel limits), so 1288x728 runs at its full 4784 patches: windows of 112 px cut at
    its bottom and right edges (52 x 92 patches, 8-patch windows)."""
    from qvl.runtime.processor import ImageProcessor

    proc = ImageProcessor()
    for name, (t, h, w) in qwen25.CASES.items():
        width, height = map(int, name.split("x"))
        assert t == 1 and proc.target_size(height, width) == (h * 14, w * 14), name
    assert qwen25.CASES["1288x728"] == (1, 52, 92)
