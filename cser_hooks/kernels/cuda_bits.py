"""CUDA packing of flags and L-bit codes (wire formats of docs/algorithms.md §1; see ``cpu_bits.py``).

Packing: one thread per output byte (it reads the 8 // L codes of that byte). Unpacking: one
thread per element.
"""
from __future__ import annotations

import numpy as np

from .cuda_launch import cuda, grid_for


@cuda.jit
def pack_codes_kernel(codes, nbits, n, out):
    per = 8 // nbits
    mask = (1 << nbits) - 1
    nbytes = (n * nbits + 7) >> 3
    q = cuda.grid(1)
    while q < nbytes:
        byte = 0
        i0 = q * per
        for r in range(min(per, n - i0)):
            byte |= (np.int64(codes[i0 + r]) & mask) << (r * nbits)
        out[q] = np.uint8(byte)
        q += cuda.gridsize(1)


@cuda.jit
def unpack_codes_kernel(packed, nbits, n, out):
    mask = (1 << nbits) - 1
    i = cuda.grid(1)
    while i < n:
        out[i] = np.uint8((np.int64(packed[(i * nbits) >> 3]) >> ((i * nbits) & 7)) & mask)
        i += cuda.gridsize(1)


def pack_codes(codes, nbits, n, out, stream=0, tpb=256, max_blocks=65535):
    nbytes = (n * nbits + 7) >> 3
    pack_codes_kernel[grid_for(nbytes, tpb, max_blocks), tpb, stream](codes, nbits, n, out)


def unpack_codes(packed, nbits, n, out, stream=0, tpb=256, max_blocks=65535):
    unpack_codes_kernel[grid_for(n, tpb, max_blocks), tpb, stream](packed, nbits, n, out)
