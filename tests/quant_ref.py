"""Reference quantizers and format readers/writers for the quant tests, written straight from
the format descriptions (AutoAWQ gemm, AutoGPTQ v1) with plain loops, independent of qvl.quant.

Orientation as in the files: integer weights q [K, N] (in, out), zeros/scales [groups, N].
"""

import torch

AWQ_NIBBLE_TO_COLUMN = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of a word holds column 8c + this[i]


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the same 32 bits as int32."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unsigned(words: torch.Tensor) -> torch.Tensor:
    return words.to(torch.int64) & 0xFFFFFFFF


# -- AWQ gemm: packed along the output dim, 8 nibbles per word in interleaved order ----------

def awq_write(q: torch.Tensor) -> torch.Tensor:
    rows, cols = q.shape
    out = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for c in range(cols // 8):
        for i in range(8):
            out[:, c] |= q[:, 8 * c + AWQ_NIBBLE_TO_COLUMN[i]].to(torch.int64) << (4 * i)
    return _to_int32(out)


def awq_read(words: torch.Tensor) -> torch.Tensor:
    u = _unsigned(words)
    out = torch.zeros(words.shape[0], words.shape[1] * 8, dtype=torch.int64)
    for c in range(words.shape[1]):
        for i in range(8):
            out[:, 8 * c + AWQ_NIBBLE_TO_COLUMN[i]] = (u[:, c] >> (4 * i)) & 0xF
    return out


# -- GPTQ v1: qweight packed along the input dim, qzeros along the output dim, zeros - 1 -----

def gptq_write_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    out = torch.zeros(q.shape[0] // per, q.shape[1], dtype=torch.int64)
    for r in range(out.shape[0]):
        for i in range(per):
            out[r] |= q[r * per + i].to(torch.int64) << (bits * i)
    return _to_int32(out)


def gptq_read_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    per, u = 32 // bits, _unsigned(words)
    out = torch.zeros(words.shape[0] * per, words.shape[1], dtype=torch.int64)
    for r in range(words.shape[0]):
        for i in range(per):
            out[r * per + i] = (u[r] >> (bits * i)) & ((1 << bits) - 1)
    return out


def gptq_write_zeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    stored = zeros.to(torch.int64) - 1
    out = torch.zeros(zeros.shape[0], zeros.shape[1] // per, dtype=torch.int64)
    for c in range(out.shape[1]):
        for i in range(per):
            out[:, c] |= stored[:, c * per + i] << (bits * i)
    return _to_int32(out)


def gptq_read_zeros(words: torch.Tensor, bits: int) -> torch.Tensor:
    per, u = 32 // bits, _unsigned(words)
    out = torch.zeros(words.shape[0], words.shape[1] * per, dtype=torch.int64)
    for c in range(words.shape[1]):
        for i in range(per):
            out[:, c * per + i] = ((u[:, c] >> (bits * i)) & ((1 << bits) - 1)) + 1
    return out


# -- round-to-nearest quantizers (what AutoAWQ / GPTQ store, minus the calibration) -----------

def rtn_awq(w: torch.Tensor, group: int):
    """w [N, K] float -> q [K, N], zeros [K/G, N], scales fp16 [K/G, N]; W = (q - z) * s."""
    n, k = w.shape
    wg = w.t().double().reshape(k // group, group, n)
    wmax, wmin = wg.amax(1), wg.amin(1)
    scales = ((wmax - wmin).clamp(min=1e-5) / 15).half()
    s = scales.double()
    zeros = (-wmin / s).round().clamp(0, 15)
    q = ((wg / s[:, None]).round() + zeros[:, None]).clamp(0, 15)
    return q.reshape(k, n).long(), zeros.long(), scales


def rtn_gptq(w: torch.Tensor, group: int, bits: int, sym: bool, order: torch.Tensor | None = None):
    """w [N, K] -> q [K, N], zeros [groups, N], scales fp16 [groups, N], g_idx [K].

    ``order``: the act-order column permutation; group j is columns order[j*G:(j+1)*G].
    Asymmetric zeros are clamped to >= 1 because GPTQ v1 cannot store a zero point of 0.
    """
    n, k = w.shape
    group = k if group == -1 else group
    maxq = 2**bits - 1
    order = torch.arange(k) if order is None else order
    q = torch.zeros(k, n, dtype=torch.int64)
    g_idx = torch.zeros(k, dtype=torch.int32)
    zeros, scales = [], []
    for j in range(k // group):
        cols = order[j * group:(j + 1) * group]
        x = w[:, cols].double()  # [N, G]
        xmin, xmax = x.amin(1).clamp(max=0), x.amax(1).clamp(min=0)
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = -xmax
        scale = ((xmax - xmin) / maxq).clamp(min=1e-8).half()
        s = scale.double()
        zero = torch.full((n,), (maxq + 1) // 2, dtype=torch.float64) if sym else \
            (-xmin / s).round().clamp(1, maxq)
        q[cols] = ((x / s[:, None]).round() + zero[:, None]).clamp(0, maxq).long().t()
        g_idx[cols] = j
        zeros.append(zero.long())
        scales.append(scale)
    return q, torch.stack(zeros), torch.stack(scales), g_idx


def dequant(q, zeros, scales, g_idx) -> torch.Tensor:
    """[K, N] ints -> float32 [N, K] (nn.Linear orientation), W[k] = s[g[k]] * (q[k] - z[g[k]])."""
    g = g_idx.long()
    return ((q.double() - zeros[g].double()) * scales[g].double()).t().float().contiguous()
