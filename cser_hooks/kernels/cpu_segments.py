"""CPU (Numba) per-segment statistics for sign_blockwise and qsgd (docs/algorithms.md §1).

The flat tensor is cut into tiles of ``TILE`` elements (a multiple of 8, so no two tiles share an
output byte) processed in parallel. A tile sums |p| (or p²) over each piece of a segment it holds.
Segments entirely inside the tile get their statistic at once; a segment crossing tile boundaries
leaves one partial per tile in a slot of ``partial`` (2 per tile: slot 2t for the piece that enters
tile t from the left, 2t+1 for the piece that leaves it to the right), and :func:`finalize` adds
them in tile order. Accumulation is float64 and the statistic is rounded to float32 once at the
end (:func:`finish_stat`): the vectorised loop reorders the additions by the host's vector width
(AVX2, AVX-512, ...), and with 53-bit sums of 24-bit values that order changes the rounded fp32
statistic only when the exact sum lies within ~n·2^-53 of an fp32 rounding boundary. So the scales
and norms are the same on every instruction set and equal to a float64 reference in practice.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ._scalar import make_scalar_ops

OPS = make_scalar_ops(njit)
load_f32 = OPS["load_f32"]
store_f32 = OPS["store_f32"]
abs_key = OPS["abs_key"]
seg_start = OPS["seg_start"]
seg_of = OPS["seg_of"]
visit_range = OPS["visit_range"]
tile_regions = OPS["tile_regions"]
finish_stat = OPS["finish_stat"]
qsgd_level = OPS["qsgd_level"]
rounding_uniform = OPS["rounding_uniform"]

#: elements per CPU tile (64 KiB of fp32: stays in L2 between the sum and the output loops)
TILE = 16384


@njit(fastmath={"reassoc"}, cache=True)
def _sum_abs(gs, gkind):
    acc = np.float64(0.0)
    for i in range(gs.size):
        acc += abs(np.float64(load_f32(gs, i, gkind)))
    return acc


@njit(fastmath={"reassoc"}, cache=True)
def _sum_abs_e(gs, gkind, es):
    acc = np.float64(0.0)
    for i in range(gs.size):
        acc += abs(np.float64(load_f32(gs, i, gkind) + es[i]))
    return acc


@njit(fastmath={"reassoc"}, cache=True)
def _sum_sq(gs, gkind):
    acc = np.float64(0.0)
    for i in range(gs.size):
        v = np.float64(load_f32(gs, i, gkind))
        acc += v * v
    return acc


@njit(fastmath={"reassoc"}, cache=True)
def _sum_sq_e(gs, gkind, es):
    acc = np.float64(0.0)
    for i in range(gs.size):
        v = np.float64(load_f32(gs, i, gkind) + es[i])
        acc += v * v
    return acc


@njit(cache=True)
def piece_sum(g, gkind, e, has_e, a, b, power):
    """float64 sum over [a, b) of |p| (power 1) or p*p (power 2), p = g (+ e) formed in fp32.

    Hot loops run over slices indexed from 0 (here and in the other cpu_* kernels), each variant in
    its own small function: Numba then drops its negative-index handling and LLVM vectorises them
    (the sums with ``reassoc``, i.e. in a vector-friendly but fixed order)."""
    if has_e:
        if power == 1:
            return _sum_abs_e(g[a:b], gkind, e[a:b])
        return _sum_sq_e(g[a:b], gkind, e[a:b])
    if power == 1:
        return _sum_abs(g[a:b], gkind)
    return _sum_sq(g[a:b], gkind)


@njit(cache=True)
def tile_sums(g, gkind, e, has_e, offs, bsz, n, jf, jl, lo, hi, t, power, stat, partial):
    """Statistics of the segments tile t = [lo, hi) holds entirely; partials of crossing ones."""
    for j in range(jf, jl + 1):
        s0 = seg_start(offs, bsz, n, j)
        s1 = seg_start(offs, bsz, n, j + 1)
        a = max(s0, lo)
        b = min(s1, hi)
        acc = np.float64(0.0)
        if b > a:
            acc = piece_sum(g, gkind, e, has_e, a, b, power)
        if s0 < lo:
            partial[2 * t] = acc
        elif s1 > hi:
            partial[2 * t + 1] = acc
        else:
            stat[j] = finish_stat(acc, s1 - s0, power)


@njit(cache=True)
def finalize(offs, bsz, n, nseg, tile, power, partial, stat):
    """Statistics of segments crossing tile boundaries, each by the tile it first enters.

    Serial: O(number of tiles) binary searches and additions, negligible next to the passes."""
    ntiles = (n + tile - 1) // tile
    for t in range(1, ntiles):
        lo = t * tile
        j = seg_of(offs, bsz, nseg, lo)
        s0 = seg_start(offs, bsz, n, j)
        if s0 < lo and s0 >= lo - tile:
            s1 = seg_start(offs, bsz, n, j + 1)
            t0 = s0 // tile
            t1 = (s1 - 1) // tile
            acc = partial[2 * t0 + 1]
            for tt in range(t0 + 1, t1 + 1):
                acc += partial[2 * tt]
            stat[j] = finish_stat(acc, s1 - s0, power)
