"""CPU (Numba) kernels of qsgd(s) (docs/algorithms.md §1) with optional fused residual (§2).

Blocks of ``bsz`` elements (the last may be short), norm_j = ||p_B||_2 in fp32.
r = |p|*(s/norm) (0 if norm == 0); level = min(s, floor(r) + (u < r - floor(r))), u the element's
counter-based uniform (``rounding_uniform`` of the rank's seed and the element index, drawn in the
kernel, a tile's worth at a time). Levels are packed L bits each (L in {1,2,4,8}, element i at bit
i*L, LSB first), signs 1 bit (1 iff p >= 0). Decompress: norm * (+1 | -1) * level / s, computed as
((norm * level) / s) * sign.

Same pass structure as ``cpu_sign.py``: pass 1 (signs, in-tile norms, levels + residual of the
resolved region), :func:`finalize`, pass 2 (levels + residual of tile heads / tails).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .cpu_bits import pack_words
from .cpu_segments import finalize, load_f32, rounding_uniform, store_f32, tile_regions, tile_sums, visit_range
from .cpu_sign import RES_INTO_E, RES_INTO_P, RES_NONE, RES_OUT, _bits_range

_NO_OFFSETS = np.zeros(1, dtype=np.int64)


@njit(cache=True)
def _levels_loop(gs, gkind, es, has_e, us, nrm, sf, cs, rs, res_mode):
    """Per element: level into cs, residual into rs (RES_OUT), es (RES_INTO_E) or gs (RES_INTO_P)."""
    inv = sf / nrm if nrm > 0 else np.float32(0.0)  # once per block: s / norm in fp32
    for k in range(gs.size):
        p = load_f32(gs, k, gkind)
        if has_e:
            p = p + es[k]
        r = abs(p) * inv
        fl = np.float32(np.floor(r))
        lvl = fl + np.float32(1.0) if us[k] < r - fl else fl
        lvl = min(lvl, sf)
        cs[k] = np.uint8(lvl)
        if res_mode != RES_NONE:
            val = (nrm * lvl) / sf
            d = p - (val if p >= np.float32(0.0) else -val)
            if res_mode == RES_INTO_E:
                es[k] = d
            elif res_mode == RES_INTO_P:
                gs[k] = d
            else:
                rs[k] = d


@njit(cache=True)
def _levels_piece(g, gkind, e, has_e, us, a, b, nrm, sf, codes, off, res, res_mode):
    """Levels of [a, b) (one block, norm ``nrm``) into codes[k - off]; residual per ``res_mode``.

    Branch-free per element (selects), so the loop vectorises; the arithmetic is the definition's
    fp32 sequence (r = |p|*(s/norm), floor, compare with the uniform, clamp to s; (norm*level)/s). In-place
    residuals write the array they read (a separate, overlapping output array would defeat LLVM's
    runtime alias check and fall back to scalar code)."""
    gs = g[a:b]
    cs = codes[a - off:b - off]
    es = e[a:b] if has_e else e
    rs = res[a:b] if res_mode == RES_OUT else res
    if has_e:
        if res_mode == RES_NONE:
            _levels_loop(gs, gkind, es, True, us, nrm, sf, cs, rs, RES_NONE)
        elif res_mode == RES_INTO_E:
            _levels_loop(gs, gkind, es, True, us, nrm, sf, cs, rs, RES_INTO_E)
        else:
            _levels_loop(gs, gkind, es, True, us, nrm, sf, cs, rs, RES_OUT)
    else:
        if res_mode == RES_NONE:
            _levels_loop(gs, gkind, es, False, us, nrm, sf, cs, rs, RES_NONE)
        elif res_mode == RES_INTO_P:
            _levels_loop(gs, gkind, es, False, us, nrm, sf, cs, rs, RES_INTO_P)
        else:
            _levels_loop(gs, gkind, es, False, us, nrm, sf, cs, rs, RES_OUT)


@njit(cache=True)
def _fill_uniforms(ubuf, slo, shi, a0, a1):
    """ubuf[k] = the uniform of element a0 + k, for k < a1 - a0."""
    for k in range(a1 - a0):
        ubuf[k] = rounding_uniform(slo, shi, a0 + k)


@njit(cache=True)
def _levels_range(g, gkind, e, has_e, slo, shi, bsz, n, a0, a1, sf, nbits, norms, levels, scratch, ubuf, res,
                  res_mode):
    """Levels (and residual) of [a0, a1): a0 a multiple of 8, a1 a multiple of 8 or n.

    8-bit levels are written in place; narrower ones go through ``scratch`` (>= a1 - a0 bytes). The
    uniforms of the range are drawn first into ``ubuf`` (>= a1 - a0 floats): a loop of integer
    arithmetic alone vectorises, which the hash inside the level loop would not."""
    _fill_uniforms(ubuf, slo, shi, a0, a1)
    i = a0
    while i < a1:
        j = i // bsz
        end = min((j + 1) * bsz, n, a1)
        if nbits == 8:
            _levels_piece(g, gkind, e, has_e, ubuf[i - a0:end - a0], i, end, norms[j], sf, levels, 0, res, res_mode)
        else:
            _levels_piece(g, gkind, e, has_e, ubuf[i - a0:end - a0], i, end, norms[j], sf, scratch, a0, res, res_mode)
        i = end
    if nbits != 8 and a1 > a0:
        pack_words(scratch[:a1 - a0], nbits, levels[(a0 * nbits) >> 3:(a1 * nbits + 7) >> 3])


@njit(parallel=True, cache=True)
def qsgd_pass1(g, gkind, e, has_e, slo, shi, dummy, bsz, n, nseg, tile, sf, nbits, signs, levels, norms, partial,
               scratch, uniforms, res, res_mode):
    ntiles = (n + tile - 1) // tile
    for t in prange(ntiles):
        lo = t * tile
        hi = min(lo + tile, n)
        jf, jl = visit_range(dummy, bsz, n, nseg, lo, hi)
        tid = numba.get_thread_id()
        buf, ubuf = scratch[tid], uniforms[tid]
        _bits_range(g, gkind, e, has_e, lo, hi, signs, buf)
        tile_sums(g, gkind, e, has_e, dummy, bsz, n, jf, jl, lo, hi, t, 2, norms, partial)
        a_end, b_start = tile_regions(dummy, bsz, n, jf, jl, lo, hi)
        _levels_range(g, gkind, e, has_e, slo, shi, bsz, n, a_end, b_start, sf, nbits, norms, levels, buf, ubuf, res,
                      res_mode)


@njit(parallel=True, cache=True)
def qsgd_pass2(g, gkind, e, has_e, slo, shi, dummy, bsz, n, nseg, tile, sf, nbits, levels, norms, scratch,
               uniforms, res, res_mode):
    ntiles = (n + tile - 1) // tile
    for t in prange(ntiles):
        lo = t * tile
        hi = min(lo + tile, n)
        jf, jl = visit_range(dummy, bsz, n, nseg, lo, hi)
        a_end, b_start = tile_regions(dummy, bsz, n, jf, jl, lo, hi)
        tid = numba.get_thread_id()
        buf, ubuf = scratch[tid], uniforms[tid]
        if a_end > lo:
            _levels_range(g, gkind, e, has_e, slo, shi, bsz, n, lo, a_end, sf, nbits, norms, levels, buf, ubuf, res,
                          res_mode)
        if b_start < hi:
            _levels_range(g, gkind, e, has_e, slo, shi, bsz, n, b_start, hi, sf, nbits, norms, levels, buf, ubuf, res,
                          res_mode)


def qsgd_compress(g, gkind, e, has_e, slo, shi, bsz, n, s, nbits, signs, levels, norms, partial, scratch, uniforms, res,
                  res_mode, tile):
    """Run the passes. Scratch: ``partial`` >= 2 * ntiles float32, ``scratch`` uint8 and ``uniforms``
    float32, both [numba.config.NUMBA_NUM_THREADS, tile] (one row per pool thread). ``slo`` / ``shi``:
    the rounding seed's words (``_qsgd.seed_words``). ``res_mode`` as in
    ``cpu_sign.sign_compress``."""
    nseg = (n + bsz - 1) // bsz
    sf = np.float32(s)
    dummy = _NO_OFFSETS  # fixed-size blocks: the offsets argument is unused
    qsgd_pass1(g, gkind, e, has_e, slo, shi, dummy, bsz, n, nseg, tile, sf, nbits, signs, levels, norms, partial,
               scratch, uniforms, res, res_mode)
    if n <= tile:
        return  # one tile: no block crosses a tile boundary
    finalize(dummy, bsz, n, nseg, tile, 2, partial, norms)
    qsgd_pass2(g, gkind, e, has_e, slo, shi, dummy, bsz, n, nseg, tile, sf, nbits, levels, norms, scratch, uniforms,
               res, res_mode)


@njit(cache=True)
def _dec_piece(signs, levels, a, b, nrm, sf, nbits, s, table, out, okind, acc, alpha):
    """out[a:b] for one block: the value of each level is looked up in a table of
    (norm * level) / s built once per block (the same fp32 operations, one division per level).
    ``acc``: out += alpha * value instead (fp32 out), with alpha folded into the table: the sign
    flip is exact, so (alpha * t) * (+1 | -1) is alpha * (t * (+1 | -1)) rounded once."""
    for c in range(s + 1):
        table[c] = (nrm * np.float32(c)) / sf
        if acc:
            table[c] = alpha * table[c]
    mask = (1 << nbits) - 1
    os = out[a:b]
    for m in range(os.size):
        k = a + m
        val = table[(np.int64(levels[(k * nbits) >> 3]) >> ((k * nbits) & 7)) & mask]
        # times +1 / -1 (exact) rather than a branch on a random sign bit
        val = val * np.float32(np.int64((signs[k >> 3] >> (k & 7)) & 1) * 2 - 1)
        if acc:
            os[m] = os[m] + val
        elif okind == 0:
            os[m] = val
        else:
            store_f32(os, m, val, okind)


@njit(parallel=True, cache=True)
def qsgd_decompress(signs, levels, norms, sf, nbits, bsz, n, tile, tables, out, okind, acc, alpha):
    """``tables``: float32 [numba.config.NUMBA_NUM_THREADS, 256] scratch (one row per pool thread).
    ``acc``: out += alpha * C instead of out = C (float32 out)."""
    ntiles = (n + tile - 1) // tile
    s = np.int64(sf)
    for t in prange(ntiles):
        lo = t * tile
        hi = min(lo + tile, n)
        table = tables[numba.get_thread_id()]
        i = lo
        while i < hi:
            j = i // bsz
            end = min((j + 1) * bsz, hi)
            _dec_piece(signs, levels, i, end, norms[j], sf, nbits, s, table, out, okind, acc, alpha)
            i = end
