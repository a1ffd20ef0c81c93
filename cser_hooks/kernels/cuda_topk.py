"""CUDA exact top-k by magnitude: radix select on the bits of |x|, then an ordered compaction.

Same selection rule as ``cpu_topk.py`` (docs/algorithms.md §1, top_k; ties to the lower index, indices
ascending). No host synchronisation: the select state lives on the device.

* ``topk_init``: state = (prefix 0, mask 0, remaining k), histogram zeroed.
* per digit (``cpu_topk.digit_passes``): ``topk_hist`` (shared-memory histogram of the digit among
  keys matching the prefix so far, merged with global atomics) and ``topk_pick`` (one block scans
  the bins from the top, extends the prefix, zeroes the histogram).
* ``topk_count``: per chunk of ``chunk`` elements, how many keys are > T and == T.
* ``topk_scan``: exclusive prefix sums of those counts (one block).
* ``topk_compact``: per chunk, rounds of blockDim runs of ``items`` consecutive elements; a
  block-wide exclusive scan of the runs' (> T, == T) counts gives each run its output positions.
"""
from __future__ import annotations

import numpy as np
from numba import int32, int64

from .cpu_topk import HIST, digit_passes
from .cuda_launch import TPB, cuda, devfn, grid_for
from .cuda_segments import abs_key

#: consecutive elements per thread in a compaction round
ITEMS = 16
#: elements per block of the counting / compaction kernels (4 rounds)
CHUNK = 4 * ITEMS * TPB


@cuda.jit
def topk_init(state, hist, k):
    i = cuda.grid(1)
    if i == 0:
        state[0] = 0
        state[1] = 0
        state[2] = k
    while i < hist.size:
        hist[i] = 0
        i += cuda.gridsize(1)


@cuda.jit
def topk_hist(x, kind, n, state, shift, width, hist):
    sh = cuda.shared.array(HIST, dtype=int32)
    tid = cuda.threadIdx.x
    nbins = 1 << width
    b = tid
    while b < nbins:
        sh[b] = 0
        b += cuda.blockDim.x
    cuda.syncthreads()
    prefix = state[0]
    mask = state[1]
    dmask = nbins - 1
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < n:
        key = abs_key(x, i, kind)
        if (key & mask) == prefix:
            cuda.atomic.add(sh, (key >> shift) & dmask, 1)
        i += stride
    cuda.syncthreads()
    b = tid
    while b < nbins:
        c = sh[b]
        if c != 0:
            cuda.atomic.add(hist, b, c)
        b += cuda.blockDim.x


@cuda.jit
def topk_pick(state, shift, width, hist):
    """One block: thread 0 walks the bins from the top; then all threads zero the histogram."""
    nbins = 1 << width
    if cuda.threadIdx.x == 0:
        krem = state[2]
        cum = int64(0)
        b = nbins - 1
        while b >= 0:
            c = int64(hist[b])
            if cum + c >= krem:
                state[0] = state[0] | (np.int64(b) << shift)
                state[1] = state[1] | (np.int64(nbins - 1) << shift)
                state[2] = krem - cum
                break
            cum += c
            b -= 1
    cuda.syncthreads()
    b = cuda.threadIdx.x
    while b < hist.size:
        hist[b] = 0
        b += cuda.blockDim.x


@devfn
def block_sum_i64(sh, v):
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


@cuda.jit
def topk_count(x, kind, n, state, chunk, cnt):
    sh = cuda.shared.array(TPB, dtype=int64)
    c = cuda.blockIdx.x
    thr = state[0]
    lo = np.int64(c) * chunk
    hi = min(lo + chunk, n)
    gt = int64(0)
    eq = int64(0)
    i = lo + cuda.threadIdx.x
    while i < hi:
        key = abs_key(x, i, kind)
        if key > thr:
            gt += 1
        elif key == thr:
            eq += 1
        i += cuda.blockDim.x
    gt = block_sum_i64(sh, gt)
    eq = block_sum_i64(sh, eq)
    if cuda.threadIdx.x == 0:
        cnt[2 * c] = gt
        cnt[2 * c + 1] = eq


@devfn
def block_exclusive_scan2(sa, sb, a, b):
    """Exclusive prefix sums over the block of two int64 values per thread (Hillis-Steele).

    Returns (excl_a, excl_b, total_a, total_b)."""
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    sa[tid] = a
    sb[tid] = b
    cuda.syncthreads()
    d = 1
    while d < nt:
        va = sa[tid - d] if tid >= d else int64(0)
        vb = sb[tid - d] if tid >= d else int64(0)
        cuda.syncthreads()
        sa[tid] += va
        sb[tid] += vb
        cuda.syncthreads()
        d *= 2
    ia = sa[tid]
    ib = sb[tid]
    ta = sa[nt - 1]
    tb = sb[nt - 1]
    cuda.syncthreads()
    return ia - a, ib - b, ta, tb


@cuda.jit
def topk_scan(cnt, nchunks, pre):
    """One block: pre[2c], pre[2c+1] = counts (> T, == T) of chunks before c."""
    sa = cuda.shared.array(TPB, dtype=int64)
    sb = cuda.shared.array(TPB, dtype=int64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    per = (nchunks + nt - 1) // nt
    c0 = min(tid * per, nchunks)
    c1 = min(c0 + per, nchunks)
    a = int64(0)
    b = int64(0)
    for c in range(c0, c1):
        a += cnt[2 * c]
        b += cnt[2 * c + 1]
    ea, eb, ta, tb = block_exclusive_scan2(sa, sb, a, b)
    for c in range(c0, c1):
        pre[2 * c] = ea
        pre[2 * c + 1] = eb
        ea += cnt[2 * c]
        eb += cnt[2 * c + 1]


@cuda.jit
def topk_compact(x, kind, n, state, chunk, items, pre, out_vals, out_idx):
    """Block c writes the selected elements of its chunk in index order. Rounds of
    blockDim * items elements: each thread counts its run of ``items`` consecutive elements, one
    block-wide scan of the counts gives the run's first output positions, the thread writes."""
    sa = cuda.shared.array(TPB, dtype=int64)
    sb = cuda.shared.array(TPB, dtype=int64)
    c = cuda.blockIdx.x
    thr = state[0]
    need = state[2]
    lo = np.int64(c) * chunk
    hi = min(lo + chunk, n)
    gt0 = pre[2 * c]
    eq0 = pre[2 * c + 1]
    base = lo
    while base < hi:
        r0 = min(base + cuda.threadIdx.x * items, hi)
        r1 = min(r0 + items, hi)
        fg = int64(0)
        fe = int64(0)
        for i in range(r0, r1):
            key = abs_key(x, i, kind)
            if key > thr:
                fg += 1
            elif key == thr:
                fe += 1
        eg, ee, tg, te = block_exclusive_scan2(sa, sb, fg, fe)
        gbefore = gt0 + eg
        ebefore = eq0 + ee
        for i in range(r0, r1):
            key = abs_key(x, i, kind)
            if key > thr:
                pos = gbefore + min(ebefore, need)
                out_vals[pos] = x[i]
                out_idx[pos] = i
                gbefore += 1
            elif key == thr:
                if ebefore < need:
                    pos = gbefore + ebefore
                    out_vals[pos] = x[i]
                    out_idx[pos] = i
                ebefore += 1
        gt0 += tg
        eq0 += te
        base += cuda.blockDim.x * items


def topk_select(x, kind, key_bits, n, k, out_vals, out_idx, alloc, stream=0, tpb=256, max_blocks=65535,
                chunk=CHUNK, items=ITEMS):
    """Launch the radix select and the ordered compaction; ``chunk`` is the number of elements per
    counting / compaction block (any size: a block walks its chunk in rounds of blockDim)."""
    state = alloc.empty(4, np.int64)
    hist = alloc.empty(HIST, np.int32)
    topk_init[grid_for(HIST, tpb, max_blocks), tpb, stream](state, hist, k)
    hgrid = min(grid_for(n, tpb * 16, cap=1024), max_blocks)
    for shift, width in digit_passes(key_bits):
        topk_hist[hgrid, tpb, stream](x, kind, n, state, shift, width, hist)
        topk_pick[1, tpb, stream](state, shift, width, hist)
    nchunks = (n + chunk - 1) // chunk
    cnt = alloc.empty(2 * nchunks, np.int64)
    pre = alloc.empty(2 * nchunks, np.int64)
    topk_count[nchunks, tpb, stream](x, kind, n, state, chunk, cnt)
    topk_scan[1, tpb, stream](cnt, nchunks, pre)
    topk_compact[nchunks, tpb, stream](x, kind, n, state, chunk, items, pre, out_vals, out_idx)
