"""CUDA per-segment statistics for sign_blockwise and qsgd (docs/algorithms.md §1).

Same decomposition as ``cpu_segments.py``: one thread block per tile of ``tile`` elements. Inside
a tile, pieces of at most ``SMALL`` elements are summed by one thread each; longer pieces (at
most ``tile // SMALL`` of them) are queued in shared memory and summed by the whole block (strided
loads, then a fixed-order tree in shared memory). Segments inside the tile get their statistic
from the tile; crossing segments leave partials in 2 slots per tile that :func:`finalize_kernel`
adds in tile order. All orders are fixed, so results are deterministic for a given block size.
Only shared memory, ``syncthreads`` and shared atomics are used (no warp intrinsics), which keeps
the kernels runnable in Numba's CUDA simulator.
"""
from __future__ import annotations

from numba import float64, int32, int64

from ._scalar import make_scalar_ops
from .cuda_launch import TPB, cuda, devfn

OPS = make_scalar_ops(devfn)
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

#: a piece this short is summed by a single thread
SMALL = 32
#: elements per tile on a real GPU (16 per thread); tests in the simulator use smaller tiles
TILE = 16 * TPB
#: the largest tile the shared queue of long pieces is sized for
TILE_MAX = 4096
_MAX_BIG = TILE_MAX // SMALL + 2


@devfn
def load_p(g, gkind, e, has_e, i):
    p = load_f32(g, i, gkind)
    if has_e:
        p = p + e[i]
    return p


@devfn
def block_sum(sh, v):
    """Sum of one float64 per thread, fixed-order tree; every thread gets the total."""
    tid = cuda.threadIdx.x
    sh[tid] = v
    cuda.syncthreads()
    s = cuda.blockDim.x // 2
    while s > 0:
        if tid < s:
            sh[tid] += sh[tid + s]
        cuda.syncthreads()
        s //= 2
    total = sh[0]
    cuda.syncthreads()
    return total


@devfn
def piece_sum(g, gkind, e, has_e, a, b, power, step):
    """This thread's float64 sum of |p| (power 1) or p*p (power 2) over a, a+step, ... < b
    (p formed in fp32, as on the CPU; the statistic is rounded to fp32 once, in finish_stat)."""
    acc = float64(0.0)
    for i in range(a, b, step):
        v = float64(load_p(g, gkind, e, has_e, i))
        if power == 1:
            acc += abs(v)
        else:
            acc += v * v
    return acc


@devfn
def write_stat(j, s0, s1, lo, hi, t, acc, power, stat, partial):
    if s0 < lo:
        partial[2 * t] = acc
    elif s1 > hi:
        partial[2 * t + 1] = acc
    else:
        stat[j] = finish_stat(acc, s1 - s0, power)


@devfn
def tile_stats(g, gkind, e, has_e, offs, bsz, n, jf, jl, lo, hi, t, power, stat, partial):
    """All threads of the block: statistics / partials of the segments tile t holds.

    Ends with a barrier, so the block sees the statistics it wrote.
    """
    sh_red = cuda.shared.array(TPB, dtype=float64)
    sh_big = cuda.shared.array(_MAX_BIG, dtype=int64)
    sh_nbig = cuda.shared.array(1, dtype=int32)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    if tid == 0:
        sh_nbig[0] = 0
    cuda.syncthreads()
    j = jf + tid
    while j <= jl:
        s0 = seg_start(offs, bsz, n, j)
        s1 = seg_start(offs, bsz, n, j + 1)
        a = max(s0, lo)
        b = min(s1, hi)
        if b - a <= SMALL:
            acc = piece_sum(g, gkind, e, has_e, a, b, power, 1)
            write_stat(j, s0, s1, lo, hi, t, acc, power, stat, partial)
        else:
            slot = cuda.atomic.add(sh_nbig, 0, 1)
            sh_big[slot] = j
        j += nt
    cuda.syncthreads()
    nbig = sh_nbig[0]
    for q in range(nbig):
        j = sh_big[q]
        s0 = seg_start(offs, bsz, n, j)
        s1 = seg_start(offs, bsz, n, j + 1)
        a = max(s0, lo)
        b = min(s1, hi)
        acc = block_sum(sh_red, piece_sum(g, gkind, e, has_e, a + tid, b, power, nt))
        if tid == 0:
            write_stat(j, s0, s1, lo, hi, t, acc, power, stat, partial)
    cuda.syncthreads()


@cuda.jit
def finalize_kernel(offs, bsz, n, nseg, tile, power, partial, stat):
    """Statistics of segments crossing tiles (grid-stride over tiles t >= 1): tile t handles the
    segment entering it from the left if t is the first tile that segment enters."""
    ntiles = (n + tile - 1) // tile
    t = cuda.grid(1) + 1
    while t < ntiles:
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
        t += cuda.gridsize(1)
