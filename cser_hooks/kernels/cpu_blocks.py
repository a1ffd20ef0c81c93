"""CPU (Numba) gather / scatter of selected blocks (docs/algorithms.md §1, random_block / random_k).

``blocks`` holds sorted block indices, block size ``b``; the payload has ``k*b`` elements, block j
of the payload is ``x[blocks[j]*b : blocks[j]*b + b]`` with positions past ``numel`` read as 0 (a
short tail block is zero-padded) and ignored on scatter. Copies move raw bits (any dtype, through
same-size integer views); only the scatter-add does arithmetic, in the dtype kind of ``out``.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .cpu_segments import load_f32, store_f32


@njit(parallel=True, cache=True)
def gather(x, blocks, b, n, out, zero):
    for j in prange(blocks.size):
        src = np.int64(blocks[j]) * b
        dst = np.int64(j) * b
        m = max(min(b, n - src), 0) if src >= 0 else 0
        for t in range(m):
            out[dst + t] = x[src + t]
        if zero:
            for t in range(m):
                x[src + t] = 0
        for t in range(m, b):
            out[dst + t] = 0


@njit(parallel=True, cache=True)
def scatter(values, blocks, b, n, out):
    for j in prange(blocks.size):
        dst = np.int64(blocks[j]) * b
        src = np.int64(j) * b
        m = max(min(b, n - dst), 0) if dst >= 0 else 0
        for t in range(m):
            out[dst + t] = values[src + t]


@njit(parallel=True, cache=True)
def scatter_add(values, blocks, b, n, out, kind):
    """out[blocks[j]*b + t] += values[j*b + t]; values and out share the dtype kind."""
    for j in prange(blocks.size):
        dst = np.int64(blocks[j]) * b
        src = np.int64(j) * b
        m = max(min(b, n - dst), 0) if dst >= 0 else 0
        if kind == 0 or kind == 3:
            for t in range(m):
                out[dst + t] += values[src + t]
        else:
            for t in range(m):
                store_f32(out, dst + t, load_f32(out, dst + t, kind) + load_f32(values, src + t, kind), kind)


@njit(parallel=True, cache=True)
def scatter_add_indices(values, indices, out, kind, chunk):
    """out[indices[i]] += values[i] for distinct indices (as topk_select returns them)."""
    k = indices.size
    nchunks = (k + chunk - 1) // chunk
    for c in prange(nchunks):
        for i in range(c * chunk, min(k, (c + 1) * chunk)):
            d = np.int64(indices[i])
            if kind == 0 or kind == 3:
                out[d] += values[i]
            else:
                store_f32(out, d, load_f32(out, d, kind) + load_f32(values, i, kind), kind)
