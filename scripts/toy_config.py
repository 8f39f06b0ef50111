"""qvl-toy's fixed shape: architecture, vocabulary, pixel range, default task mix and sample seeds.

The training script (``train_toy``), its evaluation and its model card (``toy_card``) all read
these, so the card describes the model the script builds.
"""

# Small enough to train on 2 CPU cores in 40 minutes; the vision tower is the part that must be good.
# Every decoder linear's input width (256, 768) is a multiple of 128, so the ecosystem's default
# group size 128 quantizes the toy. head_dim = 256 / 4 = 64: mrope_section (halves of the rotary
# dims) sums to 32, split as Qwen's 16:24:24.
TEXT_DIMS = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=768, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=4096)
VISION_DIMS = dict(depth=4, embed_dim=96, num_heads=4, mlp_ratio=3, patch_size=14, temporal_patch_size=2,
                   spatial_merge_size=2, in_chans=3)
MROPE_SECTION = (8, 12, 12)
VOCAB_SIZE = 1024
# Images keep to the training range whatever a user sends; 4..64 vision tokens an image.
MIN_PIXELS, MAX_PIXELS = 56 * 56, 224 * 224
# Training mix: the tasks that need more than a glance (reading, counting, comparing) get more.
# Scene pictures also carry follow-up questions of the other scene tasks (synth's ``extra``), so
# those tasks need fewer pictures of their own.
TASK_WEIGHTS = {"shape": 0.5, "colour": 0.6, "count": 2.0, "position": 0.6, "ocr": 3.0, "compare": 2.0,
                "direction": 0.5}

# Disjoint sample streams: training, held-out (early stopping). The final table uses synth's test seed.
TRAIN_SEED, HELDOUT_SEED, TEST_SEED = 10_000, 20_000, 1
