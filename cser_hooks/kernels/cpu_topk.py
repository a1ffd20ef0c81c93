"""CPU (Numba) exact top-k by magnitude through a radix select (docs/algorithms.md §1, top_k).

The key of x_i is the bit pattern of |x_i| (31 bits for float32, 15 for float16 / bfloat16), which
orders like |x_i| (NaN above inf). Histogram passes over digits of the key, from the top, find the
key T of the k-th largest element and ``need``, how many elements with key == T are taken. A
compaction then writes, in ascending index order, every element with key > T and the first
``need`` with key == T (ties go to the lower index): element i lands at
``#{j < i: key_j > T} + min(#{j < i: key_j == T}, need)``.

Two passes over x in the common case: after the histogram of the top digit (the key's 11 highest
bits) has found the bin b holding the k-th largest, one split pass writes every element above b to
the output side (in index order) and the indices of the elements in b, the candidates, to a list.
The later digits are then resolved on the candidates only, and the two ascending lists are merged.
For a gradient the bin holds about 1 % of the elements. When it holds more than ``cand_cap``
(many equal magnitudes, or a narrow distribution), the later digits run over x instead, as above.
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


@njit(cache=True)
def _top_offsets(hist, b, offs):
    """offs[w] = (#elements of workers < w above bin b, #of them in bin b); returns the totals."""
    gt = 0
    eq = 0
    for w in range(hist.shape[0]):
        offs[w, 0] = gt
        offs[w, 1] = eq
        for d in range(b + 1, HIST):
            gt += hist[w, d]
        eq += hist[w, b]
    return gt, eq


@njit(parallel=True, cache=True)
def _split(x, kind, n, shift, b, offs, sel_vals, sel_idx, cand):
    """Elements whose top digit is above b -> (sel_vals, sel_idx); indices of those in bin b -> cand."""
    nw = offs.shape[0]
    per = (n + nw - 1) // nw
    for w in prange(nw):
        gt = offs[w, 0]
        eq = offs[w, 1]
        for i in range(w * per, min(n, (w + 1) * per)):
            d = abs_key(x, i, kind) >> shift
            if d > b:
                sel_vals[gt] = x[i]
                sel_idx[gt] = i
                gt += 1
            elif d == b:
                cand[eq] = i
                eq += 1


@njit(cache=True)
def _cand_hist(x, kind, cand, nc, prefix, mask, shift, width, hist):
    dmask = (1 << width) - 1
    for b in range(HIST):
        hist[0, b] = 0
    for j in range(nc):
        key = abs_key(x, cand[j], kind)
        if (key & mask) == prefix:
            hist[0, (key >> shift) & dmask] += 1


@njit(cache=True)
def _cand_merge(x, kind, cand, nc, thr, need, sel_vals, sel_idx, nsel, out_vals, out_idx):
    """out = merge by index of sel (nsel, ascending) and the candidates with key > thr plus the first
    ``need`` with key == thr (ascending, since cand is)."""
    o = 0
    s = 0
    eq = 0
    for j in range(nc):
        i = cand[j]
        key = abs_key(x, i, kind)
        if key > thr or (key == thr and eq < need):
            while s < nsel and sel_idx[s] < i:
                out_vals[o] = sel_vals[s]
                out_idx[o] = sel_idx[s]
                o += 1
                s += 1
            out_vals[o] = x[i]
            out_idx[o] = i
            o += 1
        if key == thr:
            eq += 1
    while s < nsel:
        out_vals[o] = sel_vals[s]
        out_idx[o] = sel_idx[s]
        o += 1
        s += 1


def topk_select(x, kind, key_bits, k, hist, cnt, out_vals, out_idx, scratch=None, cand_cap=0):
    """Fill out_vals / out_idx (k entries). hist: int64 [nw, HIST], cnt: int64 [nw, 2] scratch.

    ``scratch(name, size, dtype)`` hands out the split pass's buffers (``topk_sel_vals`` of out_vals'
    dtype, int32 ``topk_sel_idx`` and ``topk_cand``), taken when the top digit's bin holds at most
    ``cand_cap`` elements; otherwise (or without ``scratch``) every digit is a pass over x. Returns True
    when the split pass was used.
    """
    n = x.size
    passes = digit_passes(key_bits)
    (shift, width), rest = passes[0], passes[1:]
    _hist(x, kind, n, 0, 0, shift, width, hist)
    prefix, mask, krem = _pick(hist, width, shift, 0, 0, k)
    nsel, nc = _top_offsets(hist, prefix >> shift, cnt)
    if scratch is None or nc > cand_cap:
        for shift, width in rest:
            _hist(x, kind, n, prefix, mask, shift, width, hist)
            prefix, mask, krem = _pick(hist, width, shift, prefix, mask, krem)
        _count(x, kind, n, prefix, cnt)
        _compact(x, kind, n, prefix, krem, cnt, out_vals, out_idx)
        return False
    sel_vals, sel_idx = scratch("topk_sel_vals", nsel, out_vals.dtype), scratch("topk_sel_idx", nsel, "int32")
    cand = scratch("topk_cand", nc, "int32")
    _split(x, kind, n, shift, prefix >> shift, cnt, sel_vals, sel_idx, cand)
    for shift, width in rest:
        _cand_hist(x, kind, cand, nc, prefix, mask, shift, width, hist)
        prefix, mask, krem = _pick(hist[:1], width, shift, prefix, mask, krem)
    _cand_merge(x, kind, cand, nc, prefix, krem, sel_vals, sel_idx, nsel, out_vals, out_idx)
    return True
