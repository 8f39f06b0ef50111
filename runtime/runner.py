"""The model runner: prefill work for one slot at a time, and one decode step for every live slot.

Cache row ``s`` of every layer belongs to slot ``s``; a sequence's tokens sit at positions
0..length-1 of its row. Prefill is cut into work items (the vision tower's images, a few video
frame pairs, then text chunks of ``prefill_chunk`` tokens), so the engine loop can run one item
between decode steps and a long prompt stalls the running streams by one item at most.

The decode step covers rows 0..B-1 for the smallest bucket B that holds every live slot (the
scheduler hands out the lowest free slot, so live rows stay packed). Its inputs are [B] tokens,
[3, B, 1] positions, [B, 1] write positions and a [B, 1, 1, kv] mask; a row that is not decoding
writes at its own length (a position its owner overwrites before reading it) and attends to key
0 only. With ``kv = max_seq`` ("full") the shapes never change, and on CUDA each bucket's step is
captured once as a CUDA graph and replayed; "live" attends over the longest live prefix instead,
which reads less of the cache on the CPU. Both give the same logits (tests/test_serving.py).
"""

from __future__ import annotations

import logging
import time

import torch

from qvl.model.qwen2_vl import Qwen2VL
from qvl.model.rope import rope_index
from qvl.runtime.embed import encode_video_chunk, splice, sync, video_chunks
from qvl.runtime.sequence import Sequence

log = logging.getLogger(__name__)


def buckets(max_batch: int) -> list[int]:
    """Decode batch sizes: powers of two up to ``max_batch``, and ``max_batch`` itself."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


class ModelRunner:
    def __init__(self, model: Qwen2VL, vision, image_token_id: int, video_token_id: int, device,
                 prefill_chunk: int = 256, decode_kv: str | None = None, cuda_graphs: bool | None = None):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model, self.device = model, torch.device(device)
        self.tower = model.visual if vision is None else vision
        self.image_token_id, self.video_token_id = image_token_id, video_token_id
        self.prefill_chunk = prefill_chunk
        cuda = self.device.type == "cuda"
        self.cuda_graphs = cuda if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not cuda:
            raise ValueError("cuda_graphs needs a CUDA device")
        self.decode_kv = decode_kv or ("full" if self.cuda_graphs else "live")
        if self.decode_kv not in ("full", "live"):
            raise ValueError(f"decode_kv {self.decode_kv!r}: use 'full' or 'live'")
        if self.cuda_graphs and self.decode_kv != "full":
            raise ValueError("a captured decode step attends over the full cache (decode_kv='full')")
        self.buckets = buckets(model.max_batch)
        self._graphs: dict[int, _GraphStep] = {}

    # --- prefill ---------------------------------------------------------------------------

    def start(self, seq: Sequence) -> None:
        """Token embeddings, M-RoPE ids and the vision work of ``seq``'s prompt (into seq.work)."""
        req = seq.request
        ids = torch.tensor([req.ids])
        positions, delta = rope_index(ids, req.vision_grids, (self.image_token_id, self.video_token_id),
                                      self.model.cfg.vision.spatial_merge_size)
        seq.delta = int(delta[0])
        jobs = []
        if req.grids:
            jobs.append(("image", None, 0, 0))
        jobs += [("video", v, t0, t1) for v in req.videos for t0, t1 in video_chunks(v)]
        seq.work.update(ids=ids, embeds=self.model.embed_tokens(ids.to(self.device)),
                        positions=positions.to(self.device), jobs=jobs, image=[], video=[])

    def prefill_step(self, seq: Sequence) -> torch.Tensor | None:
        """Run one prefill work item of ``seq``; the last one returns the logits [1, V] that
        choose its first token (None before that)."""
        w = seq.work
        if w["jobs"]:
            kind, video, t0, t1 = w["jobs"].pop(0)
            t = time.perf_counter()
            if kind == "image":
                pv = seq.request.pixel_values.to(self.device)
                w["image"].append(self.tower.encode(pv, torch.tensor(seq.request.grids)))
            else:
                w["video"].append(encode_video_chunk(self.tower, video, t0, t1, self.device))
            if not w["jobs"]:  # every vision embedding is in: splice them over their pad tokens
                for kind, tok in (("image", self.image_token_id), ("video", self.video_token_id)):
                    if w[kind]:
                        splice(w["embeds"], w["ids"], tok, torch.cat(w[kind]), kind)
                w["image"] = w["video"] = None
            sync(self.device)
            seq.stats.vision_s += time.perf_counter() - t
            return None
        p, total = seq.length, len(seq.request.ids)
        end = min(p + self.prefill_chunk, total)
        mask = None
        if p > 0:  # the chunk sees the row's earlier tokens and itself causally
            q = torch.arange(p, end)[:, None]
            mask = (torch.arange(end)[None, :] <= q)[None, None].to(self.device)  # [1, 1, T, end]
        hidden = self.model(w["embeds"][:, p:end], w["positions"][:, :, p:end],
                            torch.arange(p, end, device=self.device), mask, end, row=seq.slot)
        seq.length = end
        if seq.prompt_logprobs:
            self._prompt_rows(seq, hidden[0], p, end)
        if end < total:
            return None
        w["embeds"] = w["positions"] = None
        return self.model.logits(hidden[:, -1])

    def _prompt_rows(self, seq: Sequence, hidden: torch.Tensor, p: int, end: int) -> None:
        """Log-probs of every text token in (p, end] that the hidden state before it predicts."""
        ids = seq.work["ids"][0]
        nxt = ids[p + 1 : end + 1]
        keep = ((nxt != self.image_token_id) & (nxt != self.video_token_id)).nonzero().flatten()
        if keep.numel():
            logits = self.model.logits(hidden[keep.to(self.device)]).float()
            seq.rows.append(torch.log_softmax(logits, dim=-1).cpu())
            seq.targets.append(nxt[keep])

    # --- decode ----------------------------------------------------------------------------

    def decode(self, live: list[Sequence], lengths: list[int]) -> torch.Tensor:
        """One token for every sequence in ``live`` (each feeds ``seq.last`` at ``seq.length``).

        ``lengths``: every slot's current length (where a row that is not live writes).
        Returns logits [B, V]; row ``seq.slot`` belongs to ``seq``.
        """
        top = max(s.slot for s in live) + 1
        bsz = next(b for b in self.buckets if b >= top)
        tokens = torch.zeros(bsz, dtype=torch.int64)
        pos = torch.zeros(bsz, dtype=torch.int64)
        write = torch.tensor(lengths[:bsz], dtype=torch.int64)
        live_rows = torch.zeros(bsz, dtype=torch.bool)
        for s in live:  # a live row writes at its length, as ``lengths`` already says
            tokens[s.slot], pos[s.slot], live_rows[s.slot] = s.last, s.length + s.delta, True
        write = write.clamp(max=self.model.max_seq - 1)
        kv = self.model.max_seq if self.decode_kv == "full" else int(write[live_rows].max()) + 1
        keys = torch.arange(kv)[None, :]
        mask = torch.where(live_rows[:, None], keys <= write[:, None], keys == 0)  # [B, kv]
        inputs = (tokens, pos.view(1, bsz, 1).expand(3, bsz, 1), write[:, None], mask[:, None, None])
        if self.cuda_graphs:
            graph = self._graphs.get(bsz)
            if graph is None:
                graph = self._graphs[bsz] = _GraphStep(self, bsz)
            return graph(*inputs)
        return self.step(*(x.to(self.device) for x in inputs))

    def step(self, tokens, positions, write_pos, mask) -> torch.Tensor:
        """The decode step's math: tokens [B] -> logits [B, V]."""
        hidden = self.model(self.model.embed_tokens(tokens[:, None]), positions, write_pos, mask, mask.shape[-1])
        return self.model.logits(hidden[:, -1])


class _GraphStep:
    """One bucket's decode step captured as a CUDA graph over static input buffers.

    Capture happens at the first step of this bucket with that step's real inputs, so the warm-up
    runs write the same K/V the replay writes (the same values at the same positions).
    """

    def __init__(self, runner: ModelRunner, bsz: int):
        dev, s = runner.device, runner.model.max_seq
        self.runner = runner
        self.tokens = torch.zeros(bsz, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(3, bsz, 1, dtype=torch.int64, device=dev)
        self.write = torch.zeros(bsz, 1, dtype=torch.int64, device=dev)
        self.mask = torch.zeros(bsz, 1, 1, s, dtype=torch.bool, device=dev)
        self.graph = None
        self.logits = None

    def _load(self, tokens, positions, write, mask):
        self.tokens.copy_(tokens, non_blocking=True)
        self.positions.copy_(positions, non_blocking=True)
        self.write.copy_(write, non_blocking=True)
        self.mask.copy_(mask, non_blocking=True)

    def __call__(self, *inputs) -> torch.Tensor:
        self._load(*inputs)
        if self.graph is None:
            args = (self.tokens, self.positions, self.write, self.mask)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: kernels pick their algorithms outside the capture
                    self.runner.step(*args)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self.runner.step(*args)
            log.info("captured the decode step for batch %d as a CUDA graph", self.tokens.shape[0])
        self.graph.replay()
        return self.logits
