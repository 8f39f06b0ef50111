"""torch's built-in int4 weight-only matmul, wrapped: availability, weight repacking, the call.

``_weight_int4pack_mm[_for_cpu](x, w, group, scales_zeros)`` computes x @ W.T with
W[n, k] = (q[n, k] - 8) * scale[k // group, n] + zero[k // group, n], scales_zeros being
[K/group, N, 2] in the activation dtype. On torch 2.13 (Xeon, AVX512-BF16) the CPU kernel
is fast only for bf16 activations (bench/results/quant.md has its decode rate against dense
bf16; with fp32 or fp16 activations it is far slower than their dense matmul), takes group
sizes 32/64/128/256 and needs N % 16 == 0. CUDA needs sm80+, bf16, N % 8 and
K % (16 * inner_k_tiles) (torchao's tensor-core tiled layout). Each (device, dtype) is probed
once against the plain formula, so a torch build whose ops differ degrades to the dequantize
fallback instead of wrong numbers.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

GROUPS = (256, 128, 64, 32)  # the kernels' group sizes, largest first
_probed: dict[tuple, bool] = {}


def kernel_group(group_size: int) -> int | None:
    """Largest kernel group dividing ``group_size``: a checkpoint group of 512 (or a whole
    row) runs as 2+ kernel groups sharing one scale."""
    return next((g for g in GROUPS if group_size % g == 0), None)


def _inner_k_tiles(k: int) -> int | None:
    return next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)


def unsupported_reason(device: torch.device, dtype: torch.dtype, n: int, k: int, group_size: int) -> str | None:
    """Why the int4 kernel cannot run this shape here, or None when it can."""
    if kernel_group(group_size) is None:
        return f"group size {group_size} is not a multiple of 32"
    if device.type == "cpu":
        if dtype != torch.bfloat16:
            return f"the CPU int4 kernel is fast only with bfloat16 activations, not {dtype}"
        if n % 16:
            return f"out_features {n} is not a multiple of 16"
    elif device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "the CUDA int4 kernel needs compute capability 8.0+"
        if dtype != torch.bfloat16:
            return f"the CUDA int4 kernel takes bfloat16 activations, not {dtype}"
        if n % 8 or _inner_k_tiles(k) is None:
            return f"shape [{n}, {k}] does not tile (N % 8, K % 32)"
    else:
        return f"no int4 kernel for device type {device.type!r}"
    if not _probe(device, dtype):
        return "the int4 kernel failed its self-check on this torch build"
    return None


def pack(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] values in [0, 16) -> the kernel's opaque packed weight on q's device."""
    if q.device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
    # CUDA wants two values per byte, even k in the high nibble
    q = q.to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(),
                                                      _inner_k_tiles(q.shape[1]))


def scales_zeros(scale: torch.Tensor, zero: torch.Tensor, group_size: int, dtype) -> torch.Tensor:
    """fp32 [n_groups, N] scale and additive zero -> [K/kernel_group, N, 2] in ``dtype``."""
    rep = group_size // kernel_group(group_size)
    sz = torch.stack([scale, zero], dim=-1)
    if rep > 1:
        sz = sz.repeat_interleave(rep, dim=0)
    return sz.to(dtype).contiguous()


def mm(x: torch.Tensor, w: torch.Tensor, group: int, sz: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W.T for a packed ``w``; ``group`` is the kernel group."""
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, group, sz)
    return torch.ops.aten._weight_int4pack_mm(x, w, group, sz)


def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    key = (device.type, device.index, dtype)
    if key not in _probed:
        _probed[key] = _check(device, dtype)
    return _probed[key]


def _check(device, dtype) -> bool:
    g = torch.Generator().manual_seed(0)
    n, k, group = 32, 256, 64
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.rand(k // group, n, generator=g) + 0.5
    zero = torch.randn(k // group, n, generator=g)
    x = torch.randn(3, k, generator=g)
    w = (q.float() - 8) * scale.repeat_interleave(group, 0).t() + zero.repeat_interleave(group, 0).t()
    try:
        sz = scales_zeros(scale, zero, group, dtype).to(device)
        got = mm(x.to(device, dtype), pack(q.to(device)), group, sz).float().cpu()
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        log.warning("int4 kernel unavailable on %s/%s (%s); quantized linears will dequantize", device, dtype, e)
        return False
    ref = x.to(dtype).float() @ w.to(dtype).float().t()
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    if err > 2e-2:
        log.warning("int4 kernel on %s/%s is off by %.3g (relative); quantized linears will dequantize",
                    device, dtype, err)
        return False
    return True
