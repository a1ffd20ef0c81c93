"""The counter hash behind every random draw of the compressors (docs/algorithms.md §1).

``h(i) = mix(mix(i_lo ⊕ s_lo) ⊕ s_hi ⊕ i_hi)`` for a 63-bit seed s (s_lo / s_hi its low 32 / next
31 bits) and a counter i (i_lo / i_hi its low 32 / higher bits), with ``mix`` the 32-bit integer
finalizer x ⊕= x≫16; x = x·0x45D9F3B mod 2^32; x ⊕= x≫16; x = x·0x45D9F3B mod 2^32; x ⊕= x≫16.
random_block scores its blocks with it (i = the block index); QSGD's uniforms are
``(h(i) >> 8)·2^-24`` (i = the element index; the kernels compute the same hash inline). The
multiplier is below 2^27, so every product of a 32-bit value stays below 2^59: exact in int64 on
every device, which is why the draws are the same on CPU and GPU.
"""
from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
_MIX = 0x45D9F3B


def mix32_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """``mix`` in place on int64 values in [0, 2^32) (three xor-shifts, two multiplies; in place because
    fresh bucket-sized temporaries cost more than the arithmetic). ``tmp``: scratch of x's shape."""
    for last in (False, False, True):
        torch.bitwise_right_shift(x, 16, out=tmp)
        x.bitwise_xor_(tmp)
        if not last:
            x.mul_(_MIX).bitwise_and_(M32)
    return x


def hash_counters(i: torch.Tensor, seed: int) -> torch.Tensor:
    """h(i) of int64 counters ``i`` >= 0 (a new tensor on i's device; values in [0, 2^32))."""
    x, tmp = (i & M32) ^ (seed & M32), torch.empty_like(i)
    mix32_(x, tmp).bitwise_xor_(((seed >> 32) & 0x7FFFFFFF) ^ (i >> 32))
    return mix32_(x, tmp)
