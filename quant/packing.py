"""Bit-exact pack / unpack of the two checkpoint formats Qwen's quantized releases use.

Integer weights are ``q [K, N]`` (in_features, out_features), the orientation both formats
store; zero points ``zeros [n_groups, N]`` are the true zero points, W = s * (q - z).

* AutoAWQ "gemm" (``awq/modules/linear/gemm.py`` ``WQLinear_GEMM.from_linear``, 4-bit):
  ``qweight`` int32 [K, N/8] and ``qzeros`` int32 [n_groups, N/8] are packed along the output
  dim; nibble i (bits 4i..4i+3) of word c holds column ``8c + AWQ_ORDER[i]``. Raw zeros.
* AutoGPTQ v1, ``checkpoint_format: gptq`` (``qlinear_cuda_old.py`` ``QuantLinear.pack``):
  ``qweight`` int32 [K*bits/32, N] is packed along the input dim, field i of word row r holding
  row ``r*32/bits + i``; ``qzeros`` int32 [n_groups, N*bits/32] is packed along the output dim
  and stores ``z - 1`` (readers add the 1 back).

Words are int32 in the files; the fields are read as unsigned, so the sign bit is just bit 31.
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column 8c + AWQ_ORDER[i]
GPTQ_BITS = (2, 4, 8)


def _per_word(bits: int) -> int:
    if bits not in GPTQ_BITS:
        raise ValueError(f"{bits}-bit fields are not supported (only {GPTQ_BITS}; 3-bit straddles words)")
    return 32 // bits


def _check_words(words: torch.Tensor) -> None:
    if words.dtype != torch.int32:
        raise TypeError(f"packed tensors are int32, got {words.dtype}")


def _fields(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [..., W] -> the 32/bits unsigned fields of each word, [..., W, 32/bits] (int32)."""
    _check_words(words)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    return (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # arithmetic shift, then masked


def _words(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., W, 32/bits] fields in [0, 2**bits) -> int32 [..., W] (bit 31 as the sign bit)."""
    f = fields.to(torch.int64)
    if f.numel() and (int(f.min()) < 0 or int(f.max()) >= 1 << bits):
        raise ValueError(f"values must be in [0, {1 << bits}) to pack into {bits} bits")
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=f.device)
    w = (f << shifts).sum(-1)  # disjoint bit ranges: the sum is an OR
    return torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32)


# ------------------------------------------------------------------------------------------
# AWQ gemm


def awq_pack_cols(q: torch.Tensor) -> torch.Tensor:
    """[R, N] values in [0, 16) -> int32 [R, N/8] in AWQ's interleaved nibble order."""
    r, n = q.shape
    if n % 8:
        raise ValueError(f"AWQ packs 8 columns per word; {n} columns is not a multiple of 8")
    blocks = q.reshape(r, n // 8, 8)[..., list(AWQ_ORDER)]  # [R, N/8, 8]: nibble i <- column ORDER[i]
    return _words(blocks, 4)


def awq_unpack_cols(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, N/8] -> uint8 [R, N]."""
    _check_words(packed)
    out = torch.empty(packed.shape[0], packed.shape[1], 8, dtype=torch.uint8, device=packed.device)
    for i, col in enumerate(AWQ_ORDER):  # one field at a time: no int32 [R, N] temporary
        out[:, :, col] = (packed >> (4 * i)) & 0xF
    return out.view(packed.shape[0], -1)


def pack_awq(q: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [K, N], zeros [n_groups, N] (4-bit) -> (qweight [K, N/8], qzeros [n_groups, N/8])."""
    return awq_pack_cols(q), awq_pack_cols(zeros)


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight [K, N/8], qzeros [n_groups, N/8]) -> q uint8 [K, N], zeros int16 [n_groups, N]."""
    return awq_unpack_cols(qweight), awq_unpack_cols(qzeros).to(torch.int16)


# ------------------------------------------------------------------------------------------
# GPTQ v1


def gptq_pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[K, N] values in [0, 2**bits) -> int32 [K*bits/32, N], packed along K."""
    per = _per_word(bits)
    k, n = q.shape
    if k % per:
        raise ValueError(f"GPTQ packs {per} rows per word at {bits} bits; K={k} is not a multiple")
    return _words(q.reshape(k // per, per, n).transpose(1, 2), bits)  # [K/per, N, per] -> [K/per, N]


def gptq_unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [K*bits/32, N] -> uint8 [K, N]."""
    per = _per_word(bits)
    _check_words(packed)
    out = torch.empty(packed.shape[0], per, packed.shape[1], dtype=torch.uint8, device=packed.device)
    for i in range(per):
        out[:, i] = (packed >> (bits * i)) & ((1 << bits) - 1)
    return out.view(-1, packed.shape[1])


def gptq_pack_cols(z: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, N] values in [0, 2**bits) -> int32 [R, N*bits/32], packed along N."""
    per = _per_word(bits)
    r, n = z.shape
    if n % per:
        raise ValueError(f"GPTQ packs {per} columns per word at {bits} bits; N={n} is not a multiple")
    return _words(z.reshape(r, n // per, per), bits)


def gptq_unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, N*bits/32] -> int16 [R, N]."""
    return _fields(packed, bits).reshape(packed.shape[0], -1).to(torch.int16)


def pack_gptq(q: torch.Tensor, zeros: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q [K, N], true zeros [n_groups, N] -> (qweight, qzeros) in the v1 layout.

    v1 stores z - 1. Zeros must lie in [1, 2**bits - 1]: z = 0 has no v1 encoding (AutoGPTQ
    wrote it as -1, which corrupts the neighbouring fields), and z = 2**bits, stored as all
    ones, is read back differently by AutoGPTQ (+1 per field) and GPTQModel (+0x11.. per word).
    """
    z = zeros.to(torch.int64)
    if z.numel() and (int(z.min()) < 1 or int(z.max()) > (1 << bits) - 1):
        raise ValueError(f"GPTQ v1 zero points must be in [1, {(1 << bits) - 1}] at {bits} bits, got "
                         f"[{int(z.min())}, {int(z.max())}]")
    return gptq_pack_rows(q, bits), gptq_pack_cols(z - 1, bits)


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """v1 (qweight, qzeros) -> q uint8 [K, N], true zeros int16 [n_groups, N] (stored + 1)."""
    return gptq_unpack_rows(qweight, bits), gptq_unpack_cols(qzeros, bits) + 1
