"""Component parity with transformers in fp32: vision tower, M-RoPE index, logits.

Tolerances (fp32, CPU): vision features and logits within 1e-4 absolute (observed ~1e-6;
the gap is summation order in matmul vs conv3d / SDPA kernels). Rope ids: exact.
"""

import json

import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration

from qvl.model.rope import rope_index
from qvl.model.vision import vision_positions
from qvl.runtime.loader import load_model

ATOL = 1e-4


@pytest.fixture(scope="module", params=["tiny_ckpt", "tiny_ckpt_tied"])
def pair(request):
    path = request.getfixturevalue(request.param)
    hf = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_model(path)
    ours.setup_caches(2, 256, torch.float32)
    return path, hf, ours


def _ids(path):
    cfg = json.loads((path / "config.json").read_text())
    return cfg["image_token_id"], cfg["video_token_id"], cfg["vision_start_token_id"], cfg["vision_end_token_id"]


def _pixels(grids, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, 1176, generator=g)


@pytest.mark.parametrize("grids", [[(1, 4, 4)], [(1, 8, 12), (1, 4, 4)], [(2, 6, 4)], [(1, 2, 40)]])
def test_vision_features(pair, grids):
    _, hf, ours = pair
    pv, g = _pixels(grids), torch.tensor(grids)
    with torch.no_grad():
        ref = hf.model.visual(pv, grid_thw=g).pooler_output
        got = ours.visual.encode(pv, g)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_vision_positions_merge_block_order():
    pos, cu = vision_positions(torch.tensor([[1, 4, 4], [2, 2, 2]]), 2)
    # the first merge block of a 4x4 grid is (0,0) (0,1) (1,0) (1,1), then the block to its right
    assert pos[:8].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert cu.tolist() == [0, 16, 20, 24]


def _prompt(path, grids, text_lens):
    """ids: text, then for each grid <vs> pads <ve> text ... (as the chat template lays them out)."""
    img, _, vs, ve = _ids(path)
    ids = list(range(10, 10 + text_lens[0]))
    for (t, h, w), n in zip(grids, text_lens[1:]):
        ids += [vs] + [img] * (t * h * w // 4) + [ve] + list(range(20, 20 + n))
    return ids


@pytest.mark.parametrize("grids,text_lens", [
    ([], [7]),
    ([(1, 4, 6)], [3, 4]),
    ([(1, 8, 4), (1, 2, 2), (1, 4, 4)], [2, 1, 3, 5]),
])
def test_rope_index_matches_transformers(pair, grids, text_lens):
    path, hf, _ = pair
    img, vid, _, _ = _ids(path)
    ids = torch.tensor([_prompt(path, grids, text_lens)])
    ours, delta = rope_index(ids, grids, (img, vid), 2)
    if not grids:  # transformers' text-only path: plain arange on every axis
        assert torch.equal(ours, torch.arange(ids.shape[1]).expand(3, 1, -1))
        assert delta.tolist() == [0]
        return
    ref, ref_delta = hf.model.get_rope_index(ids, (ids == img).int(), image_grid_thw=torch.tensor(grids))
    assert torch.equal(ours, ref)
    assert delta.tolist() == ref_delta.view(-1).tolist()


def test_rope_index_left_padded_batch(pair):
    path, hf, _ = pair
    img, vid, _, _ = _ids(path)
    a = _prompt(path, [(1, 4, 6)], [3, 4])
    b = _prompt(path, [(1, 2, 2), (1, 4, 4)], [1, 2, 2])
    seqlen = max(len(a), len(b))
    ids = torch.zeros(2, seqlen, dtype=torch.long)
    mask = torch.zeros(2, seqlen, dtype=torch.long)
    for r, row in enumerate([a, b]):
        ids[r, seqlen - len(row):] = torch.tensor(row)
        mask[r, seqlen - len(row):] = 1
    grids = [(1, 4, 6), (1, 2, 2), (1, 4, 4)]
    ours, delta = rope_index(ids, grids, (img, vid), 2, mask)
    ref, ref_delta = hf.model.get_rope_index(ids, (ids == img).int(), image_grid_thw=torch.tensor(grids),
                                             attention_mask=mask)
    keep = mask.bool()
    assert torch.equal(ours[:, keep], ref[:, keep])
    # ours is relative to the padded length, transformers' to the unpadded one
    assert (delta + seqlen).tolist() == (ref_delta.view(-1) + mask.sum(1)).tolist()


def test_rope_index_rejects_mismatched_grids(pair):
    path, _, _ = pair
    img, vid, _, _ = _ids(path)
    ids = torch.tensor([_prompt(path, [(1, 4, 6)], [3, 4])])
    with pytest.raises(ValueError, match="does not match grid"):
        rope_index(ids, [(1, 4, 4)], (img, vid), 2)
    with pytest.raises(ValueError, match="more image/video grids"):
        rope_index(ids, [(1, 4, 6), (1, 2, 2)], (img, vid), 2)


@pytest.mark.parametrize("grids,text_lens", [([], [9]), ([(1, 4, 6), (1, 6, 2)], [4, 3, 5])])
def test_logits_match_transformers(pair, grids, text_lens):
    path, hf, ours = pair
    img, vid, _, _ = _ids(path)
    ids = torch.tensor([_prompt(path, grids, text_lens)])
    pv = _pixels(grids, seed=1) if grids else None
    g = torch.tensor(grids) if grids else None
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pv, image_grid_thw=g, mm_token_type_ids=(ids == img).int()).logits
        emb = ours.embed_tokens(ids)
        if grids:
            emb[ids == img] = ours.visual.encode(pv, g)
        pos, _ = rope_index(ids, grids, (img, vid), 2)
        got = ours.logits(ours(emb, pos, torch.arange(ids.shape[1]), None, ids.shape[1]))
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
