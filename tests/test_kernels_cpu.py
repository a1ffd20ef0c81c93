"""CPU kernels of cser_hooks.kernels against plain-torch references (docs/algorithms.md §1-2).

The references (tests/reference/kernels.py) are written from the wire-format definitions only (they share
no code with cser_hooks/kernels/); tests/test_kernels_cudasim.py checks the CUDA kernels against the same
references on the same inputs (tests/kernel_cases.py). Payload bits, levels, indices, residuals and
decompressed values must match exactly. Scales and norms are fp32 sums whose
order is the kernel's (vectorised on CPU, tree-shaped on GPU), so on random floats they are held to
the order-independent bound (m + 2) * 2^-24 relative to float64 (m terms), and the exact checks of
everything downstream use the kernel's own statistics; on small-integer inputs every partial sum is
exact in fp32, so there the statistics must equal the reference bit for bit.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numba
import numpy as np
import pytest
import torch

import cser_hooks.kernels as K
from cser_hooks.kernels import cpu_qsgd, cpu_segments, cpu_sign, cpu_topk
from cser_hooks.kernels._workspace import WORKSPACE
from kernel_cases import assert_stats, block_counts, make_input, make_offsets, sign_counts
from reference.kernels import (
    random_blocks,
    ref_block_index,
    ref_gather,
    ref_nbits,
    ref_pack,
    ref_qsgd_dense,
    ref_qsgd_levels,
    ref_qsgd_norms,
    ref_sign_dense,
    ref_sign_stats,
    ref_topk,
)
from reference.masks import rounding_uniforms, rounding_uniforms_at

SIZES = (1, 7, 1023, 65539)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ------------------------------------------------------------------------------------------------
# sign_blockwise
@pytest.mark.parametrize("how", ["one", "fixed", "irregular", "ones"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_sign_compress_matches_reference(n, dtype, how):
    p = make_input(n, dtype, seed=n)
    offsets = make_offsets(n, how, seed=n)
    nseg = offsets.numel() - 1
    bits = torch.full(((n + 7) // 8,), 0xAA, dtype=torch.uint8)
    scales = torch.full((nseg,), float("nan"))
    res = torch.full((n,), float("nan"))
    K.sign_compress(p, offsets, bits, scales, res)
    assert np.array_equal(bits.numpy(), ref_pack(p.float() >= 0))
    assert_stats(scales, ref_sign_stats(p, offsets), sign_counts(offsets))
    assert torch.equal(res, p.float() - ref_sign_dense(p, scales, offsets))
    bits2 = torch.empty_like(bits)
    scales2 = torch.empty_like(scales)
    K.sign_compress(p, offsets, bits2, scales2)  # without residual: same payload
    assert torch.equal(bits2, bits) and torch.equal(scales2, scales)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_sign_compress_ef_fuses_residual(n, dtype):
    g = make_input(n, dtype, seed=2 * n)
    e = make_input(n, torch.float32, seed=3 * n, zeros=False) * 0.1
    offsets = make_offsets(n, "irregular", seed=n)
    p = g.float() + e
    bits = torch.empty((n + 7) // 8, dtype=torch.uint8)
    scales = torch.empty(offsets.numel() - 1)
    K.sign_compress_ef(g, e, offsets, bits, scales)
    assert np.array_equal(bits.numpy(), ref_pack(p >= 0))
    assert_stats(scales, ref_sign_stats(p, offsets), sign_counts(offsets))
    assert torch.equal(e, p - ref_sign_dense(p, scales, offsets))


@pytest.mark.parametrize("how", ["one", "irregular"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_statistics_exact_on_small_integers(n, dtype, how):
    """Sums of |p| and p^2 of small integers are exact in fp32 whatever the order, so the scales
    (sum / count) and norms (sqrt(sum)) must equal the fp32 reference exactly: this catches an
    element counted twice or missed, which the rounding bound on random floats would hide."""
    p = make_input(n, dtype, seed=n + 1, integers=True)
    offsets = make_offsets(n, how, seed=n)
    scales = torch.empty(offsets.numel() - 1)
    K.sign_compress(p, offsets, torch.empty((n + 7) // 8, dtype=torch.uint8), scales)
    assert torch.equal(scales, ref_sign_stats(p, offsets).float())
    block = 100
    norms = torch.empty((n + block - 1) // block)
    K.qsgd_compress(p, 7, 3, block, torch.empty((n + 7) // 8, dtype=torch.uint8),
                    torch.empty((2 * n + 7) // 8, dtype=torch.uint8), norms)
    assert torch.equal(norms, ref_qsgd_norms(p, block).float())


@pytest.mark.parametrize("n", SIZES)
def test_sign_compress_in_place_residual(n):
    p = make_input(n, torch.float32, seed=5)
    offsets = make_offsets(n, "fixed")
    orig = p.clone()
    bits = torch.empty((n + 7) // 8, dtype=torch.uint8)
    scales = torch.empty(offsets.numel() - 1)
    K.sign_compress(p, offsets, bits, scales, residual_out=p)
    assert np.array_equal(bits.numpy(), ref_pack(orig >= 0))
    assert torch.equal(p, orig - ref_sign_dense(orig, scales, offsets))


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_sign_decompress_matches_reference(n, out_dtype):
    p = make_input(n, torch.float32, seed=7)
    offsets = make_offsets(n, "irregular", seed=1)
    bits = torch.empty((n + 7) // 8, dtype=torch.uint8)
    scales = torch.empty(offsets.numel() - 1)
    K.sign_compress(p, offsets, bits, scales)
    out = torch.empty(n, dtype=out_dtype)
    K.sign_decompress(bits, scales, offsets, out)
    assert torch.equal(out, ref_sign_dense(p, scales, offsets).to(out_dtype))


@pytest.mark.parametrize("how", ["irregular", "fixed"])
@pytest.mark.parametrize("n", SIZES)
def test_sign_decompress_accumulates_in_place(n, how):
    """alpha given: out += (alpha * scale) * (+1 | -1) in the decompress pass; a non-fp32 out is refused."""
    p = make_input(n, torch.float32, seed=11)
    offsets = make_offsets(n, how, seed=n)
    bits = torch.empty((n + 7) // 8, dtype=torch.uint8)
    scales = torch.empty(offsets.numel() - 1)
    K.sign_compress(p, offsets, bits, scales)
    alpha = torch.tensor(1 / 3, dtype=torch.float32)
    base = make_input(n, torch.float32, seed=12)
    out = base.clone()
    K.sign_decompress(bits, scales, offsets, out, alpha=float(alpha))
    assert torch.equal(out, base + ref_sign_dense(p, scales * alpha, offsets))
    with pytest.raises(ValueError, match="needs a float32 out"):
        K.sign_decompress(bits, scales, offsets, base.half(), alpha=0.5)


@pytest.mark.parametrize("how", ["fixed", "irregular", "ones", "one"])
@pytest.mark.parametrize("n", (1023, 65539))
def test_sign_tiles_cut_by_segments(n, how):
    """Small tiles (64 elements) make most segments cross tiles: the partial-sum path."""
    p = make_input(n, torch.bfloat16, seed=11)
    e = make_input(n, torch.float32, seed=12, zeros=False)
    offsets = make_offsets(n, how, seed=3)
    nseg = offsets.numel() - 1
    tile = 64
    bits = np.zeros((n + 7) // 8, np.uint8)
    scales = np.zeros(nseg, np.float32)
    partial = np.zeros(2 * ((n + tile - 1) // tile), np.float32)
    e_np = e.numpy().copy()
    scratch = np.zeros((numba.config.NUMBA_NUM_THREADS, tile), np.uint8)
    cpu_sign.sign_compress(p.view(torch.int16).numpy(), 2, e_np, True, offsets.numpy(), n, nseg, bits, scales,
                           partial, scratch, e_np, cpu_sign.RES_INTO_E, tile)
    pf = p.float() + e
    sc = torch.from_numpy(scales)
    assert np.array_equal(bits, ref_pack(pf >= 0))
    assert_stats(sc, ref_sign_stats(pf, offsets), sign_counts(offsets))
    assert torch.equal(torch.from_numpy(e_np), pf - ref_sign_dense(pf, sc, offsets))


# ------------------------------------------------------------------------------------------------
# qsgd
# rounding seeds: small, with the top bit of each 32-bit word set, and the largest allowed
RSEEDS = (1, 0x7FFFFFFF_80000001, 0x1234_5678_9ABC_DEF0, (1 << 63) - 1)


@pytest.mark.parametrize("seed", RSEEDS)
def test_rounding_uniform_is_the_written_hash(seed):
    """The kernels' inline uniform equals the reference hash, including indices past 2^32 (whose
    high bits enter the second round) and at the word boundary."""
    ru = cpu_segments.rounding_uniform
    idx = np.array([0, 1, 2, 255, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**40 + 7, 2**62 + 3])
    got = torch.tensor([ru(np.int64(seed & 0xFFFFFFFF), np.int64(seed >> 32), int(i)) for i in idx])
    assert torch.equal(got, rounding_uniforms_at(idx, seed))
    assert not torch.equal(got[8:10], got[0:2]), "the index's high word must change the draw"


def test_rounding_uniforms_look_uniform_and_independent():
    """Over 2^20 elements: 64 equal bins each hold 1/64 within 5 sigma, neighbours and two ranks' seeds
    are uncorrelated, and the values are multiples of 2^-24 in [0, 1)."""
    n = 1 << 20
    u = rounding_uniforms(n, RSEEDS[2]).double()
    assert float(u.min()) >= 0 and float(u.max()) < 1 and torch.equal(u * 2**24, (u * 2**24).round())
    counts = torch.bincount((u * 64).long(), minlength=64).double()
    sd = (n / 64 * (1 - 1 / 64)) ** 0.5
    assert float((counts - n / 64).abs().max()) < 5 * sd
    other = rounding_uniforms(n, RSEEDS[2] ^ 1).double()  # a neighbouring seed (another rank's)
    for a, b in ((u[:-1], u[1:]), (u, other)):
        corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        assert abs(corr) < 5 / n ** 0.5, corr


@pytest.mark.parametrize("bad", (-1, 1 << 63, True, 1.5, "3"))
def test_qsgd_compress_rejects_a_bad_seed(bad):
    n = 16
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
        K.qsgd_compress(torch.ones(n), bad, 3, 8, torch.empty(2, dtype=torch.uint8),
                        torch.empty(4, dtype=torch.uint8), torch.empty(2))


def _qsgd_case(n, dtype, s, block, seed):
    p = make_input(n, dtype, seed=seed)
    rseed = RSEEDS[seed % len(RSEEDS)]
    u = rounding_uniforms(n, rseed)
    nbits = ref_nbits(s)
    signs = torch.full(((n + 7) // 8,), 0x55, dtype=torch.uint8)
    levels = torch.full(((n * nbits + 7) // 8,), 0x55, dtype=torch.uint8)
    norms = torch.full(((n + block - 1) // block,), float("nan"))
    return p, rseed, u, nbits, signs, levels, norms


@pytest.mark.parametrize("s,block", [(1, 7), (3, 64), (15, 1000), (255, 1 << 20), (4, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_qsgd_compress_matches_reference(n, dtype, s, block):
    p, rseed, u, nbits, signs, levels, norms = _qsgd_case(n, dtype, s, block, seed=n + s)
    res = torch.full((n,), float("nan"))
    K.qsgd_compress(p, rseed, s, block, signs, levels, norms, res)
    assert_stats(norms, ref_qsgd_norms(p, block), block_counts(n, block))
    lv = ref_qsgd_levels(p, u, s, block, norms)
    assert np.array_equal(signs.numpy(), ref_pack(p.float() >= 0))
    assert np.array_equal(levels.numpy(), ref_pack(lv, nbits))
    assert torch.equal(res, p.float() - ref_qsgd_dense(p.float(), lv, s, block, norms))
    out = torch.empty(n)
    K.qsgd_decompress(signs, levels, norms, s, block, out)
    assert torch.equal(out, ref_qsgd_dense(p.float(), lv, s, block, norms))


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_qsgd_decompress_dtypes_and_in_place(out_dtype):
    n, s, block = 65539, 7, 300
    p, rseed, u, nbits, signs, levels, norms = _qsgd_case(n, torch.float32, s, block, seed=1)
    orig = p.clone()
    K.qsgd_compress(p, rseed, s, block, signs, levels, norms, residual_out=p)
    lv = ref_qsgd_levels(orig, u, s, block, norms)
    dense = ref_qsgd_dense(orig, lv, s, block, norms)
    assert torch.equal(p, orig - dense)
    out = torch.empty(n, dtype=out_dtype)
    K.qsgd_decompress(signs, levels, norms, s, block, out)
    assert torch.equal(out, dense.to(out_dtype))


@pytest.mark.parametrize("alpha", (0.25, -1.0 / 3))
def test_qsgd_decompress_accumulates_in_place(alpha):
    """alpha given: out += alpha * C(p) in the decompress pass, equal to torch's add_ of the decompressed
    values (alpha * value rounded once, then the add); a non-fp32 out is refused."""
    n, s, block = 65539, 15, 64
    p, rseed, u, nbits, signs, levels, norms = _qsgd_case(n, torch.float32, s, block, seed=3)
    K.qsgd_compress(p, rseed, s, block, signs, levels, norms)
    dense = ref_qsgd_dense(p, ref_qsgd_levels(p, u, s, block, norms), s, block, norms)
    base = make_input(n, torch.float32, seed=9)
    out = base.clone()
    K.qsgd_decompress(signs, levels, norms, s, block, out, alpha=alpha)
    assert torch.equal(out, base + (dense * torch.tensor(alpha, dtype=torch.float32)))
    with pytest.raises(ValueError, match="needs a float32 out"):
        K.qsgd_decompress(signs, levels, norms, s, block, base.double(), alpha=alpha)


@pytest.mark.parametrize("s", (15, 255))
@pytest.mark.parametrize("block", (5, 64, 100, 5000))
def test_qsgd_tiles_cut_by_blocks(block, s):
    n, tile = 65539, 64
    p = make_input(n, torch.float16, seed=21)
    rseed = RSEEDS[2]
    u = rounding_uniforms(n, rseed)
    nbits = ref_nbits(s)
    signs = np.zeros((n + 7) // 8, np.uint8)
    levels = np.zeros((n * nbits + 7) // 8, np.uint8)
    norms = np.zeros((n + block - 1) // block, np.float32)
    partial = np.zeros(2 * ((n + tile - 1) // tile), np.float32)
    res = np.zeros(n, np.float32)
    scratch = np.zeros((numba.config.NUMBA_NUM_THREADS, tile), np.uint8)
    ubufs = np.zeros((numba.config.NUMBA_NUM_THREADS, tile), np.float32)
    slo, shi = np.int64(rseed & 0xFFFFFFFF), np.int64(rseed >> 32)
    cpu_qsgd.qsgd_compress(p.view(torch.uint16).numpy(), 1, res, False, slo, shi, block, n, s, nbits, signs,
                           levels, norms, partial, scratch, ubufs, res, cpu_sign.RES_OUT, tile)
    nr = torch.from_numpy(norms)
    assert_stats(nr, ref_qsgd_norms(p, block), block_counts(n, block))
    lv = ref_qsgd_levels(p, u, s, block, nr)
    assert np.array_equal(levels, ref_pack(lv, nbits))
    assert np.array_equal(signs, ref_pack(p.float() >= 0))
    assert torch.equal(torch.from_numpy(res), p.float() - ref_qsgd_dense(p.float(), lv, s, block, nr))


def test_qsgd_is_unbiased_statistically():
    """E[C(p)] = p: the mean of many decompressed draws approaches p (QSGD's defining property)."""
    n, s, block, draws = 257, 3, 64, 2000
    p = make_input(n, torch.float32, seed=4, zeros=False)
    nbits = ref_nbits(s)
    acc = torch.zeros(n, dtype=torch.float64)
    signs = torch.empty((n + 7) // 8, dtype=torch.uint8)
    levels = torch.empty((n * nbits + 7) // 8, dtype=torch.uint8)
    norms = torch.empty((n + block - 1) // block)
    out = torch.empty(n)
    for draw in range(draws):  # the seeds 0, 1, ...: consecutive seeds must round independently
        K.qsgd_compress(p, draw, s, block, signs, levels, norms)
        K.qsgd_decompress(signs, levels, norms, s, block, out)
        acc += out.double()
    nrm = norms[torch.arange(n) // block].double()
    sd = nrm / s / 2 / draws**0.5  # per-element std of the mean is at most norm/(2s)/sqrt(draws)
    assert ((acc / draws - p.double()).abs() <= 5 * sd + 1e-6).all()


# ------------------------------------------------------------------------------------------------
# random_block gather / scatter
@pytest.mark.parametrize("b", (1, 3, 256))
@pytest.mark.parametrize("dtype", OUT_DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_block_gather_scatter_match_reference(n, dtype, b):
    x = make_input(n, dtype, seed=n + b)
    nblocks = (n + b - 1) // b
    blocks = random_blocks(n, b, 0.3, seed=b)
    if nblocks - 1 not in blocks.tolist():  # always include the (possibly short) tail block
        blocks = torch.cat([blocks[1:], torch.tensor([nblocks - 1])]) if blocks.numel() > 1 else \
            torch.tensor([nblocks - 1])
    want = ref_gather(x, blocks, b)
    out = torch.full((blocks.numel() * b,), 7.0, dtype=dtype)
    K.block_gather(x, blocks, b, out)
    assert torch.equal(out, want)

    pos, src = ref_block_index(blocks, b, n)
    y = x.clone()
    out2 = torch.empty_like(out)
    K.block_gather_zero(y, blocks, b, out2)
    assert torch.equal(out2, want)
    expect_zeroed = x.clone()
    expect_zeroed[pos] = 0
    assert torch.equal(y, expect_zeroed)

    vals = make_input(blocks.numel() * b, dtype, seed=99, zeros=False)
    base = make_input(n, dtype, seed=98, zeros=False)
    got = base.clone()
    K.block_scatter(vals, blocks, b, got)
    expect = base.clone()
    expect[pos] = vals[src]
    assert torch.equal(got, expect)

    got = base.clone()
    K.block_scatter_add(vals, blocks, b, got)
    expect = base.clone()
    expect[pos] = (base[pos].float() + vals[src].float()).to(dtype) if dtype != torch.float64 else \
        base[pos] + vals[src]
    assert torch.equal(got, expect)


# ------------------------------------------------------------------------------------------------
# top_k
def _tied_input(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-20, 21, (n,), generator=g).float() / 4  # many exact ties, +0 and -0
    x[torch.rand(n, generator=g) < 0.1] *= -0.0
    return x.to(dtype)


@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
@pytest.mark.parametrize("n", SIZES)
def test_topk_select_matches_reference(n, dtype, ties):
    x = _tied_input(n, dtype, n) if ties else make_input(n, dtype, seed=n)
    for k in sorted({1, max(1, n // 64), n // 3, n}):
        if k == 0:
            continue
        values, indices = K.topk_select(x, k)
        rv, ri = ref_topk(x, k)
        assert indices.dtype == torch.int32 and values.dtype == dtype
        assert torch.equal(indices, ri), (k, indices[:10], ri[:10])
        assert torch.equal(values, rv)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("source", ["randn", "ties", "narrow"])
def test_topk_split_route_and_full_passes_agree_with_the_reference(source, dtype):
    # the select resolves the later digits either on the top digit's bin (split) or over all of x;
    # both routes, forced here by the candidate cap, must give the reference's selection
    n = 200_003
    if source == "randn":
        x = make_input(n, dtype, seed=5)
    elif source == "ties":
        x = _tied_input(n, dtype, 5)
    else:  # |x| in [1, 1.112): in fp32 all in one top-digit bin (the key's 11 high bits)
        g = torch.Generator().manual_seed(6)
        x = ((1 + torch.rand(n, generator=g) / 9) * torch.randn(n, generator=g).sign()).to(dtype)
    xv = x.view(torch.int16).numpy() if dtype != torch.float32 else x.numpy()
    kind = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]
    nw = 4
    for k in (1, n // 64, n // 2, n):
        rv, ri = ref_topk(x, k)
        routes = set()
        for cap in (0, n):
            vals, idx = np.empty(k, xv.dtype), np.empty(k, np.int32)
            hist, cnt = np.empty((nw, cpu_topk.HIST), np.int64), np.empty((nw, 2), np.int64)
            routes.add(cpu_topk.topk_select(xv, kind, 31 if kind == 0 else 15, k, hist, cnt, vals, idx,
                                            WORKSPACE.get, cap))
            assert np.array_equal(idx, ri.numpy()), (source, k, cap)
            assert torch.equal(torch.from_numpy(vals).view(dtype) if kind else torch.from_numpy(vals), rv)
        assert routes == {False, True}, (source, k, routes)  # cap 0: full passes; cap n: the split pass


def test_topk_a_gradient_takes_the_split_route():
    # what the dispatch hands the CPU select: a gradient-like input's top bin is far below numel / CAND_SHARE
    from cser_hooks.kernels import _topk

    x = make_input(1 << 20, torch.float32, seed=7).numpy()
    k = x.size // 64
    hist, cnt = np.empty((4, cpu_topk.HIST), np.int64), np.empty((4, 2), np.int64)
    vals, idx = np.empty(k, np.float32), np.empty(k, np.int32)
    assert cpu_topk.topk_select(x, 0, 31, k, hist, cnt, vals, idx, WORKSPACE.get, x.size // _topk.CAND_SHARE)
    rv, ri = ref_topk(torch.from_numpy(x), k)
    assert np.array_equal(idx, ri.numpy()) and np.array_equal(vals, rv.numpy())


def test_topk_nan_counts_as_largest_and_k_zero():
    x = torch.tensor([1.0, float("nan"), -3.0, float("inf"), 2.0])
    values, indices = K.topk_select(x, 2)
    assert indices.tolist() == [1, 3]
    values, indices = K.topk_select(x, 0)
    assert values.numel() == 0 and indices.numel() == 0


@pytest.mark.parametrize("dtype", OUT_DTYPES)
def test_scatter_add_indices(dtype):
    n = 65539
    x = make_input(n, dtype, seed=3)
    values, indices = K.topk_select(x, 1000)
    out = make_input(n, dtype, seed=4, zeros=False)
    want = out.clone()
    want[indices.long()] = (want[indices.long()].double() + values.double()).to(dtype) \
        if dtype == torch.float64 else (want[indices.long()].float() + values.float()).to(dtype)
    K.scatter_add_indices(values, indices, out)
    assert torch.equal(out, want)


# ------------------------------------------------------------------------------------------------
# bit fields
@pytest.mark.parametrize("nbits", (1, 2, 4, 8))
@pytest.mark.parametrize("n", SIZES + (0,))
def test_pack_unpack_codes(n, nbits):
    codes = torch.randint(0, 2**nbits, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    packed = torch.full(((n * nbits + 7) // 8,), 0xFF, dtype=torch.uint8)
    K.pack_codes(codes, nbits, packed)
    assert np.array_equal(packed.numpy(), ref_pack(codes, nbits))
    assert torch.equal(K.unpack_codes(packed, nbits, n), codes)


@pytest.mark.parametrize("n", SIZES)
def test_pack_unpack_bits(n):
    flags = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.5
    packed = torch.empty((n + 7) // 8, dtype=torch.uint8)
    K.pack_bits(flags, packed)
    assert np.array_equal(packed.numpy(), np.packbits(flags.numpy(), bitorder="little"))
    assert torch.equal(K.unpack_bits(packed, n), flags)


# ------------------------------------------------------------------------------------------------
# 16-bit conversions used by every kernel
def test_half_conversions_are_exact_and_round_to_nearest_even():
    """All 65536 half / bfloat16 bit patterns to float32 and back, plus float32 rounding cases."""
    ops = cpu_segments.OPS
    allbits = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    for dtype, to_f32, from_f32 in ((torch.float16, "f16_bits_to_f32", "f32_to_f16_bits"),
                                    (torch.bfloat16, "bf16_bits_to_f32", "f32_to_bf16_bits")):
        ref = allbits.view(dtype).float()
        got = torch.tensor([ops[to_f32](np.int16(b)) for b in allbits.tolist()], dtype=torch.float32)
        assert torch.equal(got.view(torch.int32), ref.view(torch.int32)) or (
            torch.equal(got.isnan(), ref.isnan()) and torch.equal(got[~got.isnan()], ref[~ref.isnan()]))
        f = torch.cat([torch.randn(20000) * 10.0 ** torch.randint(-9, 6, (20000,)).float(),
                       torch.tensor([65504.0, 65519.0, 65520.0, 6e-8, 3e-8, 2.98e-8, 1e-45, -0.0, 0.0,
                                     float("inf"), -float("inf"), 3.4e38])])
        want = f.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
        got = torch.tensor([ops[from_f32](np.float32(v)) for v in f.tolist()], dtype=torch.int64)
        assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------------
# dispatch and argument checks
def test_backend_selection_without_a_gpu():
    assert K.backend_for(torch.zeros(3)) == "cpu"
    assert K.backend_for_device(torch.device("cpu")) == "cpu"
    assert K.backend_for_device(torch.device("cuda")) == "cuda"
    assert K.backend_for_device(torch.device("cuda", 1)) == "cuda"
    with pytest.raises(ValueError, match="no kernels for device"):
        K.backend_for_device(torch.device("meta"))
    with pytest.raises(ValueError, match="different devices"):
        K.backend_for(torch.zeros(1), torch.zeros(1, device="meta"))


def test_starting_the_cpu_pool_keeps_torchs_thread_count():
    """Numba's OpenMP pool shares torch's runtime; starting it must not undo torch.set_num_threads(1)
    (a DDP worker would then run torch on every core: 8x slower training, measured)."""
    code = ("import torch; torch.set_num_threads(1); import cser_hooks.kernels as K\n"
            "K.topk_select(torch.randn(1 << 18), 10); K.warm_up()\n"
            "assert torch.get_num_threads() == 1, torch.get_num_threads()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                          env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_cpu_path_never_imports_numba_cuda():
    code = ("import sys, torch; import cser_hooks.kernels as K\n"
            "p = torch.randn(100); b = torch.empty(13, dtype=torch.uint8); s = torch.empty(1)\n"
            "K.sign_compress(p, torch.tensor([0, 100]), b, s)\n"
            "K.topk_select(p, 5)\n"
            "assert 'numba.cuda' not in sys.modules, sorted(m for m in sys.modules if 'cuda' in m)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_bad_arguments_name_the_fix():
    p = torch.randn(10)
    bits = torch.empty(2, dtype=torch.uint8)
    scales = torch.empty(1)
    with pytest.raises(TypeError, match="float"):
        K.sign_compress(p.to(torch.int32), torch.tensor([0, 10]), bits, scales)
    with pytest.raises(ValueError, match="must have 2 elements"):
        K.sign_compress(p, torch.tensor([0, 10]), torch.empty(3, dtype=torch.uint8), scales)
    with pytest.raises(ValueError, match="non-decreasing"):
        K.sign_compress(p, torch.tensor([0, 11]), bits, scales)
    with pytest.raises(ValueError, match="contiguous"):
        K.sign_compress(torch.randn(20)[::2], torch.tensor([0, 10]), bits, scales)
    with pytest.raises(ValueError, match=r"s must be an int in \[1, 255\]"):
        K.qsgd_level_bits(0)
    with pytest.raises(TypeError, match="allocate it with dtype"):
        K.block_gather(p, torch.tensor([0]), 4, torch.empty(4, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"k must be an int in \[0, numel=10\]"):
        K.topk_select(p, 11)
