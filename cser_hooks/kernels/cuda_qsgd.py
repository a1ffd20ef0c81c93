"""CUDA kernels of qsgd(s) (docs/algorithms.md §1) with optional fused residual (§2).

Wire format and arithmetic as in ``cpu_qsgd.py``; launch structure as in ``cuda_sign.py``:
``qsgd_tile`` (norms, sign bytes, levels + residual of the resolved region), ``finalize_kernel``
(norms of blocks crossing tiles), ``qsgd_edges`` (levels + residual of tile heads / tails).
A thread owns an 8-element group: its sign byte and its ``L`` level bytes.
"""
from __future__ import annotations

import numpy as np
from numba import float32

from .cuda_launch import cuda, devfn, grid_for
from .cuda_segments import (
    TILE,
    finalize_kernel,
    load_p,
    qsgd_level,
    rounding_uniform,
    store_f32,
    tile_regions,
    tile_stats,
    visit_range,
)
from .cuda_sign import sign_byte


@devfn
def qsgd_group(g, gkind, e, has_e, slo, shi, bsz, i0, i1, sf, nbits, norms, levels, res, has_res):
    cur = 0
    for i in range(i0, i1):
        nrm = norms[i // bsz]
        p = load_p(g, gkind, e, has_e, i)
        r, fl = qsgd_level(abs(p), nrm, sf)
        lvl = fl + float32(1.0) if rounding_uniform(slo, shi, i) < r - fl else fl
        if lvl > sf:
            lvl = sf
        if has_res:
            val = (nrm * lvl) / sf
            res[i] = p - (val if p >= 0 else -val)
        sh = (i * nbits) & 7
        code = np.int64(lvl)
        if sh == 0:
            cur = code
        else:
            cur |= code << sh
        if sh + nbits == 8 or i == i1 - 1:
            levels[(i * nbits) >> 3] = np.uint8(cur)


@cuda.jit
def qsgd_tile(g, gkind, e, has_e, slo, shi, dummy, bsz, n, nseg, tile, sf, nbits, signs, levels, norms, partial,
              res, has_res):
    t = cuda.blockIdx.x
    lo = np.int64(t) * tile
    hi = min(lo + tile, n)
    jf, jl = visit_range(dummy, bsz, n, nseg, lo, hi)
    tile_stats(g, gkind, e, has_e, dummy, bsz, n, jf, jl, lo, hi, t, 2, norms, partial)
    a_end, b_start = tile_regions(dummy, bsz, n, jf, jl, lo, hi)
    q = (lo >> 3) + cuda.threadIdx.x
    while q * 8 < hi:
        i0 = q * 8
        i1 = min(i0 + 8, hi)
        signs[q] = sign_byte(g, gkind, e, has_e, i0, i1)
        if i0 >= a_end and i0 < b_start:
            qsgd_group(g, gkind, e, has_e, slo, shi, bsz, i0, i1, sf, nbits, norms, levels, res, has_res)
        q += cuda.blockDim.x


@cuda.jit
def qsgd_edges(g, gkind, e, has_e, slo, shi, dummy, bsz, n, nseg, tile, sf, nbits, levels, norms, res, has_res):
    t = cuda.blockIdx.x
    lo = np.int64(t) * tile
    hi = min(lo + tile, n)
    jf, jl = visit_range(dummy, bsz, n, nseg, lo, hi)
    a_end, b_start = tile_regions(dummy, bsz, n, jf, jl, lo, hi)
    q = (lo >> 3) + cuda.threadIdx.x
    while q * 8 < hi:
        i0 = q * 8
        if i0 < a_end or i0 >= b_start:
            qsgd_group(g, gkind, e, has_e, slo, shi, bsz, i0, min(i0 + 8, hi), sf, nbits, norms, levels, res, has_res)
        q += cuda.blockDim.x


@cuda.jit
def qsgd_decompress_kernel(signs, levels, norms, sf, nbits, bsz, n, out, okind, acc, alpha):
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    mask = (1 << nbits) - 1
    while i < n:
        code = (np.int64(levels[(i * nbits) >> 3]) >> ((i * nbits) & 7)) & mask
        val = (norms[i // bsz] * float32(code)) / sf
        if ((signs[i >> 3] >> (i & 7)) & 1) == 0:
            val = -val
        if acc:
            out[i] = out[i] + alpha * val
        else:
            store_f32(out, i, val, okind)
        i += stride


def qsgd_compress(g, gkind, e, has_e, slo, shi, bsz, n, s, nbits, signs, levels, norms, res, has_res, alloc,
                  stream=0, tpb=256, max_blocks=65535, tile=TILE, dummy=None):
    """Launch the three kernels. ``dummy``: any int64 device array (the unused offsets argument)."""
    ntiles = (n + tile - 1) // tile
    nseg = (n + bsz - 1) // bsz
    sf = np.float32(s)
    if dummy is None:
        dummy = alloc.empty(1, np.int64)
    partial = alloc.empty(2 * ntiles, np.float64)
    qsgd_tile[ntiles, tpb, stream](g, gkind, e, has_e, slo, shi, dummy, bsz, n, nseg, tile, sf, nbits, signs, levels,
                                   norms, partial, res, has_res)
    if ntiles > 1:
        finalize_kernel[grid_for(ntiles, tpb, max_blocks), tpb, stream](dummy, bsz, n, nseg, tile, 2, partial, norms)
        qsgd_edges[ntiles, tpb, stream](g, gkind, e, has_e, slo, shi, dummy, bsz, n, nseg, tile, sf, nbits, levels,
                                        norms, res, has_res)


def qsgd_decompress(signs, levels, norms, s, nbits, bsz, n, out, okind, acc=False, alpha=0.0, stream=0, tpb=256,
                    max_blocks=65535):
    """``acc``: out += alpha * C (float32 out) instead of out = C."""
    grid = grid_for(n, tpb, max_blocks)
    qsgd_decompress_kernel[grid, tpb, stream](signs, levels, norms, np.float32(s), nbits, bsz, n, out, okind, acc,
                                              np.float32(alpha))
