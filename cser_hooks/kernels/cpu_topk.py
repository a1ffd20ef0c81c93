"""CPU (Numba) exact top-k by magnitude through a radix select (docs/algorithms.md §1, top_k).

The key of x_i is the bit pattern of |x_i| (31 bits for float32, 15 for float16 / bfloat16), which
orders like |x_i| (NaN above inf). Histogram passes over digits of the key, from the top, find the
key T of the k-th largest element and ``need``, how many elements with key == T are taken. A
compaction then writes, in ascending index order, every element with key > T and the first
``need`` with key == T (ties go to the lower index): element i lands at
``#{j < i: key_j > T} + min(#{j < i: key_j == T}, need)``.
"""
from __future__ import annotations

from numba import njit, prange

from .cpu_segments import abs_key

HIST = 2048  # bins of the widest digit (11 bits)


def digit_passes(key_bits: int):
    """(shift, width) of each histogram pass, top digit first, widths <= 11."""
    if key_bits == 31:
        return ((20, 11), (10, 10), (0, 10))
    return ((4, 11), (0, 4))


@njit(parallel=True, cache=True)
def _hist(x, kind, n, prefix, mask, shift, width, hist):
    nw = hist.shape[0]
    per = (n + nw - 1) // nw
    dmask = (1 << width) - 1
    for w in prange(nw):
        for b in range(HIST):
            hist[w, b] = 0
        for i in range(w * per, min(n, (w + 1) * per)):
            key = abs_key(x, i, kind)
            if (key & mask) == prefix:
                hist[w, (key >> shift) & dmask] += 1


@njit(cache=True)
def _pick(hist, width, shift, prefix, mask, krem):
    """Digit holding the krem-th largest remaining key; returns (prefix, mask, krem)."""
    nw = hist.shape[0]
    cum = 0
    for b in range((1 << width) - 1, -1, -1):
        c = 0
        for w in range(nw):
            c += hist[w, b]
        if cum + c >= krem:
            return prefix | (b << shift), mask | (((1 << width) - 1) << shift), krem - cum
        cum += c
    return prefix, mask, krem  # unreachable for 1 <= k <= n


@njit(parallel=True, cache=True)
def _count(x, kind, n, thr, cnt):
    nw = cnt.shape[0]
    per = (n + nw - 1) // nw
    for w in prange(nw):
        gt = 0
        eq = 0
        for i in range(w * per, min(n, (w + 1) * per)):
            key = abs_key(x, i, kind)
            if key > thr:
                gt += 1
            elif key == thr:
                eq += 1
        cnt[w, 0] = gt
        cnt[w, 1] = eq


@njit(parallel=True, cache=True)
def _compact(x, kind, n, thr, need, cnt, out_vals, out_idx):
    nw = cnt.shape[0]
    per = (n + nw - 1) // nw
    for w in prange(nw):
        gt = 0
        eq = 0
        for v in range(w):
            gt += cnt[v, 0]
            eq += cnt[v, 1]
        for i in range(w * per, min(n, (w + 1) * per)):
            key = abs_key(x, i, kind)
            if key > thr:
                pos = gt + min(eq, need)
                out_vals[pos] = x[i]
                out_idx[pos] = i
                gt += 1
            elif key == thr:
                if eq < need:
                    pos = gt + eq
                    out_vals[pos] = x[i]
                    out_idx[pos] = i
                eq += 1


def topk_select(x, kind, key_bits, k, hist, cnt, out_vals, out_idx):
    """Fill out_vals / out_idx (k entries). hist: int64 [nw, HIST], cnt: int64 [nw, 2] scratch."""
    n = x.size
    prefix, mask, krem = 0, 0, k
    for shift, width in digit_passes(key_bits):
        _hist(x, kind, n, prefix, mask, shift, width, hist)
        prefix, mask, krem = _pick(hist, width, shift, prefix, mask, krem)
    _count(x, kind, n, prefix, cnt)
    _compact(x, kind, n, prefix, krem, cnt, out_vals, out_idx)
