"""Weight-only quantized linears: ``Int4Linear`` and ``Int8Linear``.

Each is built once from a :class:`QuantizedWeight` and keeps only its packed form, in the
layout of the fastest path for its device and activation dtype:

* ``qvl``: qvl's own CPU kernel (:mod:`qvl.quant.cpu`, AVX-512 or AVX2): a GEMV over the packed codes
  for up to ``GEMV_MAX_M`` rows of x, fp32 or bf16 activations, and for more rows (prefill) a
  dequantization to the activation dtype feeding torch's dense GEMM. The CPU default where it
  builds. Act-order checkpoints are permuted once, as for int4pack.
* ``qvl-a8``: qvl's CPU kernel with 8-bit activations (the way llama.cpp runs Q4_0 x Q8_0): each
  row of x rounded to int8 per block of 32 columns (one fp32 scale each), integer dot products with
  the codes (AVX512-VNNI / AVX-VNNI vpdpbusd, else vpmaddubsw), the weights read once for up to
  ``cpu.A8_MAX_M`` rows, so batched decode and short prefills run without dequantizing. Not exact:
  x is rounded (bench/results/a8.md has the KL and greedy agreement against ``qvl``); only by name.
* ``int4pack``: torch's int4 kernel (:mod:`qvl.quant.kernels`). Act-order checkpoints are
  permuted once so groups are contiguous; the forward gathers x's columns to match.
  8-bit weights run on the same kernel as two nibbles, q = 16*hi + lo, so that
  s*(q - z) = 16s*(hi - z_hi) + s*(lo - z_lo) with z = 16*z_hi + z_lo: hi and lo of each
  group sit side by side along K and x is fed twice, one kernel call, 8 bits per weight.
* ``dequant``: the fallback (no kernel for the device, dtype, shape or group size): packed
  integers + scales + zeros + group index, dequantized per call, then a dense matmul.

Either way forward(x) = x @ W.T + bias for the W of :meth:`QuantizedWeight.dequantize`, up to
the rounding of the activation dtype (the kernels hold scales and zeros in that dtype).

Past the CPU kernels' row limits (prefill) W is dequantized ``DEQUANT_BLOCK_BYTES`` of output
channels at a time, each block's product written into one output: a 2B gate or up projection
(8960 x 1536) is 27.5 MB in bf16 whole, the largest transient of a prefill chunk. torch's GEMM
sums K in an order that depends on N, so a column block's outputs can differ from the
whole-weight product by one rounding of the activation dtype (tests/test_quant_dense_blocks.py).
Buffers are not persistent: the runtime layout depends on the device, so checkpoints keep the
formats' own tensors and the loader repacks them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qvl.quant import cpu, kernels
from qvl.quant.weight import QuantizedWeight, dequantize as dequantize_weight

KERNELS = ("auto", "qvl", "qvl-a8", "int4pack", "dequant")
CPU_KERNELS = ("qvl", "qvl-a8")  # qvl's own: packed at load for its layout, fp32 bias added inside
# float weight a many-row forward of the CPU kernels dequantizes at once: a block of output channels
# (qvl.runtime.footprint.DEQUANT_BLOCK_BYTES plans it; tests/test_plan.py checks the two agree)
DEQUANT_BLOCK_BYTES = 4 << 20


def dense_block_rows(kernel: str, out_features: int, in_features: int, element_size: int) -> int:
    """Output channels a many-row forward dequantizes at once: at most ``DEQUANT_BLOCK_BYTES`` of
    float weight, a whole number of the layout's row blocks (``cpu.ROWS``, qvl-a8's ``cpu.A8_NT``),
    at least one, at most every channel; as many blocks as that takes, as even as the row blocks
    allow (each GEMM shape is a oneDNN primitive, JIT code the process keeps: one shape, not two)."""
    tile = cpu.A8_NT if kernel == "qvl-a8" else cpu.ROWS
    rows = DEQUANT_BLOCK_BYTES // (in_features * element_size)
    rows = min(out_features, max(tile, rows - rows % tile))
    even = -(-out_features // -(-out_features // rows))  # rows per block of that many blocks
    return min(out_features, -(-even // tile) * tile)


class QuantLinear(nn.Module):
    bits = 0

    def __init__(self, in_features: int, out_features: int, group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.kernel = "dequant"
        self.fallback_reason: str | None = None
        self.act_dtype: torch.dtype | None = None
        self.kgroup = 0
        self.register_buffer("perm", None, persistent=False)
        self.register_buffer("bias", None, persistent=False)

    @classmethod
    def from_weight(cls, w: QuantizedWeight, bias: torch.Tensor | None = None, dtype=torch.float32,
                    kernel: str = "auto") -> "QuantLinear":
        """Repack ``w`` (on the device it lives on) for activations of ``dtype``.

        ``kernel``: "auto" (the first of qvl, int4pack that runs here, else dequant), "qvl",
        "qvl-a8" or "int4pack" (error if it cannot run) or "dequant".
        """
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if w.bits != cls.bits:
            raise ValueError(f"{cls.__name__} takes {cls.bits}-bit weights, got {w.bits}-bit")
        m = cls(w.in_features, w.out_features, w.group_size)
        m.act_dtype = dtype
        tried = {"auto": ("qvl", "int4pack"), "dequant": ()}.get(kernel, (kernel,))
        reasons = []
        for name in tried:
            why = m._qvl_unsupported(w, dtype, name) if name in CPU_KERNELS else m._kernel_unsupported(w, dtype)
            if why is None:
                m.kernel = name
                break
            reasons.append(f"{name}: {why}")
        if m.kernel in CPU_KERNELS:
            m._pack_qvl(w)
        elif m.kernel == "int4pack":
            m._pack_kernel(w, dtype)
        elif kernel != "auto" and kernel != "dequant":
            raise ValueError(f"{kernel} kernel cannot run this layer: {reasons[0]}")
        else:
            m.fallback_reason = "asked for" if kernel == "dequant" else "; ".join(reasons)
            m._pack_dequant(w)
        if bias is not None:  # the qvl kernel adds an fp32 bias inside its GEMV
            m.register_buffer("bias", bias.to(torch.float32 if m.kernel in CPU_KERNELS else dtype), persistent=False)
        return m

    # -- qvl's CPU kernel ------------------------------------------------------------------

    def _qvl_unsupported(self, w: QuantizedWeight, dtype, name: str = "qvl") -> str | None:
        if w.q.device.type != "cpu":
            return f"a CPU kernel, the weights are on {w.q.device.type}"
        if dtype not in (torch.float32, torch.bfloat16):
            return f"takes float32 or bfloat16 activations, not {dtype}"
        _, ok = w.contiguous_groups()
        if not ok:
            return "g_idx does not split the columns into equal groups"
        why = cpu.a8_unsupported_reason if name == "qvl-a8" else cpu.unsupported_reason
        return why(self.bits, self.out_features, self.in_features, self.group_size, w.zeros, w.scales)

    def _pack_qvl(self, w: QuantizedWeight) -> None:
        perm, _ = w.contiguous_groups()
        q = w.q if perm is None else w.q[:, perm]
        if perm is not None:
            self.register_buffer("perm", perm, persistent=False)
        if self.kernel == "qvl-a8":
            zeros, scales = cpu.params_a8(w.zeros, w.scales)
            weight = cpu.pack_a8(q, self.bits)
        else:
            zeros, scales = cpu.params(w.zeros, w.scales)
            weight = cpu.pack(q, self.bits)
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("kscales", scales, persistent=False)
        self.register_buffer("kzeros", zeros, persistent=False)

    # -- kernel path -----------------------------------------------------------------------

    def _kernel_unsupported(self, w: QuantizedWeight, dtype) -> str | None:
        if self.in_features % self.group_size:
            return f"in_features {self.in_features} is not a multiple of group size {self.group_size}"
        perm, ok = w.contiguous_groups()
        if not ok:
            return "g_idx does not split the columns into equal groups"
        k = self.in_features * (2 if self.bits == 8 else 1)
        return kernels.unsupported_reason(w.q.device, dtype, self.out_features, k, self.group_size)

    def _pack_kernel(self, w: QuantizedWeight, dtype) -> None:
        perm, _ = w.contiguous_groups()
        q = w.q if perm is None else w.q[:, perm]
        if perm is not None:
            self.register_buffer("perm", perm, persistent=False)
        self.kgroup = kernels.kernel_group(self.group_size)
        weight, sz = self._kernel_layout(q, w.zeros.to(torch.float32), w.scales.to(torch.float32), dtype)
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("scales_zeros", sz, persistent=False)

    def _kernel_layout(self, q, zeros, scales, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    # -- fallback path ---------------------------------------------------------------------

    def _pack_dequant(self, w: QuantizedWeight) -> None:
        self.register_buffer("qweight", self._store_q(w.q), persistent=False)
        self.register_buffer("scales", w.scales, persistent=False)
        self.register_buffer("zeros", w.zeros.to(torch.int16), persistent=False)
        self.register_buffer("g_idx", w.group_index(), persistent=False)  # int64: indexes without a cast

    def _store_q(self, q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _load_q(self) -> torch.Tensor:
        raise NotImplementedError

    def quantized_weight(self) -> QuantizedWeight:
        """The weight, decoded (dequant and qvl paths; torch's int4pack layout is opaque)."""
        if self.kernel in CPU_KERNELS:
            if self.kernel == "qvl-a8":
                q = cpu.unpack_a8(self.weight, self.bits, self.out_features)
                zeros, scales = cpu.unparams_a8(self.kzeros, self.kscales, self.out_features)
            else:
                q = cpu.unpack(self.weight, self.bits, self.in_features)
                zeros, scales = cpu.unparams(self.kzeros, self.kscales)
            g_idx = None
            if self.perm is not None:  # back to the checkpoint's column order
                q_perm, q = q, torch.empty_like(q)
                q[:, self.perm] = q_perm
                g_idx = torch.empty(self.in_features, dtype=torch.int32)
                g_idx[self.perm] = (torch.arange(self.in_features) // self.group_size).to(torch.int32)
            return QuantizedWeight(q, zeros, scales, self.bits, self.group_size, g_idx)
        if self.kernel != "dequant":
            raise RuntimeError("the int4pack layout is opaque; the dequant and qvl paths keep a readable weight")
        return QuantizedWeight(self._load_q(), self.zeros, self.scales, self.bits, self.group_size, self.g_idx)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """W [N, K] of the dequant or qvl paths; per call, so it stays free of host syncs (CUDA graphs)."""
        if self.kernel in CPU_KERNELS:
            if self.kernel == "qvl-a8":
                w = cpu.a8_dequantize_t(self.weight, self.kscales, self.kzeros, self.bits, self.out_features,
                                        self.in_features, self.group_size, dtype).t().contiguous()
            else:
                w = cpu.dequantize(self.weight, self.kscales, self.kzeros, self.bits, self.in_features,
                                   self.group_size, dtype)
            if self.perm is None:
                return w
            out = torch.empty_like(w)
            out[:, self.perm] = w
            return out
        if self.kernel != "dequant":
            raise RuntimeError("the int4pack layout is opaque; only the dequant and qvl paths dequantize")
        return dequantize_weight(self._load_q(), self.zeros, self.scales, self.g_idx, dtype)

    # -- forward ---------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if self.kernel == "dequant":
            return F.linear(x2, self.dequantize(torch.float32).to(x.dtype), self.bias).reshape(*lead, self.out_features)
        # both kernel layouts: packed for one activation dtype, act-order columns permuted once
        if x.dtype != self.act_dtype:
            raise TypeError(f"{type(self).__name__} was packed for {self.act_dtype} activations, got {x.dtype}")
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        if self.kernel in CPU_KERNELS:
            x2 = x2.contiguous()
            if x2.shape[0] <= (cpu.A8_MAX_M if self.kernel == "qvl-a8" else cpu.GEMV_MAX_M):
                if self.kernel == "qvl-a8":
                    y = cpu.a8_gemm(x2, self.weight, self.kscales, self.kzeros, self.bits, self.group_size,
                                    self.out_features, self.bias)
                else:
                    y = cpu.qgemm(x2, self.weight, self.kscales, self.kzeros, self.bits, self.group_size, self.bias)
            else:  # many rows (prefill): compute-bound, torch's GEMM on the weight dequantized a block at a time
                y = torch.empty(x2.shape[0], self.out_features, dtype=x.dtype, device=x.device)
                self.dense_into(x2, y)
        else:
            y = kernels.mm(self._kernel_input(x2), self.weight, self.kgroup, self.scales_zeros)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def dense_into(self, x2: torch.Tensor, y: torch.Tensor) -> None:
        """y [M, N] = x2 [M, K] @ W.T + bias through torch's GEMM, W dequantized from the CPU
        kernels' layout a block of output channels at a time (:func:`dense_block_rows`); ``x2`` in
        the packed column order (act-order permuted), ``y`` may be a column slice of a wider output."""
        n = self.out_features
        rows = dense_block_rows(self.kernel, n, self.in_features, x2.element_size())
        for a in range(0, n, rows):
            b = min(a + rows, n)
            if self.kernel == "qvl-a8":  # W.T [K, b - a] of whole 64-row tiles (the last may be padded)
                tiles = slice(a // cpu.A8_NT, -(-b // cpu.A8_NT))
                w = cpu.a8_dequantize_t(self.weight[tiles], self.kscales[tiles], self.kzeros[tiles], self.bits,
                                        b - a, self.in_features, self.group_size, x2.dtype)
                torch.mm(x2, w, out=y[:, a:b])
                if self.bias is not None:
                    y[:, a:b] += self.bias[a:b].to(x2.dtype)
            else:
                blk = slice(a // cpu.ROWS, -(-b // cpu.ROWS))
                w = cpu.dequantize(self.weight[blk], self.kscales[blk], self.kzeros[blk], self.bits,
                                   self.in_features, self.group_size, x2.dtype)[: b - a]
                if self.bias is None:
                    torch.mm(x2, w.t(), out=y[:, a:b])
                else:
                    torch.addmm(self.bias[a:b].to(x2.dtype), x2, w.t(), out=y[:, a:b])
            del w  # before the next block's is made

    @staticmethod
    def fuse(parts: list["QuantLinear"]) -> "FusedQuantLinear | None":
        """One kernel call for ``parts`` (linears of the same input, e.g. q/k/v), or None where their
        layouts cannot be concatenated: both qvl CPU kernels, same bits, group, input width, activation
        dtype and bias presence, no act-order permutation, and for qvl-a8 every part's outputs a whole
        number of its 64-row tiles. The joint buffers replace the parts' own, which become views of
        them, so the weights are held once and every part still runs alone."""
        first = parts[0]
        if any(type(p) is not type(first) or p.kernel != first.kernel or p.in_features != first.in_features
               or p.group_size != first.group_size or p.act_dtype != first.act_dtype or p.perm is not None
               or (p.bias is None) != (first.bias is None) for p in parts):
            return None
        if first.kernel not in CPU_KERNELS:
            return None
        tile = cpu.A8_NT if first.kernel == "qvl-a8" else cpu.ROWS  # output rows per block of the layouts
        if any(p.out_features % tile for p in parts):
            return None
        names = ("weight", "kscales", "kzeros") + (("bias",) if first.bias is not None else ())
        joint = {name: torch.cat([getattr(p, name) for p in parts]) for name in names}
        start = 0
        for p in parts:  # [start, end) of the joint outputs, in blocks for the packed buffers
            end = start + p.out_features
            for name in names:
                rows = 1 if name == "bias" else tile
                setattr(p, name, joint[name][start // rows : end // rows])
            start = end
        return FusedQuantLinear(parts, joint)

    def nbytes(self) -> int:
        """Bytes of everything the forward reads (packed weight, scales, zeros, index, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, kernel={self.kernel}, bias={self.bias is not None}")


class FusedQuantLinear:
    """Linears of one input run as one kernel call over their concatenated outputs (built by
    :meth:`QuantLinear.fuse`): one activation pass and one thread fork instead of one per part.

    Each output column is computed alone by both CPU kernels, so the joint result equals the parts'
    results side by side, bit for bit. Past the kernels' row limits (prefill) each part runs its own
    blocks of dequantize + GEMM (:meth:`QuantLinear.dense_into`), as alone, into its columns of one
    output. Not a module: the parts stay the model's submodules and hold the
    (shared) buffers; a module that keeps one drops it when it is moved or cast (``_apply``).
    """

    def __init__(self, parts: list[QuantLinear], joint: dict[str, torch.Tensor]):
        self.parts = parts
        first = parts[0]
        self.kernel, self.bits, self.group_size = first.kernel, first.bits, first.group_size
        self.in_features = first.in_features
        self.out_features = sum(p.out_features for p in parts)
        self.weight, self.kscales, self.kzeros = joint["weight"], joint["kscales"], joint["kzeros"]
        self.bias = joint.get("bias")
        self.max_rows = cpu.A8_MAX_M if self.kernel == "qvl-a8" else cpu.GEMV_MAX_M

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if x.dtype != self.parts[0].act_dtype:
            raise TypeError(f"fused linears packed for {self.parts[0].act_dtype} activations, got {x.dtype}")
        x2 = x2.contiguous()
        if x2.shape[0] > self.max_rows:  # each part's blocks as it runs them alone, into one output
            y = torch.empty(x2.shape[0], self.out_features, dtype=x.dtype, device=x.device)
            start = 0
            for p in self.parts:
                p.dense_into(x2, y[:, start : start + p.out_features])
                start += p.out_features
            return y.reshape(*lead, self.out_features)
        if self.kernel == "qvl-a8":
            y = cpu.a8_gemm(x2, self.weight, self.kscales, self.kzeros, self.bits, self.group_size,
                            self.out_features, self.bias)
        else:
            y = cpu.qgemm(x2, self.weight, self.kscales, self.kzeros, self.bits, self.group_size, self.bias)
        return y.reshape(*lead, self.out_features)


class Int4Linear(QuantLinear):
    bits = 4

    def _kernel_layout(self, q, zeros, scales, dtype):
        # kernel: (q - 8) * s + zero  ==  s * (q - z)  when zero = (8 - z) * s
        sz = kernels.scales_zeros(scales, (8 - zeros) * scales, self.group_size, dtype)
        return kernels.pack(q), sz

    def _store_q(self, q):
        if q.shape[1] % 2:
            raise ValueError(f"in_features {q.shape[1]} must be even to hold two 4-bit values per byte")
        return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)  # [N, K/2], even k in the low nibble

    def _load_q(self):
        lo, hi = self.qweight & 0xF, self.qweight >> 4
        return torch.stack([lo, hi], dim=-1).reshape(self.out_features, self.in_features)


class Int8Linear(QuantLinear):
    bits = 8

    def _kernel_layout(self, q, zeros, scales, dtype):
        n, k, kg = self.out_features, self.in_features, self.kgroup
        z_hi = torch.div(zeros, 16, rounding_mode="floor")
        z_lo = zeros - 16 * z_hi
        s16 = 16 * scales  # exact: a power of two
        sz_hi = kernels.scales_zeros(s16, (8 - z_hi) * s16, self.group_size, dtype)  # [K/kg, N, 2]
        sz_lo = kernels.scales_zeros(scales, (8 - z_lo) * scales, self.group_size, dtype)
        sz = torch.stack([sz_hi, sz_lo], dim=1).reshape(2 * k // kg, n, 2)  # groups: hi0, lo0, hi1, ...
        q = q.to(torch.uint8).view(n, k // kg, kg)
        halves = torch.empty(n, k // kg, 2, kg, dtype=torch.uint8, device=q.device)  # [hi_g | lo_g] per group
        torch.bitwise_right_shift(q, 4, out=halves[:, :, 0])
        torch.bitwise_and(q, 0xF, out=halves[:, :, 1])
        return kernels.pack(halves.view(n, 2 * k)), sz.contiguous()

    def _kernel_input(self, x):
        m, kg = x.shape[0], self.kgroup
        g = self.in_features // kg
        return x.reshape(m, g, 1, kg).expand(m, g, 2, kg).reshape(m, 2 * self.in_features)  # [M, 2K]

    def _store_q(self, q):
        return q.to(torch.uint8).contiguous()

    def _load_q(self):
        return self.qweight


def quant_linear_class(bits: int) -> type[QuantLinear]:
    try:
        return {4: Int4Linear, 8: Int8Linear}[bits]
    except KeyError:
        raise ValueError(f"{bits}-bit linears are not supported (4 and 8 are)") from None
