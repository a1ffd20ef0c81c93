"""CUDA kernels of sign_blockwise (docs/algorithms.md §1) with fused error feedback (§2).

Wire format as in ``cpu_sign.py``. Three launches on one stream:

1. ``sign_tile`` (block per tile): segment sums (``cuda_segments.tile_stats``), then one thread
   per 8-element group writes the sign byte and, in the tile's resolved region, the residual.
2. ``finalize_kernel``: scales of segments crossing tiles.
3. ``sign_edges`` (block per tile): residual of tile heads / tails cut by crossing segments.

``res`` may alias the input (in-place EF); every read of an element precedes its write by a barrier
or happens in the same thread.
"""
from __future__ import annotations

import numpy as np

from .cuda_launch import cuda, devfn, grid_for
from .cuda_segments import (
    TILE,
    finalize_kernel,
    load_p,
    seg_of,
    seg_start,
    store_f32,
    tile_regions,
    tile_stats,
    visit_range,
)


@devfn
def sign_byte(g, gkind, e, has_e, i0, i1):
    byte = 0
    for i in range(i0, i1):
        if load_p(g, gkind, e, has_e, i) >= 0:
            byte |= 1 << (i - i0)
    return np.uint8(byte)


@devfn
def sign_res_group(g, gkind, e, has_e, offs, n, nseg, i0, i1, scales, res):
    j = seg_of(offs, 0, nseg, i0)
    end = seg_start(offs, 0, n, j + 1)
    for i in range(i0, i1):
        while i >= end:
            j += 1
            end = seg_start(offs, 0, n, j + 1)
        p = load_p(g, gkind, e, has_e, i)
        sc = scales[j]
        res[i] = p - (sc if p >= 0 else -sc)


@cuda.jit
def sign_tile(g, gkind, e, has_e, offs, n, nseg, tile, bits, scales, partial, res, has_res):
    t = cuda.blockIdx.x
    lo = np.int64(t) * tile
    hi = min(lo + tile, n)
    jf, jl = visit_range(offs, 0, n, nseg, lo, hi)
    tile_stats(g, gkind, e, has_e, offs, 0, n, jf, jl, lo, hi, t, 1, scales, partial)
    a_end, b_start = tile_regions(offs, 0, n, jf, jl, lo, hi)
    q = (lo >> 3) + cuda.threadIdx.x
    while q * 8 < hi:
        i0 = q * 8
        i1 = min(i0 + 8, hi)
        bits[q] = sign_byte(g, gkind, e, has_e, i0, i1)
        if has_res and i0 >= a_end and i0 < b_start:
            sign_res_group(g, gkind, e, has_e, offs, n, nseg, i0, i1, scales, res)
        q += cuda.blockDim.x


@cuda.jit
def sign_edges(g, gkind, e, has_e, offs, n, nseg, tile, scales, res):
    t = cuda.blockIdx.x
    lo = np.int64(t) * tile
    hi = min(lo + tile, n)
    jf, jl = visit_range(offs, 0, n, nseg, lo, hi)
    a_end, b_start = tile_regions(offs, 0, n, jf, jl, lo, hi)
    q = (lo >> 3) + cuda.threadIdx.x
    while q * 8 < hi:
        i0 = q * 8
        if i0 < a_end or i0 >= b_start:
            sign_res_group(g, gkind, e, has_e, offs, n, nseg, i0, min(i0 + 8, hi), scales, res)
        q += cuda.blockDim.x


@cuda.jit
def sign_decompress_kernel(bits, scales, offs, n, nseg, out, okind, acc, alpha):
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < n:
        j = seg_of(offs, 0, nseg, i)
        sc = scales[j]
        if acc:
            sc = alpha * sc
        if ((bits[i >> 3] >> (i & 7)) & 1) == 0:
            sc = -sc
        if acc:
            out[i] = out[i] + sc
        else:
            store_f32(out, i, sc, okind)
        i += stride


def sign_compress(g, gkind, e, has_e, offs, n, nseg, bits, scales, res, has_res, alloc, stream=0,
                  tpb=256, max_blocks=65535, tile=TILE):
    """Launch the three kernels; arrays are device arrays (or NumPy in the simulator)."""
    ntiles = (n + tile - 1) // tile
    partial = alloc.empty(2 * ntiles, np.float64)
    sign_tile[ntiles, tpb, stream](g, gkind, e, has_e, offs, n, nseg, tile, bits, scales, partial, res, has_res)
    if ntiles > 1:
        finalize_kernel[grid_for(ntiles, tpb, max_blocks), tpb, stream](offs, 0, n, nseg, tile, 1, partial, scales)
        if has_res:
            sign_edges[ntiles, tpb, stream](g, gkind, e, has_e, offs, n, nseg, tile, scales, res)


def sign_decompress(bits, scales, offs, n, nseg, out, okind, acc=False, alpha=0.0, stream=0, tpb=256,
                    max_blocks=65535):
    """``acc``: out += alpha * C (float32 out) instead of out = C."""
    sign_decompress_kernel[grid_for(n, tpb, max_blocks), tpb, stream](bits, scales, offs, n, nseg, out, okind, acc,
                                                                      np.float32(alpha))
