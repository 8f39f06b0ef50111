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
from qvl.runtime.embed import VIDEO_CHUNK_PATCHES, encode_video_chunk, sync, video_chunks
from qvl.runtime.prefix_cache import PrefixCache, VisionCache
from qvl.runtime.sequence import Sequence

log = logging.getLogger(__name__)


def buckets(max_batch: int) -> list[int]:
    """Decode batch sizes: powers of two up to ``max_batch``, and ``max_batch`` itself."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def vision_spans(ids: list[int], image_token_id: int, video_token_id: int) -> list[tuple[int, int, str]]:
    """(start, end, kind) of each run of image or video placeholders, in prompt order."""
    spans, i, n = [], 0, len(ids)
    while i < n:
        tok = ids[i]
        if tok == image_token_id or tok == video_token_id:
            j = i
            while j < n and ids[j] == tok:
                j += 1
            spans.append((i, j, "image" if tok == image_token_id else "video"))
            i = j
        else:
            i += 1
    return spans


def token_keys(ids: list[int], spans, vision_keys: list[bytes]) -> list:
    """The prompt's prefix-cache keys: its ids, each picture's placeholders replaced by its digest."""
    keys = list(ids)
    for (s0, s1, _), key in zip(spans, vision_keys):
        keys[s0:s1] = [key] * (s1 - s0)
    return keys


def image_groups(encode: list[tuple[int, int]], sizes: list[int], cap: int | None) -> list[list[tuple[int, int]]]:
    """``encode``'s (span, image) pairs cut, in order, into tower calls of at most ``cap`` patches
    (one call: no cap). Attention never crosses an image, so the groups' embeddings are one call's."""
    if cap is None:
        return [encode]
    groups, total = [], cap + 1
    for item in encode:
        n = sizes[item[1]]
        if total + n > cap:
            groups.append([])
            total = 0
        groups[-1].append(item)
        total += n
    return groups


class ModelRunner:
    def __init__(self, model: Qwen2VL, vision, image_token_id: int, video_token_id: int, device,
                 prefill_chunk: int = 256, decode_kv: str | None = None, cuda_graphs: bool | None = None,
                 prefix_cache_bytes: int = 0, vision_cache_bytes: int = 0, vision_call_patches: int | None = None):
        """``vision_call_patches``: the most patches one vision-tower call may take (a memory budget's
        room for its activations): a request's images go in groups under it, videos in chunks."""
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
        self.caches = [layer.self_attn.kv_cache for layer in model.layers]
        self.prefix = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.vision_cache = VisionCache(vision_cache_bytes) if vision_cache_bytes > 0 else None
        self.vision_call_patches = vision_call_patches

    # --- prefill ---------------------------------------------------------------------------

    def start(self, seq: Sequence) -> None:
        """Token embeddings, M-RoPE ids and the vision work of ``seq``'s prompt (into seq.work);
        with a prefix cache hit, the shared rows are copied into the slot and prefill starts after."""
        req = seq.request
        ids = torch.tensor([req.ids])
        cfg = self.model.cfg
        positions, delta = rope_index(ids, req.vision_grids, (self.image_token_id, self.video_token_id),
                                      cfg.vision.spatial_merge_size, seconds=req.vision_seconds,
                                      tokens_per_second=cfg.tokens_per_second)
        seq.delta = int(delta[0])
        spans = vision_spans(req.ids, self.image_token_id, self.video_token_id)
        if len(spans) != len(req.vision_grids):
            raise ValueError(f"{len(spans)} runs of vision placeholders for {len(req.vision_grids)} images and videos")
        keyed = len(req.vision_keys) == len(spans)
        seq.keys = token_keys(req.ids, spans, req.vision_keys) if keyed else None
        hit = 0
        if self.prefix is not None and seq.keys is not None and not seq.prompt_logprobs:
            entry, n = self.prefix.lookup(seq.keys)
            n = min(n, len(req.ids) - 1)  # the last prompt token runs: its logits choose the first new one
            for s0, s1, _ in spans:  # never start inside a picture
                if s0 < n < s1:
                    n = s0
            if entry is not None and n >= self.prefix.min_tokens:
                PrefixCache.load(entry, n, self.caches, seq.slot)
                hit = n
        seq.length = seq.stats.cached_tokens = hit
        # vision work for the pictures after the cached prefix, each looked up by its digest first
        vis, jobs, encode, images = {}, [], [], 0
        for i, (s0, s1, kind) in enumerate(spans):
            number = images if kind == "image" else i - images
            images += kind == "image"
            if s1 <= hit:
                continue
            key = req.vision_keys[i] if keyed else None
            cached = self.vision_cache.get(key) if self.vision_cache is not None and key is not None else None
            if cached is not None:
                vis[i] = cached
            elif kind == "image":
                encode.append((i, number))
            else:
                video = req.videos[number]
                chunks = video_chunks(video, min(VIDEO_CHUNK_PATCHES, self.vision_call_patches or VIDEO_CHUNK_PATCHES))
                jobs += [("video", i, video, t0, t1, j == len(chunks) - 1) for j, (t0, t1) in enumerate(chunks)]
        if encode:
            sizes = [g[0] * g[1] * g[2] for g in req.grids]
            groups = image_groups(encode, sizes, self.vision_call_patches)
            jobs[:0] = [("image", group, None, 0, 0, True) for group in groups]
        seq.work.update(ids=ids, embeds=self.model.embed_tokens(ids.to(self.device)),
                        positions=positions.to(self.device), jobs=jobs, vis=vis, parts={}, spans=spans, spliced=False,
                        keyed=keyed)

    def prefill_step(self, seq: Sequence) -> torch.Tensor | None:
        """Run one prefill work item of ``seq``; the last one returns the logits [1, V] that
        choose its first token (None before that)."""
        w = seq.work
        if w["jobs"]:
            self._vision_job(seq, w["jobs"].pop(0))
            return None
        if not w["spliced"]:  # every vision embedding is in: write them over their placeholders
            for i, emb in w["vis"].items():
                s0, s1, kind = w["spans"][i]
                if emb.shape[0] != s1 - s0:
                    raise ValueError(f"{s1 - s0} {kind} placeholder tokens for {emb.shape[0]} vision embeddings")
                w["embeds"][0, s0:s1] = emb.to(w["embeds"].dtype)
            w["vis"], w["spliced"] = None, True
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

    def _vision_job(self, seq: Sequence, job) -> None:
        kind, what, video, t0, t1, last = job
        req, w, t = seq.request, seq.work, time.perf_counter()
        if kind == "image":  # the images not cached, in one tower call (per group under a memory budget)
            sizes = [g[0] * g[1] * g[2] for g in req.grids]
            starts = [sum(sizes[:j]) for j in range(len(sizes))]
            parts = [req.pixel_values[starts[j] : starts[j] + sizes[j]] for _, j in what]
            rows = parts[0] if len(parts) == 1 else torch.cat(parts)  # one image: its rows as they are, no copy
            out = self.tower.encode(rows.to(self.device), torch.tensor([req.grids[j] for _, j in what]))
            merge = self.model.cfg.vision.spatial_merge_size ** 2
            for (i, j), emb in zip(what, out.split([sizes[j] // merge for _, j in what])):
                w["vis"][i] = emb
                self._remember(seq, i, emb)
        else:
            w["parts"].setdefault(what, []).append(encode_video_chunk(self.tower, video, t0, t1, self.device))
            if last:
                w["vis"][what] = emb = torch.cat(w["parts"].pop(what))
                self._remember(seq, what, emb)
        sync(self.device)
        seq.stats.vision_s += time.perf_counter() - t

    def _remember(self, seq: Sequence, i: int, emb: torch.Tensor) -> None:
        if self.vision_cache is not None and seq.work["keyed"]:
            self.vision_cache.put(seq.request.vision_keys[i], emb)

    def retire(self, seq: Sequence) -> None:
        """Keep an ended request's KV rows in the prefix cache (its prompt and the answer tokens
        that were fed), before anything else writes its slot."""
        if self.prefix is None or seq.keys is None or seq.slot < 0:
            return
        n = seq.length
        keys = seq.keys[:n] + seq.out_ids[: max(n - len(seq.keys), 0)]
        if len(keys) == n:
            self.prefix.store(keys, self.caches, seq.slot)

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
