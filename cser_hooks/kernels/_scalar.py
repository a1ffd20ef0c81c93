"""Scalar helpers shared by the CPU (Numba njit) and CUDA (Numba device function) kernels.

The helpers are written once as plain Python and compiled for each target by
:func:`make_scalar_ops`, which takes the target's decorator (``numba.njit`` or
``numba.cuda.jit(device=True)``). In the CUDA simulator they run as ordinary Python on NumPy
scalars, so every operation here is written to mean the same in NumPy and in Numba: explicit
``np.int64`` / ``np.float32`` casts, no integer overflow, no float64 intermediates except the
block statistics' accumulators (:func:`finish_stat`), which are float64 on every target.

Dtype *kinds* (how a tensor reaches a kernel; see ``_views.py``):

* ``K_F32`` float32 array, ``K_F64`` float64 array (native),
* ``K_F16`` float16 passed as its ``uint16`` bit pattern, ``K_BF16`` bfloat16 passed as ``int16``.

16-bit floats travel as integer bit views because Numba's CPU target has no float16, neither target
has bfloat16, and the simulator is plain NumPy; the conversions below are exact (to float32) and
round to nearest even (from float32), matching ``torch.Tensor.to``.

Segments (docs/algorithms.md §1, sign_blockwise and qsgd blocks): segment ``j`` is
``[offs[j], offs[j+1])`` when ``bsz == 0``, else ``[j*bsz, min((j+1)*bsz, n))``.
"""
from __future__ import annotations

import math

import numpy as np

K_F32 = 0
K_F16 = 1
K_BF16 = 2
K_F64 = 3


def make_scalar_ops(jit):
    """Compile the shared scalar helpers with ``jit``; returns a dict name -> compiled function."""

    @jit
    def f16_bits_to_f32(h):
        h = np.int64(h) & 0xFFFF
        sign = (h >> 15) & 1
        exp = (h >> 10) & 0x1F
        man = h & 0x3FF
        if exp == 0:
            # zero or subnormal: man * 2**-24 is exact in float32
            v = np.float32(man) * np.float32(5.9604644775390625e-08)
            if sign != 0:
                v = -v
            return v
        if exp == 0x1F:
            bits = 0x7F800000 | (man << 13)
        else:
            bits = ((exp + 112) << 23) | (man << 13)
        bits = bits | (sign << 31)
        return np.uint32(bits).view(np.float32)

    @jit
    def bf16_bits_to_f32(h):
        bits = (np.int64(h) & 0xFFFF) << 16
        return np.uint32(bits).view(np.float32)

    @jit
    def f32_to_f16_bits(v):
        """float32 -> IEEE half bits, round to nearest even; NaN -> sign|0x7E00 (as c10::Half)."""
        x = np.int64(np.float32(v).view(np.uint32))
        sign = (x >> 16) & 0x8000
        ax = x & 0x7FFFFFFF
        if ax > 0x7F800000:
            return sign | 0x7E00
        if ax >= 0x477FF000:  # >= 65520 rounds to infinity
            return sign | 0x7C00
        if ax >= 0x38800000:  # normal half: rebias the exponent, round the dropped 13 bits
            odd = (ax >> 13) & 1
            return sign | ((ax - 0x38000000 + 0xFFF + odd) >> 13)
        # subnormal half: adding 0.5 makes the FPU round |v| to a multiple of 2**-24
        f = np.uint32(ax).view(np.float32) + np.float32(0.5)
        return sign | (np.int64(np.float32(f).view(np.uint32)) - 0x3F000000)

    @jit
    def f32_to_bf16_bits(v):
        """float32 -> bfloat16 bits, round to nearest even; NaN -> 0x7FC0 (as c10::BFloat16)."""
        x = np.int64(np.float32(v).view(np.uint32))
        if (x & 0x7FFFFFFF) > 0x7F800000:
            return np.int64(0x7FC0)
        return (x + 0x7FFF + ((x >> 16) & 1)) >> 16

    @jit
    def load_f32(a, i, kind):
        """Element ``i`` of ``a`` as float32 (exact for every kind but K_F64)."""
        if kind == 1:
            return f16_bits_to_f32(a[i])
        if kind == 2:
            return bf16_bits_to_f32(a[i])
        return np.float32(a[i])

    @jit
    def store_f32(a, i, v, kind):
        """Store float32 ``v`` into ``a[i]``, rounding to nearest even for 16-bit kinds."""
        if kind == 1:
            a[i] = np.uint16(f32_to_f16_bits(v))
        elif kind == 2:
            b = f32_to_bf16_bits(v)
            a[i] = np.int16(b - ((b >> 15) << 16))
        elif kind == 3:
            a[i] = np.float64(v)
        else:
            a[i] = np.float32(v)

    @jit
    def abs_key(a, i, kind):
        """Bit pattern of |a[i]| as a non-negative integer that orders like |a[i]| (NaN largest)."""
        if kind == 0:
            return np.int64(np.float32(a[i]).view(np.uint32)) & 0x7FFFFFFF
        return np.int64(a[i]) & 0x7FFF

    @jit
    def seg_start(offs, bsz, n, j):
        if bsz > 0:
            return min(np.int64(j) * bsz, n)
        return np.int64(offs[j])

    @jit
    def seg_of(offs, bsz, nseg, x):
        """The non-empty segment holding position ``x`` (largest j with start_j <= x), x < n."""
        if bsz > 0:
            return np.int64(x // bsz)
        lo = np.int64(0)
        hi = np.int64(nseg - 1)
        while lo < hi:
            mid = (lo + hi + 1) >> 1
            if offs[mid] <= x:
                lo = mid
            else:
                hi = mid - 1
        return lo

    @jit
    def visit_range(offs, bsz, n, nseg, lo, hi):
        """Segments a tile [lo, hi) owns: the one holding lo, those starting in [lo, hi), and
        empty ones sitting at lo (or at n for the last tile). Returns (jf, jl) inclusive."""
        jf = seg_of(offs, bsz, nseg, lo)
        while jf > 0 and seg_start(offs, bsz, n, jf - 1) == lo:
            jf -= 1
        if hi >= n:
            jl = np.int64(nseg - 1)
        else:
            jl = seg_of(offs, bsz, nseg, hi - 1)
        return jf, jl

    @jit
    def tile_regions(offs, bsz, n, jf, jl, lo, hi):
        """Split tile [lo, hi) into head [lo, A), resolved [A, B), tail [B, hi).

        The resolved region holds only whole 8-element groups of segments that lie entirely in
        the tile, so its outputs can be written as soon as the tile's own sums are known; head and
        tail wait for the sums of segments that cross the tile boundary. A is a multiple of 8.
        """
        a_end = lo
        if seg_start(offs, bsz, n, jf) < lo:
            a_end = min(((seg_start(offs, bsz, n, jf + 1) + 7) >> 3) << 3, hi)
        b_start = hi
        if seg_start(offs, bsz, n, jl + 1) > hi:
            b_start = max((seg_start(offs, bsz, n, jl) >> 3) << 3, lo)
        if b_start < a_end:
            b_start = a_end
        return a_end, b_start

    @jit
    def finish_stat(acc, length, power):
        """Block statistic from its float64 accumulator, rounded to float32 once: mean |p| (power 1:
        the division in float64) or L2 norm (power 2: the square root in float64)."""
        if length == 0:
            return np.float32(0.0)
        if power == 1:
            return np.float32(np.float64(acc) / np.float64(length))
        return np.float32(math.sqrt(np.float64(acc)))

    @jit
    def qsgd_level(a, nrm, sf):
        """QSGD level of |p| = a given the block norm, s as float32 (the caller draws u: rounding_uniform).

        Returns r = a*(s/nrm) (0 if nrm == 0) and floor(r); the caller adds (u < r - floor(r)). The
        fp32 operations are the torch path's (``|v| * (s / norms)``), so every device rounds alike.
        """
        if nrm > 0:
            r = a * (sf / nrm)
        else:
            r = np.float32(0.0)
        fl = np.float32(math.floor(r))
        return r, fl

    @jit
    def mix32(x):
        """The 32-bit integer finalizer of random_block's mask (docs/algorithms.md §1) on an int64 in
        [0, 2^32): x ^= x>>16; x = x*0x45D9F3B mod 2^32; x ^= x>>16; x = x*0x45D9F3B mod 2^32;
        x ^= x>>16. The multiplier is below 2^27, so every product is exact in int64 (no overflow on
        any target, the simulator included)."""
        x = x ^ (x >> 16)
        x = (x * np.int64(0x45D9F3B)) & np.int64(0xFFFFFFFF)
        x = x ^ (x >> 16)
        x = (x * np.int64(0x45D9F3B)) & np.int64(0xFFFFFFFF)
        return x ^ (x >> 16)

    @jit
    def rounding_uniform(slo, shi, i):
        """QSGD's uniform of element ``i`` (docs/algorithms.md §1): h = mix(mix(i_lo ^ s_lo) ^ s_hi ^ i_hi),
        u = (h >> 8) * 2^-24 in [0, 1), exact in float32. ``slo`` / ``shi``: the low 32 / next 31 bits
        of the rank's 63-bit seed; i_lo / i_hi: the low 32 / higher bits of the index. A counter-based
        draw: no stream to keep, the same value on every device, computed where the level is."""
        i = np.int64(i)
        h = mix32(mix32((i & np.int64(0xFFFFFFFF)) ^ slo) ^ (shi ^ (i >> 32)))
        return np.float32(h >> 8) * np.float32(5.9604644775390625e-08)

    return {
        "mix32": mix32,
        "rounding_uniform": rounding_uniform,
        "f16_bits_to_f32": f16_bits_to_f32,
        "bf16_bits_to_f32": bf16_bits_to_f32,
        "f32_to_f16_bits": f32_to_f16_bits,
        "f32_to_bf16_bits": f32_to_bf16_bits,
        "load_f32": load_f32,
        "store_f32": store_f32,
        "abs_key": abs_key,
        "seg_start": seg_start,
        "seg_of": seg_of,
        "visit_range": visit_range,
        "tile_regions": tile_regions,
        "finish_stat": finish_stat,
        "qsgd_level": qsgd_level,
    }
