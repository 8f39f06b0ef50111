"""The auxiliary vision heads and the decoder lookup probe: training-only modules on top of the
Qwen2-VL model, dropped before saving (the checkpoint is plain Qwen2-VL)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qvl.scripts.toy_targets import AUX_CLASSES, AUX_NAMES, DENSE, LOOKUP_LAYER

class AuxHeads(torch.nn.Module):
    """What each image shows, read off the vision tower's merged tokens: one learned
    attention-pooling query per pooled head (the way a decoder layer reads them, ``aux_targets``)
    and a linear map per token (``token_targets``).

    Through the language loss alone the tower learns slowly: the gradient reaching it is a thin
    trickle behind a decoder that first learns answer priors. These heads give every picture
    about twenty direct targets from the generator's ground truth. They are dropped after
    training: the checkpoint is plain Qwen2-VL."""

    def __init__(self, dim: int, dense_facts: bool = False, more_facts: bool = False):
        """``dense_facts``: also train token_targets' corner and motion columns; ``more_facts``:
        all of its columns."""
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.query = torch.nn.Parameter(torch.randn(len(AUX_NAMES), dim) * dim**-0.5)
        self.out = torch.nn.ModuleList(torch.nn.Linear(dim, AUX_CLASSES[n]) for n in AUX_NAMES)
        self.splits = tuple(DENSE.values())[: len(DENSE) if more_facts else 4 if dense_facts else 2]
        self.dense = torch.nn.Linear(dim, sum(self.splits))

    def forward(self, tokens: torch.Tensor, targets: list[int], dense: torch.Tensor | None
                ) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy over the heads with a target (the dense map counts as one head),
        and how many of them were right."""
        x = self.norm(tokens)
        pooled = torch.softmax(x @ self.query.T, dim=0).T @ x  # [heads, dim]
        loss, hits = tokens.new_zeros(()), 0
        for i, (lin, tgt) in enumerate(zip(self.out, targets)):
            if tgt != -100:
                logits = lin(pooled[i])
                loss = loss + F.cross_entropy(logits[None], torch.tensor([tgt]))
                hits += int(logits.argmax()) == tgt
        if dense is not None:
            parts = self.dense(x).split(self.splits, dim=1)
            for k, d in enumerate(parts):
                if (dense[:, k] != -100).any():
                    loss = loss + F.cross_entropy(d, dense[:, k], ignore_index=-100)
            hits += bool((parts[0].argmax(1) == dense[:, 0]).all())
        return loss, hits


class LookupProbe:
    """The lookup heads' attention rows, recomputed from the inputs of layer LOOKUP_LAYER's
    attention (caught by a hook), so the model keeps its fused attention: asking transformers for
    attention probabilities switches every layer to the slower eager path."""

    def __init__(self, model):
        from transformers.models.qwen2_vl import modeling_qwen2_vl as hf

        self._rope = hf.apply_rotary_pos_emb
        self.attn = model.model.language_model.layers[LOOKUP_LAYER].self_attn
        self._hook = self.attn.register_forward_pre_hook(self._catch, with_kwargs=True)
        self._q = self._k = None

    def _catch(self, module, args, kwargs):
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        b, t, _ = h.shape
        a = self.attn
        q = a.q_proj(h).view(b, t, -1, a.head_dim).transpose(1, 2)
        k = a.k_proj(h).view(b, t, -1, a.head_dim).transpose(1, 2)
        self._q, self._k = self._rope(q, k, cos, sin)

    def loss(self, b: int, p: int, head: int, where: list[int], mode: str = "sink") -> torch.Tensor:
        """Head ``head``'s causal attention row at position ``p`` of batch row ``b``: its
        cross-entropy against the even distribution over ``where`` ("sink"), or -log of its mass
        on ``where`` ("mass", "answer")."""
        a = self.attn
        k = self._k[b, head // a.num_key_value_groups, : p + 1]
        logp = torch.log_softmax((k @ self._q[b, head, p]) * a.scaling, dim=0)
        return -logp[where].mean() if mode == "sink" else -logp[where].logsumexp(0)

    def close(self) -> None:
        self._hook.remove()
        self._q = self._k = None


def visual_features(model, inputs: dict) -> list[torch.Tensor]:
    """Run the vision tower once for ``inputs`` (moved into ``mm_encoder_outputs``, so the model
    reuses them); returns the merged tokens of every image, then of every clip."""
    enc_out, feats = {}, []
    if "pixel_values" in inputs:
        enc_out["image"] = model.model.get_image_features(inputs.pop("pixel_values"), inputs["image_grid_thw"],
                                                          return_dict=True)
        feats += list(enc_out["image"].pooler_output)
    if "pixel_values_videos" in inputs:
        enc_out["video"] = model.model.get_video_features(inputs.pop("pixel_values_videos"),
                                                          inputs["video_grid_thw"], return_dict=True)
        feats += list(enc_out["video"].pooler_output)
    inputs["mm_encoder_outputs"] = enc_out
    return feats
