"""Every Numba CUDA kernel of cser_hooks.kernels, run in Numba's CUDA simulator, against the
plain-torch references of tests/reference/kernels.py (docs/algorithms.md §1-2), on the inputs of
tests/kernel_cases.py (the CPU kernels' tests, tests/test_kernels_cpu.py, use the same).

Run in its own process: ``pytest -m cudasim`` (tests/conftest.py sets NUMBA_ENABLE_CUDASIM=1 before
numba is imported; in a normal pytest process these tests are skipped with that instruction).

The launchers in ``cser_hooks/kernels/cuda_*.py`` take any arrays the kernels accept, so the tests hand them
NumPy arrays (the simulator copies them in and out of its fake device) and the simulator's device
arrays for scratch. float16 / bfloat16 tensors reach the kernels as ``uint16`` / ``int16`` bit views
(``cser_hooks/kernels/_views.py``) on a real GPU too, so the simulator runs exactly the GPU code path for them;
no bfloat16 array type is needed. The simulator runs one Python thread per CUDA thread, so blocks
are small (16-32 threads), grids are capped (grid-stride loops) and the largest size runs only
where a kernel does little work per element; tiles are small enough that segments cross tiles.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

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
from reference.masks import rounding_uniforms

pytestmark = pytest.mark.cudasim

TPB = 16
MAX_BLOCKS = 4
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@pytest.fixture(scope="module")
def kmods():
    from cser_hooks.kernels import cuda_bits, cuda_blocks, cuda_launch, cuda_qsgd, cuda_sign, cuda_topk

    assert cuda_launch.SIMULATOR, "these tests must run with NUMBA_ENABLE_CUDASIM=1"
    return {"sign": cuda_sign, "qsgd": cuda_qsgd, "blocks": cuda_blocks, "topk": cuda_topk, "bits": cuda_bits,
            "alloc": cuda_launch.SimAlloc()}


def bits_np(t: torch.Tensor) -> np.ndarray:
    """The array a kernel receives for tensor t: 16-bit floats as integer bit patterns."""
    view = {torch.float16: torch.uint16, torch.bfloat16: torch.int16}.get(t.dtype)
    return (t.view(view) if view is not None else t).numpy()


def kind(dtype) -> int:
    return {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}[dtype]


def tile_for(n: int) -> int:
    return 256 if n <= 1023 else 4096


# ------------------------------------------------------------------------------------------------
# sign_blockwise: sign_tile, finalize_kernel, sign_edges, sign_decompress_kernel
def run_sign(km, p, offsets, e=None, residual=True):
    n = p.numel()
    nseg = offsets.numel() - 1
    bits = np.full((n + 7) // 8, 0xAA, np.uint8)
    scales = np.full(nseg, np.nan, np.float32)
    dummy = np.zeros(1, np.float32)
    e_np = e.numpy().copy() if e is not None else dummy
    res = e_np if e is not None else (np.full(n, np.nan, np.float32) if residual else dummy)
    km["sign"].sign_compress(bits_np(p), kind(p.dtype), e_np, e is not None, offsets.numpy(), n, nseg, bits, scales,
                             res, e is not None or residual, km["alloc"], tpb=TPB, max_blocks=MAX_BLOCKS,
                             tile=tile_for(n))
    return bits, torch.from_numpy(scales), torch.from_numpy(res)


CASES_SIGN = [(n, dtype, how) for n in (1, 7, 1023) for dtype in DTYPES for how in ("irregular", "fixed")]
CASES_SIGN += [(1023, torch.float32, "ones"), (1023, torch.bfloat16, "one")]  # 65539: the fused-EF test


@pytest.mark.parametrize("n,dtype,how", CASES_SIGN)
def test_sign_kernels(kmods, n, dtype, how):
    p = make_input(n, dtype, seed=n)
    offsets = make_offsets(n, how, seed=n)
    bits, scales, res = run_sign(kmods, p, offsets)
    assert np.array_equal(bits, ref_pack(p.float() >= 0))
    assert_stats(scales, ref_sign_stats(p, offsets), sign_counts(offsets))
    assert torch.equal(res, p.float() - ref_sign_dense(p, scales, offsets))


@pytest.mark.parametrize("dtype", DTYPES)
def test_statistics_exact_on_small_integers(kmods, dtype):
    """Integer inputs: every fp32 partial sum is exact, so scales and norms must match exactly."""
    n = 1023
    p = make_input(n, dtype, seed=5, integers=True)
    offsets = make_offsets(n, "irregular", seed=2)
    _, scales, _ = run_sign(kmods, p, offsets, residual=False)
    assert torch.equal(scales, ref_sign_stats(p, offsets).float())
    block = 100
    norms = np.zeros((n + block - 1) // block, np.float32)
    kmods["qsgd"].qsgd_compress(bits_np(p), kind(dtype), np.zeros(1, np.float32), False, np.int64(5), np.int64(0),
                                block, n, 3, 2, np.zeros((n + 7) // 8, np.uint8), np.zeros((2 * n + 7) // 8, np.uint8),
                                norms, np.zeros(1, np.float32), False, kmods["alloc"], tpb=TPB,
                                max_blocks=MAX_BLOCKS, tile=tile_for(n))
    assert torch.equal(torch.from_numpy(norms), ref_qsgd_norms(p, block).float())


@pytest.mark.parametrize("n,dtype", [(7, torch.bfloat16), (1023, torch.float16), (1023, torch.float32),
                                     (65539, torch.float32)])
def test_sign_kernels_fused_error_feedback(kmods, n, dtype):
    g = make_input(n, dtype, seed=2 * n)
    e = make_input(n, torch.float32, seed=3 * n, zeros=False) * 0.1
    offsets = make_offsets(n, "irregular", seed=n)
    bits, scales, e_new = run_sign(kmods, g, offsets, e=e)
    p = g.float() + e
    assert np.array_equal(bits, ref_pack(p >= 0))
    assert_stats(scales, ref_sign_stats(p, offsets), sign_counts(offsets))
    assert torch.equal(e_new, p - ref_sign_dense(p, scales, offsets))


@pytest.mark.parametrize("n,out_dtype", [(n, torch.float32) for n in (1, 7, 1023, 65539)]
                         + [(1023, d) for d in OUT_DTYPES[1:]])
def test_sign_decompress_kernel(kmods, n, out_dtype):
    p = make_input(n, torch.float32, seed=7)
    offsets = make_offsets(n, "irregular", seed=1)
    bits = torch.from_numpy(ref_pack(p >= 0))
    scales = ref_sign_stats(p, offsets).float()
    out = torch.empty(n, dtype=out_dtype)
    kmods["sign"].sign_decompress(bits.numpy(), scales.numpy(), offsets.numpy(), n, offsets.numel() - 1,
                                  bits_np(out), kind(out_dtype), tpb=32, max_blocks=MAX_BLOCKS)
    assert torch.equal(out, ref_sign_dense(p, scales, offsets).to(out_dtype))
    if out_dtype == torch.float32:  # accumulate: out += (alpha * scale) * (+1 | -1)
        base = make_input(n, torch.float32, seed=9)
        acc = base.clone()
        alpha = np.float32(-0.3)
        kmods["sign"].sign_decompress(bits.numpy(), scales.numpy(), offsets.numpy(), n, offsets.numel() - 1,
                                      acc.numpy(), 0, True, alpha, tpb=32, max_blocks=MAX_BLOCKS)
        assert torch.equal(acc, base + ref_sign_dense(p, scales * torch.tensor(alpha), offsets))


# ------------------------------------------------------------------------------------------------
# qsgd: qsgd_tile, finalize_kernel, qsgd_edges, qsgd_decompress_kernel
QSGD_CONFIGS = [(1, 7), (3, 64), (15, 100), (255, 5000)]
CASES_QSGD = [(n, dtype, s, block) for n in (1, 7, 1023) for dtype in DTYPES for s, block in QSGD_CONFIGS
              if n == 1023 or (s, block) in ((3, 64), (255, 5000))]
CASES_QSGD += [(65539, torch.float32, 15, 1000)]


@pytest.mark.parametrize("n,dtype,s,block", CASES_QSGD)
def test_qsgd_kernels(kmods, n, dtype, s, block):
    p = make_input(n, dtype, seed=n + s)
    rseed = (s << 40) | (n << 8) | 0xF1  # the seed's high word in play
    u = rounding_uniforms(n, rseed)
    nbits = ref_nbits(s)
    signs = np.full((n + 7) // 8, 0x55, np.uint8)
    levels = np.full((n * nbits + 7) // 8, 0x55, np.uint8)
    norms = np.full((n + block - 1) // block, np.nan, np.float32)
    res = np.full(n, np.nan, np.float32)
    dummy = np.zeros(1, np.float32)
    kmods["qsgd"].qsgd_compress(bits_np(p), kind(dtype), dummy, False, np.int64(rseed & 0xFFFFFFFF),
                                np.int64(rseed >> 32), block, n, s, nbits, signs, levels,
                                norms, res, True, kmods["alloc"], tpb=TPB, max_blocks=MAX_BLOCKS, tile=tile_for(n))
    nr = torch.from_numpy(norms)
    assert_stats(nr, ref_qsgd_norms(p, block), block_counts(n, block))
    lv = ref_qsgd_levels(p, u, s, block, nr)
    assert np.array_equal(signs, ref_pack(p.float() >= 0))
    assert np.array_equal(levels, ref_pack(lv, nbits))
    dense = ref_qsgd_dense(p.float(), lv, s, block, nr)
    assert torch.equal(torch.from_numpy(res), p.float() - dense)

    out = torch.empty(n, dtype=dtype)
    kmods["qsgd"].qsgd_decompress(signs, levels, norms, s, nbits, block, n, bits_np(out), kind(dtype), tpb=32,
                                  max_blocks=MAX_BLOCKS)
    assert torch.equal(out, dense.to(dtype))


@pytest.mark.parametrize("n,out_dtype", [(65539, torch.float32), (1023, torch.float64)])
def test_qsgd_decompress_kernel(kmods, n, out_dtype):
    s, block = 7, 300
    p = make_input(n, torch.float32, seed=3)
    u = torch.rand(n, generator=torch.Generator().manual_seed(4))
    nbits = ref_nbits(s)
    norms = ref_qsgd_norms(p, block).float()
    lv = ref_qsgd_levels(p, u, s, block, norms)
    out = torch.empty(n, dtype=out_dtype)
    kmods["qsgd"].qsgd_decompress(ref_pack(p >= 0), ref_pack(lv, nbits), norms.numpy(), s, nbits, block, n,
                                  bits_np(out), kind(out_dtype), tpb=32, max_blocks=MAX_BLOCKS)
    assert torch.equal(out, ref_qsgd_dense(p, lv, s, block, norms).to(out_dtype))
    if out_dtype == torch.float32:  # accumulate: out += alpha * C (an FMA is allowed: one rounding fewer)
        base = make_input(n, torch.float32, seed=8)
        acc = base.clone()
        kmods["qsgd"].qsgd_decompress(ref_pack(p >= 0), ref_pack(lv, nbits), norms.numpy(), s, nbits, block, n,
                                      acc.numpy(), 0, True, -0.25, tpb=32, max_blocks=MAX_BLOCKS)
        want = base.double() - 0.25 * ref_qsgd_dense(p, lv, s, block, norms).double()
        torch.testing.assert_close(acc.double(), want, rtol=2 ** -23, atol=1e-30)


# ------------------------------------------------------------------------------------------------
# random_block: gather_kernel (plain and zeroing), scatter_kernel (set and add)
@pytest.mark.parametrize("n,dtype,b", [(n, d, b) for n in (1, 7, 1023) for d in OUT_DTYPES for b in (1, 256)]
                         + [(65539, torch.float32, 256), (65539, torch.bfloat16, 3)])
def test_block_kernels(kmods, n, dtype, b):
    kb = kmods["blocks"]
    raw = {2: np.int16, 4: np.int32, 8: np.int64}[torch.empty(0, dtype=dtype).element_size()]
    x = make_input(n, dtype, seed=n + b)
    blocks = random_blocks(n, b, 0.05 if n > 1023 else 0.3, seed=b)
    nblocks = (n + b - 1) // b
    if nblocks - 1 not in blocks.tolist():
        blocks = torch.cat([blocks[1:], torch.tensor([nblocks - 1])]) if blocks.numel() > 1 else \
            torch.tensor([nblocks - 1])
    want = ref_gather(x, blocks, b)
    out = torch.full((blocks.numel() * b,), 7.0, dtype=dtype)
    y = x.clone()
    kb.gather(bits_np(y).view(raw), blocks.numpy(), b, n, bits_np(out).view(raw), True, tpb=32, max_blocks=MAX_BLOCKS)
    assert torch.equal(out, want)
    pos, src = ref_block_index(blocks, b, n)
    zeroed = x.clone()
    zeroed[pos] = 0
    assert torch.equal(y, zeroed)
    out2 = torch.empty_like(out)
    kb.gather(bits_np(x).view(raw), blocks.numpy(), b, n, bits_np(out2).view(raw), False, tpb=32,
              max_blocks=MAX_BLOCKS)
    assert torch.equal(out2, want)

    vals = make_input(blocks.numel() * b, dtype, seed=99, zeros=False)
    base = make_input(n, dtype, seed=98, zeros=False)
    got = base.clone()
    kb.scatter(bits_np(vals).view(raw), blocks.numpy(), b, n, bits_np(got).view(raw), False, 0, tpb=32,
               max_blocks=MAX_BLOCKS)
    expect = base.clone()
    expect[pos] = vals[src]
    assert torch.equal(got, expect)
    got = base.clone()
    kb.scatter(bits_np(vals), blocks.numpy(), b, n, bits_np(got), True, kind(dtype), tpb=32, max_blocks=MAX_BLOCKS)
    expect = base.clone()
    expect[pos] = base[pos] + vals[src] if dtype == torch.float64 else (base[pos].float() + vals[src].float()).to(dtype)
    assert torch.equal(got, expect)


# ------------------------------------------------------------------------------------------------
# top_k: topk_init, topk_hist, topk_pick, topk_count, topk_scan, topk_compact; scatter_indices_kernel
def run_topk(km, x, k, chunk=1024, items=4):
    n = x.numel()
    values = torch.zeros(k, dtype=x.dtype)
    indices = torch.full((k,), -1, dtype=torch.int32)
    km["topk"].topk_select(bits_np(x), kind(x.dtype), 31 if x.dtype == torch.float32 else 15, n, k, bits_np(values),
                           indices.numpy(), km["alloc"], tpb=TPB, max_blocks=MAX_BLOCKS, chunk=chunk, items=items)
    return values, indices


def _tied(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-20, 21, (n,), generator=g).float() / 4
    x[torch.rand(n, generator=g) < 0.1] *= -0.0
    return x.to(dtype)


CASES_TOPK = [(1, torch.float32, False, (1,)), (7, torch.float32, True, (1, 3, 7)),
              (1023, torch.float32, True, (1, 20, 1023)), (1023, torch.float32, False, (20,)),
              (1023, torch.float16, True, (20,)), (1023, torch.bfloat16, True, (300,)),
              (1023, torch.bfloat16, False, (20,)), (4099, torch.float32, True, (81,)),
              (65539, torch.float32, False, (64,))]


@pytest.mark.parametrize("n,dtype,ties,ks", CASES_TOPK)
def test_topk_kernels(kmods, n, dtype, ties, ks):
    x = _tied(n, dtype, n) if ties else make_input(n, dtype, seed=n)
    # the largest size runs with bigger chunks (fewer simulated blocks; still 5 chunks)
    chunk, items = (16384, 16) if n > 4099 else (1024, 4)
    for k in ks:
        values, indices = run_topk(kmods, x, k, chunk=chunk, items=items)
        rv, ri = ref_topk(x, k)
        assert torch.equal(indices, ri)
        assert torch.equal(values, rv)


@pytest.mark.parametrize("n,dtype", [(1023, torch.float32), (1023, torch.bfloat16), (1023, torch.float16),
                                     (65539, torch.float32)])
def test_scatter_indices_kernel(kmods, n, dtype):
    x = make_input(n, dtype, seed=3)
    rv, ri = ref_topk(x, max(1, n // 50))
    out = make_input(n, dtype, seed=4, zeros=False)
    want = out.clone()
    want[ri.long()] = (want[ri.long()].float() + rv.float()).to(dtype)
    kmods["blocks"].scatter_add_indices(bits_np(rv), ri.numpy(), bits_np(out), kind(dtype), tpb=32,
                                        max_blocks=MAX_BLOCKS)
    assert torch.equal(out, want)


# ------------------------------------------------------------------------------------------------
# bit fields: pack_codes_kernel, unpack_codes_kernel
@pytest.mark.parametrize("nbits", (1, 2, 4, 8))
@pytest.mark.parametrize("n", (1, 7, 1023, 65539))
def test_pack_kernels(kmods, n, nbits):
    codes = torch.randint(0, 2**nbits, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    packed = np.full((n * nbits + 7) // 8, 0xFF, np.uint8)
    kmods["bits"].pack_codes(codes.numpy(), nbits, n, packed, tpb=32, max_blocks=MAX_BLOCKS)
    assert np.array_equal(packed, ref_pack(codes, nbits))
    back = np.zeros(n, np.uint8)
    kmods["bits"].unpack_codes(packed, nbits, n, back, tpb=32, max_blocks=MAX_BLOCKS)
    assert np.array_equal(back, codes.numpy())
