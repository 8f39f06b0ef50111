"""qvl.runtime.processor against transformers' Qwen2VLImageProcessorPil (exact float32 equality).

Exactness holds because the runtime resizes with the same PIL call on the same uint8 RGB image and
its lookup table is computed with the same numpy ops (float64 rescale, float32 normalize).
"""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from qvl.runtime.processor import ImageProcessor, ImageProcessorConfig, smart_resize

transformers = pytest.importorskip("transformers")
from transformers import AutoImageProcessor, Qwen2VLImageProcessorPil  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (  # noqa: E402
    smart_resize as hf_smart_resize,
)


def _image(w, h, mode="RGB", seed=0):
    """Smooth gradient plus noise, so bicubic over- and undershoot gets exercised."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    rgb = np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    if mode == "RGB":
        return Image.fromarray(rgb)
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
        return Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA")
    if mode == "P_transparent":
        im = Image.fromarray(rgb).convert("P")
        im.info["transparency"] = 0
        return im
    return Image.fromarray(rgb).convert(mode)


def _assert_same(ours: ImageProcessor, ref, images):
    pv, grid = ours(images)
    want = ref(images, return_tensors="pt")
    assert grid.dtype == torch.int64 and pv.dtype == torch.float32
    assert torch.equal(grid, want["image_grid_thw"])
    assert pv.shape == want["pixel_values"].shape
    assert torch.equal(pv, want["pixel_values"]), (pv - want["pixel_values"]).abs().max()


@pytest.fixture(scope="module")
def default_pair():
    return ImageProcessor(ImageProcessorConfig()), Qwen2VLImageProcessorPil()


@pytest.mark.parametrize(
    "w,h",
    [(28, 28), (56, 56), (20, 20), (100, 37), (448, 448), (1280, 720), (37, 1000), (3000, 2000),
     (10, 1000)],
)
def test_sizes_match_transformers(default_pair, w, h):
    _assert_same(*default_pair, [_image(w, h)])


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA", "P_transparent", "CMYK"])
def test_modes_match_transformers(default_pair, mode):
    _assert_same(*default_pair, [_image(123, 77, mode)])


def test_several_images_one_call(default_pair):
    images = [_image(300, 200, seed=1), _image(64, 500, "RGBA", seed=2), _image(28, 28, seed=3)]
    _assert_same(*default_pair, images)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_pixels": 256 * 28 * 28, "max_pixels": 512 * 28 * 28},
        {"min_pixels": 28 * 28, "max_pixels": 64 * 28 * 28},
        {"image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5)},
        {"do_normalize": False},
        {"do_rescale": False, "do_normalize": False},
        {"resample": 2, "temporal_patch_size": 3},
    ],
)
def test_non_default_settings_match_transformers(kwargs):
    ours = ImageProcessor(ImageProcessorConfig(**kwargs))
    _assert_same(ours, Qwen2VLImageProcessorPil(**kwargs), [_image(640, 480), _image(50, 90, "RGBA")])


def test_patch_layout():
    """Row r of a 2x2 merge block holds channel-major [C][T][14][14] of the r-th patch, row-major."""
    cfg = ImageProcessorConfig(do_rescale=False, do_normalize=False)
    arr = np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    pv, grid = ImageProcessor(cfg)([Image.fromarray(arr)])
    assert grid.tolist() == [[1, 4, 6]]
    rows = pv.numpy().reshape(-1, 3, 2, 14, 14)
    # second block (block row 0, block col 1), its third patch (inner row 1, col 0)
    patch = arr[14:28, 28:42].transpose(2, 0, 1)
    np.testing.assert_array_equal(rows[4 + 2, :, 0], patch)
    np.testing.assert_array_equal(rows[4 + 2, :, 1], patch)


def test_smart_resize_matches_transformers_grid():
    for h in [1, 5, 14, 27, 28, 29, 55, 100, 333, 1000, 4000]:
        for w in [3, 28, 41, 200, 999, 2500]:
            if max(h, w) / min(h, w) > 200:
                continue
            for lo, hi in [(3136, 1003520), (784, 50176), (3136, 12845056)]:
                assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


def test_aspect_ratio_over_200_raises():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)
    with pytest.raises(ValueError, match="aspect ratio"):
        ImageProcessor()([Image.new("RGB", (201, 1))])


def _write(tmp_path, files):
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    return tmp_path


_TYPE = {"image_processor_type": "Qwen2VLImageProcessor"}
_MEAN = {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "patch_size": 14}
_EDGES = {"size": {"shortest_edge": 1000, "longest_edge": 200000}}
_PRE, _PROC = "preprocessor_config.json", "processor_config.json"
CONFIG_CASES = {
    # official Qwen2-VL checkpoints: top-level limits
    "top_level": {_PRE: {**_TYPE, **_MEAN, "min_pixels": 3136, "max_pixels": 12845056}},
    "size_edges": {_PRE: {**_TYPE, **_EDGES}},
    "top_level_wins": {_PRE: {**_TYPE, **_EDGES, "min_pixels": 1111, "max_pixels": 222222}},
    "mixed": {_PRE: {**_TYPE, **_EDGES, "min_pixels": 1111}},
    "size_pixels_and_top": {
        _PRE: {**_TYPE, "min_pixels": 1111, "max_pixels": 222222, "size": {"min_pixels": 1, "max_pixels": 2}}
    },
    "empty": {_PRE: {**_TYPE, "unknown_key": 1}},
    # transformers 5 / GPTQModel exports: nested under image_processor, beats preprocessor_config
    "nested": {
        _PROC: {"image_processor": {**_TYPE, **_MEAN, **_EDGES}},
        _PRE: {**_TYPE, "min_pixels": 5, "max_pixels": 6},
    },
    "nested_top_level": {_PROC: {"image_processor": {**_TYPE, **_EDGES, "max_pixels": 222222}}},
    "processor_without_image_processor": {
        _PROC: {"processor_class": "Qwen2VLProcessor"},
        _PRE: {**_TYPE, "min_pixels": 1111, "max_pixels": 222222},
    },
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_from_dir_matches_transformers(tmp_path, case):
    d = _write(tmp_path, CONFIG_CASES[case])
    cfg = ImageProcessorConfig.from_dir(d)
    ref = Qwen2VLImageProcessorPil.from_pretrained(str(d))
    assert (cfg.min_pixels, cfg.max_pixels) == (ref.size["shortest_edge"], ref.size["longest_edge"])
    assert cfg.image_mean == tuple(ref.image_mean) and cfg.image_std == tuple(ref.image_std)
    assert (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size) == (
        ref.patch_size, ref.merge_size, ref.temporal_patch_size)
    _assert_same(ImageProcessor(cfg), ref, [_image(900, 700)])


def test_config_auto_image_processor(tmp_path):
    d = _write(tmp_path, CONFIG_CASES["nested"])
    ref = AutoImageProcessor.from_pretrained(str(d))
    cfg = ImageProcessorConfig.from_dir(d)
    assert (cfg.min_pixels, cfg.max_pixels) == (ref.size["shortest_edge"], ref.size["longest_edge"])


def test_config_size_min_max_pixels_only(tmp_path):
    # transformers 5.24 loads this shape but raises on the first call; we use the values
    d = _write(tmp_path, {"preprocessor_config.json": {"size": {"min_pixels": 1000, "max_pixels": 200000}}})
    cfg = ImageProcessorConfig.from_dir(d)
    assert (cfg.min_pixels, cfg.max_pixels) == (1000, 200000)


def test_config_missing_gives_defaults_with_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="qvl.runtime.processor"):
        cfg = ImageProcessorConfig.from_dir(tmp_path)
    assert cfg == ImageProcessorConfig()
    assert "no image processor config" in caplog.text


def test_config_bad_json_raises(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        ImageProcessorConfig.from_dir(tmp_path)
