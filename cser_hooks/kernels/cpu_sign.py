"""CPU (Numba) kernels of sign_blockwise (docs/algorithms.md §1) with fused error feedback (§2).

Wire format: bit i of the payload (byte i//8, bit i%8, LSB first) is 1 iff p_i >= 0 (so 0 and -0.0
give +1); one fp32 scale per segment, mean |p| over the segment. Decompress: scale * (+1 | -1).

Pass 1 (parallel over tiles) writes all sign bits, the scales of segments inside a tile and, while
the tile is still in cache, the residual ``p - C(p)`` of its *resolved* region; :func:`finalize`
completes the scales of segments crossing tiles; pass 2 writes the residual of the rest (only the
head and tail of tiles cut by such segments). ``res`` may be the input itself (in-place EF).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .cpu_bits import pack_words
from .cpu_segments import finalize, load_f32, seg_of, seg_start, store_f32, tile_regions, tile_sums, visit_range

#: where the residual p - C(p) goes: nowhere, a separate array, into e (p = g + e), into p itself
RES_NONE, RES_OUT, RES_INTO_E, RES_INTO_P = 0, 1, 2, 3


@njit(cache=True)
def _flags_loop(gs, gkind, fl):
    for i in range(gs.size):
        fl[i] = np.uint8(1) if load_f32(gs, i, gkind) >= np.float32(0.0) else np.uint8(0)


@njit(cache=True)
def _flags_loop_e(gs, gkind, es, fl):
    for i in range(gs.size):
        fl[i] = np.uint8(1) if load_f32(gs, i, gkind) + es[i] >= np.float32(0.0) else np.uint8(0)


@njit(cache=True)
def _bits_range(g, gkind, e, has_e, a0, a1, bits, flags):
    """Sign bits of [a0, a1) (a0 a multiple of 8, a1 a multiple of 8 or the tensor's end): one
    vectorised compare into the byte scratch ``flags`` (>= a1 - a0 bytes), then a word-wise pack."""
    fl = flags[:a1 - a0]
    if has_e:
        _flags_loop_e(g[a0:a1], gkind, e[a0:a1], fl)
    else:
        _flags_loop(g[a0:a1], gkind, fl)
    pack_words(fl, 1, bits[a0 >> 3:(a1 + 7) >> 3])


@njit(cache=True)
def _res_loop(gs, gkind, sc, rs):
    neg = -sc
    for i in range(gs.size):
        p = load_f32(gs, i, gkind)
        rs[i] = p - (sc if p >= np.float32(0.0) else neg)


@njit(cache=True)
def _res_loop_e(gs, gkind, es, sc, rs):
    neg = -sc
    for i in range(gs.size):
        p = load_f32(gs, i, gkind) + es[i]
        rs[i] = p - (sc if p >= np.float32(0.0) else neg)


@njit(cache=True)
def _res_loop_into_e(gs, gkind, es, sc):
    neg = -sc
    for i in range(gs.size):
        p = load_f32(gs, i, gkind) + es[i]
        es[i] = p - (sc if p >= np.float32(0.0) else neg)


@njit(cache=True)
def _res_loop_into_p(ps, sc):
    neg = -sc
    for i in range(ps.size):
        p = ps[i]
        ps[i] = p - (sc if p >= np.float32(0.0) else neg)


@njit(cache=True)
def _res_piece(g, gkind, e, has_e, a, b, sc, res, res_mode):
    """Residual p - C(p) of [a, b) with scale sc. The in-place modes get loops that read and write
    one array: with a separate output array that overlaps an input, LLVM's runtime alias check
    would send the loop down its scalar path."""
    if res_mode == RES_INTO_E:
        _res_loop_into_e(g[a:b], gkind, e[a:b], sc)
    elif res_mode == RES_INTO_P:
        _res_loop_into_p(res[a:b], sc)
    elif has_e:
        _res_loop_e(g[a:b], gkind, e[a:b], sc, res[a:b])
    else:
        _res_loop(g[a:b], gkind, sc, res[a:b])


@njit(cache=True)
def _res_range(g, gkind, e, has_e, offs, bsz, n, nseg, a0, a1, scales, res, res_mode):
    i = a0
    while i < a1:
        j = seg_of(offs, bsz, nseg, i)
        end = min(seg_start(offs, bsz, n, j + 1), a1)
        _res_piece(g, gkind, e, has_e, i, end, scales[j], res, res_mode)
        i = end


@njit(parallel=True, cache=True)
def sign_pass1(g, gkind, e, has_e, offs, bsz, n, nseg, tile, bits, scales, partial, scratch, res, res_mode):
    ntiles = (n + tile - 1) // tile
    for t in prange(ntiles):
        lo = t * tile
        hi = min(lo + tile, n)
        jf, jl = visit_range(offs, bsz, n, nseg, lo, hi)
        _bits_range(g, gkind, e, has_e, lo, hi, bits, scratch[numba.get_thread_id()])
        tile_sums(g, gkind, e, has_e, offs, bsz, n, jf, jl, lo, hi, t, 1, scales, partial)
        if res_mode != RES_NONE:
            a_end, b_start = tile_regions(offs, bsz, n, jf, jl, lo, hi)
            _res_range(g, gkind, e, has_e, offs, bsz, n, nseg, a_end, b_start, scales, res, res_mode)


@njit(parallel=True, cache=True)
def sign_pass2(g, gkind, e, has_e, offs, bsz, n, nseg, tile, scales, res, res_mode):
    ntiles = (n + tile - 1) // tile
    for t in prange(ntiles):
        lo = t * tile
        hi = min(lo + tile, n)
        jf, jl = visit_range(offs, bsz, n, nseg, lo, hi)
        a_end, b_start = tile_regions(offs, bsz, n, jf, jl, lo, hi)
        if a_end > lo:
            _res_range(g, gkind, e, has_e, offs, bsz, n, nseg, lo, a_end, scales, res, res_mode)
        if b_start < hi:
            _res_range(g, gkind, e, has_e, offs, bsz, n, nseg, b_start, hi, scales, res, res_mode)


def sign_compress(g, gkind, e, has_e, offs, n, nseg, bits, scales, partial, scratch, res, res_mode, tile):
    """Run the passes. Scratch: ``partial`` >= 2 * ntiles float32, ``scratch`` uint8
    [numba.config.NUMBA_NUM_THREADS, tile] (one row per pool thread). ``res_mode``: RES_NONE,
    RES_OUT (``res`` a separate array), RES_INTO_E (``res`` is ``e``), RES_INTO_P (``res`` is ``g``,
    float32, no ``e``)."""
    sign_pass1(g, gkind, e, has_e, offs, 0, n, nseg, tile, bits, scales, partial, scratch, res, res_mode)
    if n <= tile:
        return  # one tile: no segment crosses a tile boundary
    finalize(offs, 0, n, nseg, tile, 1, partial, scales)
    if res_mode != RES_NONE:
        sign_pass2(g, gkind, e, has_e, offs, 0, n, nseg, tile, scales, res, res_mode)


@njit(cache=True)
def _dec_piece(bits, a, b, sc, out, okind, acc):
    """out[a:b] = sc * (+1 | -1) by the sign bits (``acc``: out[a:b] += that, fp32 out); whole bytes go
    8 elements at a time."""
    neg = -sc
    q0 = (a + 7) >> 3
    q1 = b >> 3
    if acc:
        for k in range(a, b):
            out[k] = out[k] + (sc if ((bits[k >> 3] >> (k & 7)) & 1) != 0 else neg)
        return
    if q1 <= q0:  # no whole byte inside [a, b)
        for k in range(a, b):
            store_f32(out, k, sc if ((bits[k >> 3] >> (k & 7)) & 1) != 0 else neg, okind)
        return
    for k in range(a, q0 * 8):
        store_f32(out, k, sc if ((bits[k >> 3] >> (k & 7)) & 1) != 0 else neg, okind)
    bs = bits[q0:q1]
    os = out[q0 * 8:q1 * 8]
    if okind == 0:
        for q in range(bs.size):
            byte = bs[q]
            for r in range(8):
                os[8 * q + r] = sc if ((byte >> r) & 1) != 0 else neg
    else:
        for q in range(bs.size):
            byte = bs[q]
            for r in range(8):
                store_f32(os, 8 * q + r, sc if ((byte >> r) & 1) != 0 else neg, okind)
    for k in range(q1 * 8, b):
        store_f32(out, k, sc if ((bits[k >> 3] >> (k & 7)) & 1) != 0 else neg, okind)


@njit(parallel=True, cache=True)
def sign_decompress(bits, scales, offs, n, nseg, tile, out, okind, acc, alpha):
    """``acc``: out += alpha * C (fp32 out) instead of out = C; alpha * scale is rounded once per segment
    (the sign flip is exact)."""
    ntiles = (n + tile - 1) // tile
    for t in prange(ntiles):
        lo = t * tile
        hi = min(lo + tile, n)
        i = lo
        while i < hi:
            j = seg_of(offs, 0, nseg, i)
            end = min(seg_start(offs, 0, n, j + 1), hi)
            _dec_piece(bits, i, end, alpha * scales[j] if acc else scales[j], out, okind, acc)
            i = end
