"""Which implementation a compressor's hot path takes (issue: GPU dispatch).

The compressors call ``cser_hooks.kernels`` for the work torch does badly; the kernels pick the Numba
CPU or Numba CUDA implementation from the tensor's device (``kernels.backend_for``). These tests record
the kernel entry points a compressor calls on CPU tensors (the recorder delegates to the real kernel, so
results are also checked against the plain-torch references), and run the same calls on a CUDA device
where there is one (skipped here: no GPU). The CUDA branch of each kernel runs in the simulator pass
(tests/test_kernels_cudasim.py).
"""
from __future__ import annotations

import pytest
import torch

import cser_hooks.kernels as K
from cser_hooks.compressors import MaskKey, get_compressor
from cser_hooks.compressors import qsgd as qsgd_mod
from cser_hooks.compressors import sign as sign_mod
from cser_hooks.compressors import top_k as topk_mod
from cser_hooks.compressors.top_k import TopK

ENTRY_POINTS = ("sign_compress", "sign_decompress", "qsgd_compress", "qsgd_decompress", "topk_select",
                "block_gather", "block_gather_zero", "block_scatter", "block_scatter_add", "scatter_add_indices")

# what each compressor operation must call on a CPU tensor (anything else from ENTRY_POINTS is an error)
CPU_ROUTES = [
    ("sign_blockwise", "compress", {"sign_compress"}),
    ("sign_blockwise", "compress_ef", {"sign_compress"}),        # fused: residual written by the kernel
    ("sign_blockwise", "decompress", {"sign_decompress"}),
    ("sign_blockwise", "decompress_add", {"sign_decompress"}),    # accumulating: no temporary
    ("top_k:ratio=0.05", "compress", {"topk_select"}),            # at >= TopK.KERNEL_MIN elements
    ("top_k:ratio=0.05", "compress_ef", {"topk_select"}),
    ("top_k:ratio=0.05@small", "compress", set()),                # below: torch's selection
    ("top_k:ratio=0.05", "decompress_add", {"scatter_add_indices"}),  # the allgather's average
    ("qsgd:s=15,block=64", "compress", {"qsgd_compress"}),
    ("qsgd:s=15,block=64", "compress_ef", {"qsgd_compress"}),     # fused: residual written by the kernel
    ("qsgd:s=15,block=64,scale=0.5", "compress_ef", {"qsgd_compress", "qsgd_decompress"}),  # scaled: unfused
    ("qsgd:s=15,block=64", "decompress", {"qsgd_decompress"}),
    ("qsgd:s=15,block=64", "decompress_add", {"qsgd_decompress"}),  # accumulating: no temporary
    ("random_block:ratio=1/8,block=16", "compress", set()),       # index_select on CPU
    ("random_block:ratio=1/8,block=16", "compress_ef", set()),
    ("random_block:ratio=1/8,block=16", "overwrite", set()),
]


@pytest.fixture
def calls(monkeypatch):
    """Record (name, backend) of every kernel entry point called; the real kernel still runs."""
    log: list[tuple[str, str]] = []
    for name in ENTRY_POINTS:
        real = getattr(K, name)

        def recorder(*args, _real=real, _name=name, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            log.append((_name, K.backend_for(*tensors)))
            return _real(*args, **kwargs)

        monkeypatch.setattr(K, name, recorder)
    return log


def run_op(c, op, x, mk):
    n = x.numel()
    if op == "compress":
        return c.compress(x, mk)
    if op == "compress_ef":
        return c.compress_ef(x.clone(), mk)
    if op == "decompress":
        payload = c.compress(x, mk)
        return c.decompress(payload, n, x.dtype, mk)
    if op == "decompress_add":
        out = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(x.device)
        return c.decompress_add(c.compress(x, mk), out, 0.25, mk)
    if op == "overwrite":
        (values,) = c.compress(x, mk)
        return c.overwrite(values, torch.zeros_like(x), mk)
    raise AssertionError(op)


@pytest.mark.parametrize("spec,op,expected", CPU_ROUTES, ids=[f"{s.split(':')[0]}-{o}" for s, o, _ in CPU_ROUTES])
def test_cpu_tensors_take_the_cpu_kernels(calls, spec, op, expected):
    spec, small = spec.removesuffix("@small"), spec.endswith("@small")
    c = get_compressor(spec)
    n = TopK.KERNEL_MIN - 1 if small else TopK.KERNEL_MIN if spec.startswith("top_k") else 4099
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    mk = MaskKey(seed=1, step=2, key=3)
    if op == "decompress":
        payload = c.compress(x, mk)
        calls.clear()
        c.decompress(payload, x.numel(), x.dtype, mk)
    elif op == "decompress_add":
        payload = c.compress(x, mk)
        out = torch.randn(n, generator=torch.Generator().manual_seed(1))
        if spec.startswith("top_k"):
            want = out.clone().index_add_(0, payload[1].long(), payload[0], alpha=0.25)
        else:  # torch's add_ of the decompressed values
            want = out.clone().add_(c.decompress(payload, n, torch.float32, mk), alpha=0.25)
        calls.clear()
        c.decompress_add(payload, out, 0.25, mk)
        assert torch.equal(out, want)  # alpha * v is exact for alpha = 1/4: the same sums
    else:
        run_op(c, op, x, mk)
    assert {name for name, _ in calls} == expected
    assert all(backend == "cpu" for _, backend in calls)


def test_routed_results_equal_the_references():
    """The kernel-backed paths give the plain references' answers (bitwise where the reference is)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4099, generator=g)
    offs = [0, 100, 1100, 4099]
    c = get_compressor("sign_blockwise")
    bits, scales = c.compress(x, MaskKey(), segments=offs)
    rbits, rscales = sign_mod.reference_compress(x, offs)
    assert torch.equal(bits, rbits)
    torch.testing.assert_close(scales, rscales, rtol=2e-6, atol=0)
    dense = c.decompress((bits, scales), x.numel(), torch.float32, MaskKey(), segments=offs)
    assert torch.equal(dense, sign_mod.reference_decompress(bits, scales, offs, x.numel(), torch.float32))
    p = x.clone()
    ebits, escales = c.compress_ef(p, MaskKey(), segments=offs)
    assert torch.equal(ebits, bits) and torch.equal(escales, scales)
    assert torch.equal(p, x - dense)

    t = get_compressor("top_k:ratio=0.01")
    for big in (x, torch.randn(TopK.KERNEL_MIN + 5, generator=g)):
        values, idx = t.compress(big, MaskKey())
        rv, ri = topk_mod.reference_topk(big, t.k(big.numel()))
        assert torch.equal(idx, ri) and torch.equal(values, rv)

    q = get_compressor("qsgd:s=7,block=300")
    payload = q.compress(x, MaskKey(seed=3))
    want = qsgd_mod.reference_decompress(*payload, q.s, q.block, x.numel())
    got = q.decompress(payload, x.numel(), torch.float32, MaskKey(seed=3))
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    # the kernel's payload is the plain reference's given the same uniforms (levels bit-exact when the
    # norms are; they are summed in float64 either way)
    u = qsgd_mod.reference_uniforms(x.numel(), qsgd_mod.rounding_seed(MaskKey(seed=3)))
    rsigns, rlevels, rnorms = qsgd_mod.reference_compress(x, u, q.s, q.block)
    assert torch.equal(payload[2], rnorms) and torch.equal(payload[0], rsigns) and torch.equal(payload[1], rlevels)
    # compress_ef: the same payload, and the residual x − C(x) written in place by the kernel
    p = x.clone()
    epayload = q.compress_ef(p, MaskKey(seed=3))
    assert all(torch.equal(a, b) for a, b in zip(epayload, payload))
    assert torch.equal(p, x - got)


@pytest.mark.gpu
@pytest.mark.parametrize("spec,op,expected", CPU_ROUTES, ids=[f"{s.split(':')[0]}-{o}" for s, o, _ in CPU_ROUTES])
def test_cuda_tensors_take_the_cuda_kernels(calls, spec, op, expected):
    """On a GPU: sign, top_k, qsgd (both ways) and random_block all run CUDA kernels, and agree with the
    CPU path (bitwise for sign bits, top_k, random_block; qsgd levels may differ where a block norm, a
    float64 sum in another order, rounds to the neighbouring fp32 value and r + u is within an ulp of an
    integer, so its payload is compared through the decompressed values)."""
    spec = spec.removesuffix("@small")
    c_gpu, c_cpu = get_compressor(spec), get_compressor(spec)
    x = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0))
    mk = MaskKey(seed=1, step=2, key=3)
    got = run_op(c_gpu, op, x.cuda(), mk)
    want = run_op(c_cpu, op, x, mk)
    gpu_expected = set(expected) | ({"qsgd_compress"} if spec.startswith("qsgd") else set())
    gpu_expected |= {"topk_select"} if op == "decompress_add" else set()  # run_op compresses first
    if spec.startswith("random_block"):
        gpu_expected = {"compress": {"block_gather"}, "compress_ef": {"block_gather_zero"},
                        "overwrite": {"block_gather", "block_scatter"}}[op]
    assert {name for name, _ in calls if _ == "cuda"} == gpu_expected
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for a, b in zip(got, want):
        if spec.startswith("qsgd"):
            continue
        if a.is_floating_point():
            torch.testing.assert_close(a.cpu(), b, rtol=2e-6, atol=0)
        else:
            assert torch.equal(a.cpu(), b)


@pytest.mark.gpu
def test_qsgd_rounding_on_cuda_is_the_cpu_rounding():
    """The uniforms are counter-based and drawn inside the kernel (no array, no host→device copy), so a
    CUDA compress rounds exactly as the CPU one given the same norms; another rank rounds differently;
    E[C(x)] = x holds on the device."""
    q = get_compressor("qsgd:s=3,block=64")
    x = torch.arange(1 << 12, dtype=torch.float32).remainder_(7).sub_(3)  # small integers: exact norms
    mk = MaskKey(seed=1, step=2, key=3, rank=0)
    got, want = q.compress(x.cuda(), mk), q.compress(x, mk)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))
    other = q.compress(x.cuda(), MaskKey(seed=1, step=2, key=3, rank=1))
    assert not torch.equal(other[1], got[1])
    x = torch.randn(1 << 12, device="cuda")
    mean = sum(q(x, MaskKey(seed=1, step=s, key=0)) for s in range(400)) / 400
    assert float((mean - x).abs().max()) < 0.25 * float(x.abs().max())
