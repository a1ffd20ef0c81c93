"""qsgd(s): unbiased stochastic quantization to s levels per block (docs/algorithms.md §1).

    C(v)_i = ||v_B||_2 * sign(v_i) * l_i / s,   l_i = floor(r_i) + Bernoulli(r_i - floor(r_i)),
    r_i = |v_i| (s / ||v_B||_2)     (that order of fp32 operations on every device)

so E[C(v)] = v. Blocks of ``block`` elements (default 512; the last may be short) each carry one
fp32 norm. The uniforms are counter-based: u_i = (h_i >> 8)·2^-24 with h_i = mix(mix(i_lo ⊕ s_lo) ⊕
s_hi ⊕ i_hi), the 32-bit integer hash of random_block's mask, where s is a seed of the
:class:`MaskKey` *and the rank* (independent across ranks, reproducible on resume). The kernel computes
u_i where it forms the level: no uniforms array, no generator state, and a CPU and a GPU run of the
same job round alike.

Wire: signs packed 1 bit/element, levels packed L bits/element with L the smallest of {1,2,4,8}
with 2^L >= s+1 (so s <= 255), one fp32 norm per block:
``ceil(n/8) + ceil(n*L/8) + 4*ceil(n/block)`` bytes.
``scale`` multiplies the output (Qsparse-local-SGD uses 1/(1+beta) to make Q a contraction).
"""
from __future__ import annotations

import math

import torch

from .. import kernels
from .base import Compressor, MaskKey, check_input, int_option, is_real
from .bits import pack_codes, packed_nbytes, unpack_codes
from .counter_hash import hash_counters


def level_bits(s: int) -> int:
    for L in (1, 2, 4, 8):
        if 2 ** L >= s + 1:
            return L
    raise ValueError(f"qsgd: s must be <= 255, got {s}")


def rounding_seed(mk: MaskKey) -> int:
    """The 63-bit seed of the rank's rounding: a function of (mk, rank), the same on every device."""
    return mk.generator_seed(per_rank=True)


def reference_uniforms(numel: int, seed: int) -> torch.Tensor:
    """The kernel's uniforms u_0..u_{numel-1} in plain torch (int64 arithmetic, exact; the spec above)."""
    h = hash_counters(torch.arange(numel, dtype=torch.int64), seed)
    return h.bitwise_right_shift_(8).float().mul_(2.0 ** -24)


def reference_compress(p, u, s, block):
    n = p.numel()
    nb = math.ceil(n / block)
    norms = torch.stack([p[j * block:(j + 1) * block].double().norm().float() for j in range(nb)])
    levels = torch.empty(n, dtype=torch.int32)
    for j in range(nb):
        seg = p[j * block:(j + 1) * block].float()
        r = seg.abs() * (s / norms[j]) if norms[j] > 0 else torch.zeros_like(seg)
        fl = r.floor()
        lv = fl + (u[j * block:j * block + seg.numel()] < (r - fl)).float()
        levels[j * block:j * block + seg.numel()] = lv.clamp(max=s).to(torch.int32)
    return pack_codes((p >= 0).to(torch.int32), 1), pack_codes(levels, level_bits(s)), norms


def reference_decompress(signs, levels, norms, s, block, numel):
    sg = unpack_codes(signs, 1, numel).float() * 2 - 1
    lv = unpack_codes(levels, level_bits(s), numel).float()
    nrm = torch.repeat_interleave(norms, block)[:numel]
    return nrm * sg * lv / s


class QSGD(Compressor):
    name = "qsgd"
    linear = False
    unbiased = True
    quantizer = True
    per_rank_randomness = True

    def __init__(self, s: int = 15, block: int = 512, scale: float = 1.0):
        s = int_option("qsgd", "s (levels)", s, 1, 255)
        block = int_option("qsgd", "block", block, 1)
        if not (is_real(scale) and 0 < scale < math.inf):  # 0 sends nothing, < 0 flips every update
            raise ValueError(f"qsgd: scale must be a finite number > 0 (1: unbiased), got {scale!r}")
        self.s, self.block, self.scale = s, block, float(scale)
        self.L = level_bits(self.s)
        self.unbiased = self.scale == 1.0

    def spec(self):
        return f"qsgd:s={self.s},block={self.block}" + (f",scale={self.scale!r}" if self.scale != 1.0 else "")

    def delta(self, numel):
        # Qsparse-local-SGD, Lemma: with beta = min(d/s^2, sqrt(d)/s), Q/(1+beta) is a (1/(1+beta))-contraction
        if self.scale == 1.0:
            return None
        d = min(self.block, numel)
        beta = min(d / self.s ** 2, math.sqrt(d) / self.s)
        # E||x - cQ(x)||^2 = (1 - 2c)||x||^2 + c^2 E||Q(x)||^2 <= (1 - c(2 - c(1 + beta)))||x||^2
        c = self.scale
        delta = c * (2.0 - c * (1.0 + beta))
        return delta if delta > 0 else None

    nonfinite_in_payload = True

    def nonfinite_witness(self, payload):
        # a block holding a NaN/Inf has a NaN/Inf norm (a float64 sum of squares); a false alarm needs a norm
        # beyond fp32's range, where the input's own fp32 sum (the check it replaces) overflows too
        return payload[2]

    def compress(self, x, mk, segments=None):
        return self._compress(x, mk, residual=False)

    def compress_ef(self, p, mk, segments=None):
        """One kernel pass: the payload and, in place, the residual p − C(p) (docs/algorithms.md §2). The
        fused residual is the unscaled C(p); with ``scale != 1`` (or a non-fp32 p) the base class's
        decompress-and-subtract runs instead."""
        if self.scale != 1.0 or p.dtype != torch.float32 or not p.is_contiguous():
            return super().compress_ef(p, mk, segments)
        return self._compress(p, mk, residual=True)

    def _compress(self, x, mk, residual: bool):
        """kernels.qsgd_compress (Numba CPU / CUDA): norms (summed in float64, rounded once to fp32), signs,
        levels, and optionally the residual written over ``x``, in one pass structure over the bucket."""
        check_input(x, self.name)
        n, b, s = x.numel(), self.block, self.s
        flat = x.view(-1) if x.is_contiguous() else x.reshape(-1)
        if flat.dtype == torch.float64:
            flat = flat.float()
        signs = torch.empty(packed_nbytes(n, 1), dtype=torch.uint8, device=x.device)
        levels = torch.empty(packed_nbytes(n, self.L), dtype=torch.uint8, device=x.device)
        norms = torch.empty(math.ceil(n / b), dtype=torch.float32, device=x.device)
        if n > 0:
            kernels.qsgd_compress(flat, rounding_seed(mk), s, b, signs, levels, norms,
                                  residual_out=flat if residual else None)
        return signs, levels, norms

    def decompress(self, payload, numel, dtype, mk, segments=None, out=None):
        signs, levels, norms = payload
        # FAST PATH (kernels.qsgd_decompress, Numba CPU / CUDA): ((norm * level) / s) * sign, then the scale
        if numel > 0 and (out is None or (out.dim() == 1 and out.is_contiguous() and out.numel() == numel)):
            if self.scale == 1.0:
                target = torch.empty(numel, dtype=dtype, device=signs.device) if out is None else out
                kernels.qsgd_decompress(signs, levels, norms, self.s, self.block, target)
                return target
            res = torch.empty(numel, dtype=torch.float32, device=signs.device)
            kernels.qsgd_decompress(signs, levels, norms, self.s, self.block, res)
            res.mul_(self.scale)
            return res.to(dtype) if out is None else out.copy_(res)
        sg = unpack_codes(signs, 1, numel).float().mul_(2).sub_(1)
        lv = unpack_codes(levels, self.L, numel).float()
        nrm = torch.repeat_interleave(norms, self.block, output_size=norms.numel() * self.block)[:numel]
        res = sg.mul_(lv).mul_(nrm).mul_(self.scale / self.s)
        if out is None:
            return res.to(dtype)
        return out.copy_(res)

    def decompress_add(self, payload, out, alpha, mk, segments=None):
        """out += alpha * C: one kernel pass over out, no decompressed temporary (QPRSGD's and EF's
        allgather averages sum n of these). ``scale != 1`` or a non-fp32 / strided out: the base
        class's decompress, then add."""
        if self.scale == 1.0 and out.dtype == torch.float32 and out.dim() == 1 and out.is_contiguous():
            if out.numel() > 0:
                kernels.qsgd_decompress(*payload, self.s, self.block, out, alpha=alpha)
            return out
        return super().decompress_add(payload, out, alpha, mk, segments)

    def wire_bytes(self, numel, dtype=torch.float32, segments=None):
        return packed_nbytes(numel, 1) + packed_nbytes(numel, self.L) + 4 * math.ceil(numel / self.block)
