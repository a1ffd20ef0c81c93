"""The compressor library against plain references written here (docs/algorithms.md §1).

Every expected value comes from the definitions of §1, the shared-mask definition of the team brief and
the wire formats stated in the compressor docstrings, re-implemented below with NumPy / float64; the
package contributes only the object under test (``get_compressor``, ``MaskKey``). Checked per compressor,
size (1, 7, 1023, 65539) and dtype (fp32, fp16, bf16):

* wire format: the payload equals the reference payload (bits, levels, indices, selected values exactly;
  fp32 block statistics within a rigorous summation bound) and ``decompress`` gives the reference C(x);
  the payload survives a trip through raw bytes; ``wire_bytes`` is the number of bytes sent;
* ``compress_ef`` sends the same payload and leaves ``p - C(p)`` in ``p``;
* unbiased compressors are unbiased, biased ones contract with the ``delta`` they claim;
* the registry: every name parses, ``spec()`` rebuilds the same compressor.

Tolerances (stated once, used everywhere):

* ``U[dtype]``: unit roundoff (2^-24 fp32, 2^-11 fp16, 2^-8 bf16).
* A block statistic (mean |x| of sign_blockwise, L2 norm of qsgd) is an fp32 sum whose order is the
  implementation's (torch, Numba CPU, CUDA). For m non-negative terms any order is within (m-1)·u of the
  exact sum, plus one rounding for the division / square root: ``stat_rtol(m) = (m + 2)·2^-24``.
* Everything downstream of the statistics is checked *given the payload's own statistics*: sign values
  exactly; qsgd levels exactly, except where the rounding decision ``u < frac(s|x|/norm)`` or
  ``floor`` is within a few fp32 ulps of its boundary (torch and the kernels evaluate ``s|x|/norm`` in
  different orders); qsgd values ``norm·level/s`` within 6 fp32 roundings, then one rounding to the
  output dtype.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cser_hooks.compressors import REGISTRY, Compressor, MaskKey, get_compressor
from reference.masks import ref_blocks, ref_seed, rounding_uniforms

SIZES = (1, 7, 1023, 65539)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
U = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}
U32 = 2.0**-24
FP16_MAX = 65504.0
MK = MaskKey(seed=3, step=11, key=2, salt="c1", rank=1)


# ------------------------------------------------------------------------------------------------
# plain references of docs/algorithms.md §1 (nothing imported from cser_hooks)


# the seeds, QSGD's uniforms and the shared-mask block draw (ref_seed, rounding_uniforms, ref_blocks):
# tests/reference/masks.py


def pack_bits(flags) -> np.ndarray:
    """1 bit per element, element i -> byte i//8, bit i%8 (LSB first), pad bits 0."""
    return np.packbits(np.asarray(flags, dtype=np.uint8), bitorder="little")


def pack_codes(codes, L: int) -> np.ndarray:
    """L-bit codes, element i at global bit i*L, LSB first."""
    c = np.asarray(codes, dtype=np.int64)
    bits = ((c[:, None] >> np.arange(L)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(bits, bitorder="little")


def unpack_codes(packed: torch.Tensor, L: int, m: int) -> np.ndarray:
    bits = np.unpackbits(packed.numpy(), bitorder="little")[: m * L].reshape(m, L).astype(np.int64)
    return (bits << np.arange(L)).sum(1)


def level_bits(s: int) -> int:
    return next(L for L in (1, 2, 4, 8) if 2**L >= s + 1)


def stat_rtol(m: int) -> float:
    return (m + 2) * U32


def check(ok, message: str) -> None:
    """assert without pytest's introspection (which would print whole tensors / payload bytes)."""
    if not bool(ok):
        raise AssertionError(message)


def assert_bytes(t: torch.Tensor, expected: np.ndarray, what: str):
    assert t.dtype == torch.uint8 and t.dim() == 1, (
        f"{what}: expected a flat uint8 tensor, got {t.dtype} {t.shape}"
    )
    got = t.numpy()
    assert got.shape == expected.shape, f"{what}: {got.size} bytes, expected {expected.size}"
    bad = np.flatnonzero(got != expected)
    assert bad.size == 0, (
        f"{what}: {bad.size} bytes differ, first at {bad[:5]}: {got[bad[:5]]} vs {expected[bad[:5]]}"
    )


# Each reference returns (expected C(x) in float64, elementwise tolerance in float64 or None for an
# exact match in the output dtype) and asserts the payload on the way.


def ref_identity(x, payload):
    (v,) = payload
    assert v.dtype == x.dtype and torch.equal(v, x), "identity payload must be x itself"
    return x.double(), None


def ref_cast(x, payload, wire):
    (v,) = payload
    expected = x.double()
    if wire == torch.float16:
        expected = expected.clamp(-FP16_MAX, FP16_MAX)  # documented fp16 policy: clip, never inf
    expected = expected.to(wire)
    assert v.dtype == wire and torch.equal(v, expected), f"{wire} payload differs from cast(x)"
    return expected.to(x.dtype).double(), None


def ref_block(x, payload, mk, ratio, block, scaled):
    """random_block / random_k: selected blocks in ascending order, zero-padded to k*block values."""
    n = x.numel()
    nblocks, blocks = ref_blocks(n, ratio, block, mk)
    xp = torch.cat([x, x.new_zeros(nblocks * block - n)]).view(nblocks, block)
    values = xp[blocks].reshape(-1)
    mask = torch.zeros(nblocks * block, dtype=torch.bool).view(nblocks, block)
    mask[blocks] = True
    mask = mask.reshape(-1)[:n]
    (v,) = payload
    assert v.dtype == x.dtype and v.shape == values.shape, f"payload {v.dtype} {tuple(v.shape)}"
    expected = torch.zeros(n, dtype=torch.float64)
    if not scaled:
        check(torch.equal(v, values), "payload must be the selected blocks, ascending, zero-padded")
        expected[mask] = x.double()[mask]
        return expected, None
    # unbiased scaling: every block (the short tail block too) is selected with probability k/nblocks
    scale = nblocks / blocks.numel()
    want = values.double() * scale
    ok = torch.all((v.double() - want).abs() <= 2 * (U[x.dtype] + U32) * want.abs())
    check(ok, f"scaled payload is not values * nblocks/k = {scale}")
    expected[mask] = x.double()[mask] * scale
    tol = torch.zeros(n, dtype=torch.float64)
    tol[mask] = 2 * (U[x.dtype] + U32) * expected[mask].abs()
    return expected, tol


def check_top_k(x, vals, idx, ratio):
    """Asserts a valid exact top-k payload (tie-agnostic): returns the indices as int64."""
    n = x.numel()
    k = min(n, max(1, math.ceil(ratio * n)))
    assert idx.dtype == torch.int32 and idx.shape == (k,), f"indices {idx.dtype} {tuple(idx.shape)}, k={k}"
    i = idx.long()
    check(torch.all(i[1:] > i[:-1]) and (k == 0 or (i[0] >= 0 and i[-1] < n)), "indices must ascend strictly")
    assert vals.dtype == x.dtype and torch.equal(vals, x[i]), "values must be x[indices]"
    if k:
        a = x.double().abs()
        thr = a[i].min()
        assert int((a > thr).sum()) <= k and bool(torch.all(a[i] >= thr)), "not the k largest |x|"
        kept = torch.zeros(n, dtype=torch.bool)
        kept[i] = True
        check(not torch.any((a > thr) & ~kept), "an entry larger than the k-th magnitude was dropped")
    return i


def ref_top_k(x, payload, ratio):
    vals, idx = payload
    i = check_top_k(x, vals, idx, ratio)
    expected = torch.zeros(x.numel(), dtype=torch.float64)
    expected[i] = x.double()[i]
    return expected, None


def sign_offsets(n, block, segments):
    if block is not None:
        return list(range(0, n, block)) + [n]
    return list(segments) if segments is not None else [0, n]


def ref_sign(v, payload, offsets):
    """sign_blockwise of v: bits (v >= 0), fp32 scale = mean |v| per block; C = ±scale (fp32)."""
    bits, scales = payload
    m = v.numel()
    vd = v.double().numpy()
    assert_bytes(bits, pack_bits(vd >= 0), "sign bits")
    starts = np.asarray(offsets[:-1])
    lengths = np.diff(np.asarray(offsets))
    assert scales.dtype == torch.float32 and scales.shape == (len(lengths),), (
        f"scales {scales.dtype} {scales.shape}"
    )
    want = np.add.reduceat(np.abs(vd), starts) / lengths
    err = np.abs(scales.double().numpy() - want)
    rtol = np.array([stat_rtol(int(b)) for b in lengths])
    assert np.all(err <= rtol * want), (
        f"scales off by up to {np.max(err / np.maximum(want, 1e-300)):.3g} (rel)"
    )
    per_elem = torch.repeat_interleave(scales, torch.as_tensor(lengths, dtype=torch.int64), output_size=m)
    return torch.where(torch.from_numpy(vd >= 0), per_elem, -per_elem).double(), None


def ref_qsgd(v, payload, mk, s, block, scale):
    """qsgd of v: packed signs, L-bit levels (stochastic rounding with the per-rank uniforms), fp32 norms."""
    signs, levels, norms = payload
    m = v.numel()
    L = level_bits(s)
    vd = v.double()
    assert_bytes(signs, pack_bits(vd.numpy() >= 0), "qsgd signs")
    nb = math.ceil(m / block)
    assert norms.dtype == torch.float32 and norms.shape == (nb,), f"norms {norms.dtype} {tuple(norms.shape)}"
    vp = torch.cat([vd, vd.new_zeros(nb * block - m)]).view(nb, block)
    want = vp.pow(2).sum(1).sqrt()
    check(torch.all((norms.double() - want).abs() <= stat_rtol(min(block, m)) * want), "block norms")
    assert levels.dtype == torch.uint8 and levels.numel() == (m * L + 7) // 8, "levels: L bits per element"
    lv = unpack_codes(levels, L, m)
    assert_bytes(levels, pack_codes(lv, L), "qsgd levels (pad bits must be 0)")
    lv = torch.from_numpy(lv).double()
    nrm = norms.double().repeat_interleave(block)[:m]
    r = torch.where(nrm > 0, s * vd.abs() / nrm.clamp(min=1e-300), torch.zeros_like(vd))
    fl = r.floor()
    u = rounding_uniforms(m, ref_seed(mk, per_rank=True)).double()
    decided = (fl + (u < r - fl).double()).clamp(max=s)
    tau = 8 * U32 * r.clamp(min=1)
    # r == 0 (x == 0 or zero padding) is exact in any evaluation order, so never ambiguous
    ambiguous = (((u - (r - fl)).abs() <= tau) | ((r - r.round()).abs() <= tau)) & (r > 0)
    assert int(ambiguous.sum()) <= max(3, m // 1000), "too many boundary cases: uniforms or r are off"
    bad = ~ambiguous & (lv != decided)
    assert not bad.any(), (
        f"{int(bad.sum())} levels differ from stochastic rounding with the per-rank uniforms"
    )
    lo = (r - tau).floor().clamp(min=0)
    hi = ((r + tau).floor() + 1).clamp(max=s)
    check(torch.all((lv >= lo) & (lv <= hi)), "a boundary level is neither floor(r) nor floor(r)+1")
    sgn = torch.where(torch.from_numpy(vd.numpy() >= 0), 1.0, -1.0).double()
    expected = nrm * lv / s * sgn * scale
    return expected, 6 * U32 * expected.abs()


def ref_quantizer(q, v, payload, mk):
    if q["kind"] == "qsgd":
        return ref_qsgd(v, payload, mk, q["s"], q["block"], q.get("scale", 1.0))
    assert q["kind"] == "sign"
    return ref_sign(v, payload, sign_offsets(v.numel(), q["block"], None))


def ref_compose(x, payload, mk, sp, q):
    """Quantize only what the sparsifier kept (top_k: indices travel first; random_block: nothing)."""
    n = x.numel()
    expected = torch.zeros(n, dtype=torch.float64)
    tol = torch.zeros(n, dtype=torch.float64)
    if sp["kind"] == "topk":
        idx, qp = payload[0], payload[1:]
        k = min(n, max(1, math.ceil(sp["ratio"] * n)))
        assert idx.dtype == torch.int32 and idx.shape == (k,)
        i = check_top_k(x, x[idx.long()], idx, sp["ratio"])
        qv, qt = ref_quantizer(q, x[i], qp, mk)
        expected[i], tol[i] = qv, (qt if qt is not None else 0.0)
    else:
        nblocks, blocks = ref_blocks(n, sp["ratio"], sp["block"], mk)
        b = sp["block"]
        values = torch.cat([x, x.new_zeros(nblocks * b - n)]).view(nblocks, b)[blocks].reshape(-1)
        pos = (blocks[:, None] * b + torch.arange(b)).reshape(-1)
        qv, qt = ref_quantizer(q, values, payload, mk)
        inside = pos < n
        expected[pos[inside]] = qv[inside]
        if qt is not None:
            tol[pos[inside]] = qt[inside]
    return expected, (None if q["kind"] == "sign" else tol)


def reference(ref: dict, x: torch.Tensor, mk: MaskKey, segments, payload):
    kind = ref["kind"]
    if kind == "identity":
        return ref_identity(x, payload)
    if kind == "cast":
        return ref_cast(x, payload, ref["wire"])
    if kind == "block":
        return ref_block(x, payload, mk, ref["ratio"], ref["block"], ref["scaled"])
    if kind == "topk":
        return ref_top_k(x, payload, ref["ratio"])
    if kind == "sign":
        return ref_sign(x, payload, sign_offsets(x.numel(), ref["block"], segments))
    if kind == "qsgd":
        return ref_qsgd(x, payload, mk, ref["s"], ref["block"], ref.get("scale", 1.0))
    assert kind == "compose"
    return ref_compose(x, payload, mk, ref["sp"], ref["q"])


def assert_matches(out: torch.Tensor, expected: torch.Tensor, tol, dtype, what="C(x)"):
    """Exact match in the output dtype, or |out - expected| <= tol + one rounding to the output dtype."""
    assert out.dtype == dtype and out.shape == expected.shape, f"{what}: {out.dtype} {tuple(out.shape)}"
    if tol is None:
        want = expected.to(dtype)
        bad = torch.nonzero(out != want).view(-1)
        assert bad.numel() == 0, (
            f"{what}: {bad.numel()} entries differ, first {bad[:5].tolist()}: "
            f"{out[bad[:5]].tolist()} vs {want[bad[:5]].tolist()}"
        )
        return
    fi = torch.finfo(dtype)
    bound = tol + (U[dtype] if dtype != torch.float32 else 0.0) * expected.abs() + fi.tiny * fi.eps
    err = (out.double() - expected).abs()
    bad = torch.nonzero(~(err <= bound)).view(-1)
    assert bad.numel() == 0, (
        f"{what}: {bad.numel()} entries beyond tolerance, first {bad[:5].tolist()}: "
        f"{out[bad[:5]].tolist()} vs {expected[bad[:5]].tolist()}"
    )


# ------------------------------------------------------------------------------------------------
# the cases: registry spec -> independent description of the compressor

TOPK16 = {"kind": "topk", "ratio": 1 / 16}
CASES = {
    "identity": ("identity", {"kind": "identity"}),
    "fp16": ("fp16", {"kind": "cast", "wire": torch.float16}),
    "bf16": ("bf16", {"kind": "cast", "wire": torch.bfloat16}),
    "random_block": (
        "random_block:ratio=1/64,block=256",
        {"kind": "block", "ratio": 1 / 64, "block": 256, "scaled": False},
    ),
    "random_block_b16": (
        "random_block:ratio=1/4,block=16",
        {"kind": "block", "ratio": 1 / 4, "block": 16, "scaled": False},
    ),
    # block 4096: every size has a large zero-padded tail, so the former scale numel/(k*block) (instead of
    # the unbiased nblocks/k) would be far beyond rounding at every size (regression guard)
    "random_block_scaled": (
        "random_block:ratio=1/4,block=4096,scaled=1",
        {"kind": "block", "ratio": 1 / 4, "block": 4096, "scaled": True},
    ),
    "random_k": ("random_k:ratio=1/16", {"kind": "block", "ratio": 1 / 16, "block": 1, "scaled": False}),
    "random_k_scaled": (
        "random_k:ratio=1/16,scaled=1",
        {"kind": "block", "ratio": 1 / 16, "block": 1, "scaled": True},
    ),
    "top_k": ("top_k:ratio=1/100", {"kind": "topk", "ratio": 1 / 100}),
    "top_k_third": ("top_k:ratio=1/3", {"kind": "topk", "ratio": 1 / 3}),
    "sign_block64": ("sign_blockwise:block=64", {"kind": "sign", "block": 64}),
    "sign_whole": ("sign_blockwise", {"kind": "sign", "block": None}),
    "sign_segments": ("sign_blockwise", {"kind": "sign", "block": None, "segments": True}),
    "qsgd_s1": ("qsgd:s=1", {"kind": "qsgd", "s": 1, "block": 512}),
    "qsgd_s3_b128": ("qsgd:s=3,block=128", {"kind": "qsgd", "s": 3, "block": 128}),
    "qsgd_s15": ("qsgd:s=15", {"kind": "qsgd", "s": 15, "block": 512}),
    "qsgd_s255_b64": ("qsgd:s=255,block=64", {"kind": "qsgd", "s": 255, "block": 64}),
    "qsgd_s15_scale": ("qsgd:s=15,scale=1/4", {"kind": "qsgd", "s": 15, "block": 512, "scale": 0.25}),
    "top_k+qsgd": (
        "top_k:ratio=1/16 + qsgd:s=7",
        {"kind": "compose", "sp": TOPK16, "q": {"kind": "qsgd", "s": 7, "block": 512}},
    ),
    "top_k+sign": (
        "top_k:ratio=1/16 + sign_blockwise",
        {"kind": "compose", "sp": TOPK16, "q": {"kind": "sign", "block": None}},
    ),
    "random_block+qsgd": (
        "random_block:ratio=1/8,block=32 + qsgd:s=15,block=64",
        {
            "kind": "compose",
            "sp": {"kind": "block", "ratio": 1 / 8, "block": 32},
            "q": {"kind": "qsgd", "s": 15, "block": 64},
        },
    ),
}
# compress_ef of these is a pure selection: the residual is x with the kept entries zeroed, exactly
SELECTIONS = {"identity", "random_block", "random_block_b16", "random_k", "top_k", "top_k_third"}

def make_segments(n: int) -> list[int]:
    """Offsets of fake parameter tensors covering n elements (sizes 3, 1, 250, 17, 1000, 64, 3, ...)."""
    offs, sizes, j = [0], (3, 1, 250, 17, 1000, 64), 0
    while offs[-1] < n:
        offs.append(min(n, offs[-1] + sizes[j % len(sizes)]))
        j += 1
    return offs


def make_input(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * seed + n)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 3
    x[5::97] = 0.0  # sign(0) = +1, level 0
    x[11::101] = -0.0  # sign(-0.0) = +1 too
    return x.to(dtype)


def segments_for(case: str, n: int):
    return make_segments(n) if CASES[case][1].get("segments") else None


def matrix():
    for case in CASES:
        for n in SIZES:
            for dtype in DTYPES:
                yield pytest.param(case, n, dtype, id=f"{case}-{n}-{str(dtype)[6:]}")


def to_wire(payload) -> tuple[bytes, list]:
    """Serialize a payload as the bytes a collective would move, plus the (dtype, numel) layout."""
    layout, chunks = [], []
    for t in payload:
        assert t.dim() == 1 and t.is_contiguous(), "payload tensors must be flat and contiguous"
        layout.append((t.dtype, t.numel()))
        chunks.append(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return b"".join(chunks), layout


def from_wire(buf: bytes, layout) -> tuple:
    out, off = [], 0
    raw = torch.frombuffer(bytearray(buf), dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
    for dtype, numel in layout:
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        out.append(raw[off : off + nbytes].clone().view(dtype))
        off += nbytes
    assert off == len(buf)
    return tuple(out)


# ------------------------------------------------------------------------------------------------
# wire format, bytes, error feedback


@pytest.mark.parametrize("case,n,dtype", list(matrix()))
def test_wire_format_matches_reference(case, n, dtype):
    """Payload, C(x), bytes and wire_bytes against the references. Regression guard (random_block_scaled,
    random_k_scaled): the scaled variants multiply by the unbiased nblocks/k, a short tail block included
    (the former numel/(k*block) gave e.g. x/16 instead of x for numel=7, block=16)."""
    spec, ref = CASES[case]
    c = get_compressor(spec)
    x = make_input(n, dtype)
    seg = segments_for(case, n)
    x0 = x.clone()
    payload = c.compress(x, MK, seg)
    check(torch.equal(x, x0), "compress must not modify its input")
    expected, tol = reference(ref, x, MK, seg, payload)
    assert_matches(c.decompress(payload, n, dtype, MK, seg), expected, tol, dtype)
    # the same through out= (what the front ends use), a garbage-filled buffer
    out = torch.full((n,), 7.0, dtype=dtype)
    assert c.decompress(payload, n, dtype, MK, seg, out=out) is out
    assert_matches(out, expected, tol, dtype, "decompress(out=)")
    # and through __call__
    assert_matches(c(x, MK, seg), expected, tol, dtype, "C(x) via __call__")
    # the payload as the bytes a collective moves: wire_bytes is their number, and they decode alike
    buf, layout = to_wire(payload)
    assert c.wire_bytes(n, dtype, seg) == len(buf), f"wire_bytes({n}, {dtype}) vs {len(buf)} bytes sent"
    again = c.decompress(from_wire(buf, layout), n, dtype, MK, seg)
    check(torch.equal(again, out), "the byte copy of the payload decodes differently")


@pytest.mark.parametrize("case,n,dtype", list(matrix()))
def test_compress_ef_sends_same_payload_and_leaves_residual(case, n, dtype):
    """compress_ef sends what compress sends and leaves p - C(p) in p. Regression guard (fp16 on float16,
    bf16 on bfloat16 input): when p already has the wire dtype, compress returns p itself, and compress_ef
    must still send p's values (it used to zero p *and* the payload: zeros sent, residual 0)."""
    spec, _ = CASES[case]
    c = get_compressor(spec)
    x = make_input(n, dtype, seed=2)
    seg = segments_for(case, n)
    p = x.clone()
    payload_ef = c.compress_ef(p, MK, seg)
    check(to_wire(payload_ef) == to_wire(c.compress(x, MK, seg)), "compress_ef must send what compress sends")
    cx = c.decompress(payload_ef, n, dtype, MK, seg).double()
    want = x.double() - cx
    if case in SELECTIONS:  # x - C(x) is x or 0, exactly
        check(torch.equal(p, want.to(dtype)), "residual must be x with the kept entries zeroed")
    else:  # one rounding of x - C(x) in the input dtype, from C in fp32 or in the input dtype
        fi = torch.finfo(dtype)
        bound = 2 * U[dtype] * (x.double().abs() + cx.abs()) + fi.tiny * fi.eps
        err = (p.double() - want).abs()
        check(torch.all(err <= bound), f"residual off by {float(err.max()):.3g}")


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][1]["kind"] == "block"] + ["identity", "fp16"])
def test_overwrite_writes_selected_entries_only(case):
    """Linear compressors: overwrite(values, out) puts the payload on the mask and leaves the rest."""
    spec, ref = CASES[case]
    c = get_compressor(spec)
    n = 1023
    (values,) = c.compress(make_input(n, torch.float32), MK)
    values = torch.arange(values.numel(), dtype=values.dtype) + 1  # recognisable payload values
    base = -torch.ones(n)
    out = c.overwrite(values.clone(), base.clone(), MK)
    if ref["kind"] != "block":
        assert torch.equal(out, values.float())
        return
    nblocks, blocks = ref_blocks(n, ref["ratio"], ref["block"], MK)
    b = ref["block"]
    want = torch.cat([base, base.new_zeros(nblocks * b - n)]).view(nblocks, b)
    want[blocks] = values.view(-1, b).float()
    assert torch.equal(out, want.reshape(-1)[:n])


@pytest.mark.parametrize("case", ["top_k", "sign_block64", "qsgd_s15", "top_k+qsgd", "random_block_b16"])
def test_decompress_add_accumulates(case):
    """The allgather path sums alpha * C(x_j) into an fp32 accumulator."""
    spec, _ = CASES[case]
    c = get_compressor(spec)
    n = 1023
    x = make_input(n, torch.float16)
    payload = c.compress(x, MK)
    base = make_input(n, torch.float32, seed=3)
    out = c.decompress_add(payload, base.clone(), 0.25, MK)
    want = base.double() + 0.25 * c.decompress(payload, n, torch.float32, MK).double()
    assert out.dtype == torch.float32
    assert torch.all(
        (out.double() - want).abs() <= 2 * U32 * (base.double().abs() + (want - base.double()).abs())
    )


def test_top_k_ties_go_to_the_lower_index():
    """top_k.py and cser_hooks/kernels/__init__.py document ties broken toward the lower index. Regression guard:
    torch.topk(sorted=False) alone picked [3, 4, 5] here (ties are frequent in bf16/fp16 gradients)."""
    c = get_compressor("top_k:ratio=1/2")
    _, idx = c.compress(torch.tensor([1.0, 3.0, 2.0, 3.0, 3.0, -3.0]), MK)
    assert idx.tolist() == [1, 3, 4]


# ------------------------------------------------------------------------------------------------
# unbiasedness and contraction (docs/algorithms.md §1, "Properties the tests must check")

N_DRAWS = 1000


def draws(c: Compressor, x: torch.Tensor, n_draws: int = N_DRAWS) -> torch.Tensor:
    """C(x) over n_draws mask keys: steps 0..n-1 on ranks 0..3 (fixed seeds: deterministic)."""
    return torch.stack(
        [c(x, MaskKey(seed=9, step=t, key=4, salt="c1", rank=t % 4)).double() for t in range(n_draws)]
    )


UNBIASED_N = 16384
UNBIASED_DRAWS = 400
UNBIASED = [
    pytest.param("qsgd:s=1,block=16", UNBIASED_N, id="qsgd_s1_b16"),
    pytest.param("qsgd:s=3", UNBIASED_N, id="qsgd_s3"),
    pytest.param("qsgd:s=15,block=128", UNBIASED_N + 77, id="qsgd_s15_b128_tail"),
    pytest.param("qsgd:s=255", UNBIASED_N, id="qsgd_s255"),
    pytest.param("random_k:ratio=1/8,scaled=1", UNBIASED_N + 77, id="random_k"),
    pytest.param("random_block:ratio=1/4,block=4,scaled=1", UNBIASED_N, id="random_block_no_tail"),
    # regression guards: a short tail block is scaled by nblocks/k like the others (not numel/(k*block))
    pytest.param("random_block:ratio=1/4,block=256,scaled=1", 7, id="random_block_7"),
    pytest.param("random_block:ratio=1/2,block=256,scaled=1", 257, id="random_block_257"),
]


def ideal_variance(c: Compressor, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-coordinate Var[C(x)_i] of the ideal unbiased compressor, and a bound on Var <C(x), x>."""
    xd = x.double()
    n = xd.numel()
    if c.name == "qsgd":
        s, b = c.s, c.block
        nb = math.ceil(n / b)
        norms = torch.cat([xd, xd.new_zeros(nb * b - n)]).view(nb, b).norm(dim=1).repeat_interleave(b)[:n]
        frac = s * xd.abs() / norms
        frac = frac - frac.floor()
        var = (norms / s) ** 2 * frac * (1 - frac)  # Bernoulli rounding, coordinates independent
        return var, float((var * xd**2).sum())
    nblocks = math.ceil(n / c.block)
    p_sel = min(nblocks, math.ceil(c.ratio * n / c.block)) / nblocks
    var = xd**2 * (1 / p_sel - 1)
    pad = torch.cat([xd, xd.new_zeros(nblocks * c.block - n)]).view(nblocks, c.block)
    # a block is kept or dropped as a whole; blocks drawn without replacement are negatively correlated
    return var, float((1 / p_sel - 1) * (pad.pow(2).sum(1) ** 2).sum())


@pytest.mark.parametrize("spec,n", UNBIASED)
def test_unbiased_mean_converges(spec, n):
    """mean_t C(x) -> x over N = 400 draws. With e = mean - x: E||e||^2 = sum_i Var_i / N, and the projection
    <e, x> has mean 0 and sd <= sqrt(Var<C(x), x> / N), both from the ideal compressor's exact variance.
    Allowed: ||e||^2 <= 3 E||e||^2 (for a sum of >= 4096 independent blocks' squares, 3x the mean is > 30 sd
    away) and |<e, x>| <= 5 sd. A bias b adds <b, x>; the power check asserts that a 2% scale error would be
    >= 10 sd, so it cannot hide below the 5 sd threshold."""
    c = get_compressor(spec)
    assert c.unbiased
    x = make_input(n, torch.float32, seed=4)
    total = torch.zeros(n, dtype=torch.float64)
    for t in range(UNBIASED_DRAWS):
        total += c(x, MaskKey(seed=9, step=t, key=4, salt="c1", rank=t % 4)).double()
    e = total / UNBIASED_DRAWS - x.double()
    var, var_proj = ideal_variance(c, x)
    energy = float(x.double() @ x.double())
    sd = math.sqrt(var_proj / UNBIASED_DRAWS)
    if n > 1000:
        assert 10 * sd <= 0.02 * energy, "test too weak: a 2% scale bias would be < 10 sd"
    expected_sq = float(var.sum()) / UNBIASED_DRAWS
    assert float(e.pow(2).sum()) <= 3 * expected_sq + 1e-12, (
        f"||mean - x||^2 = {float(e.pow(2).sum()):.4g}, expected about {expected_sq:.4g}"
    )
    proj = float(e @ x.double())
    assert abs(proj) <= 5 * sd + 1e-9 * energy, (
        f"<mean - x, x> = {proj:.4g} = {proj / energy:.2%} of ||x||^2, sd {sd:.4g}"
    )


# fp16 is not here: it claims no delta (see test_fp16_claims_no_delta_and_bf16_bound_holds_for_small_gradients)
CONTRACTIVE = [
    "identity",
    "bf16",
    "top_k",
    "top_k_third",
    "sign_block64",
    "sign_whole",
    "sign_segments",
    "top_k+sign",
]


@pytest.mark.parametrize("case,n,dtype", [p for p in matrix() if p.values[0] in CONTRACTIVE])
def test_biased_compressors_contract_with_claimed_delta(case, n, dtype):
    """||x - C(x)||^2 <= (1 - delta) ||x||^2 for every x (deterministic claims). Slack: the rounding of
    the fp32 block statistic and of C(x) to the output dtype, (U + stat_rtol)^2 ||x||^2 (see sign.py's
    identity ||x - C||^2 = ||x||^2 - sum_B |B| s_B^2 + sum_B |B| (fl(s_B) - s_B)^2)."""
    spec, _ = CASES[case]
    c = get_compressor(spec)
    delta = c.delta(n)
    assert delta is not None and 0 <= delta <= 1
    x = make_input(n, dtype, seed=5)
    seg = segments_for(case, n)
    xd = x.double()
    err = float((xd - c(x, MK, seg).double()).pow(2).sum())
    slack = (U[dtype] + stat_rtol(n)) ** 2 + 1e-12
    assert err <= (1 - delta + slack) * float(xd.pow(2).sum()), f"||x-C||^2/||x||^2 = {err / float(xd @ xd)}"


@pytest.mark.parametrize("block", [1, 16, 256])
def test_sign_blockwise_delta_is_attained(block):
    """One spike per block is the worst case of sign_blockwise: ||x - C||^2 = (1 - 1/|B|)||x||^2 exactly,
    so the claimed delta = 1/block is tight (a wrong scale, e.g. max |x|, breaks the bound here)."""
    n = 64 * block
    x = torch.zeros(n)
    x[::block] = torch.linspace(1, 2, 64)
    c = get_compressor(f"sign_blockwise:block={block}")
    ratio = float((x - c(x, MK)).double().pow(2).sum() / x.double().pow(2).sum())
    assert ratio <= 1 - c.delta(n) + 1e-6
    assert ratio >= 1 - c.delta(n) - 1e-6


def test_fp16_claims_no_delta_and_bf16_bound_holds_for_small_gradients():
    """fp32 gradients of ~1e-6 are common. Below fp16's normal range (6.1e-5) the fp16 cast underflows to
    subnormals (x ~ 3e-6: ||x - C(x)||^2/||x||^2 ~ 3e-5, far above its former claim 1 - delta = 2^-22), and
    beyond 65504 it clips, so fp16 has no data-independent delta and must claim none (regression guard).
    bf16 keeps fp32's exponent range: its claimed delta = 1 - 2^-16 must hold for such gradients too."""
    fp16 = get_compressor("fp16")
    for n in (0, 1, 7, 4096, 65539):
        assert fp16.delta(n) is None, f"fp16 claims delta {fp16.delta(n)} for numel={n}"
    x = make_input(4096, torch.float32) * 1e-6
    energy = float(x.double().pow(2).sum())
    ratio16 = float((x - fp16(x, MK)).double().pow(2).sum()) / energy
    assert ratio16 > 2.0**-22, f"fp16 ratio {ratio16:.3g}: the input does not reach fp16's subnormal range"
    c = get_compressor("bf16")
    assert c.delta(x.numel()) == 1 - 2.0**-16
    for scale in (1.0, 1e-6, 1e-30):
        xs = make_input(4096, torch.float32) * scale
        ratio = float((xs - c(xs, MK)).double().pow(2).sum() / xs.double().pow(2).sum())
        assert ratio <= 1 - c.delta(xs.numel()), f"bf16 at scale {scale}: ratio {ratio:.3g} > 2^-16"


IN_EXPECTATION = [
    pytest.param("random_block:ratio=1/4,block=16", 1024, "flat", id="random_block"),
    pytest.param("random_k:ratio=1/8", 1023, "flat", id="random_k"),
    pytest.param("random_block:ratio=1/4,block=16 + sign_blockwise", 1024, "flat", id="random_block+sign"),
    pytest.param("qsgd:s=3,block=128,scale=0.2", 1023, "flat", id="qsgd_scaled_1/(1+beta)"),
    pytest.param("top_k:ratio=1/16 + qsgd:s=7,scale=0.23", 1023, "flat", id="top_k+qsgd_scaled"),
    # regression guard: a short tail block is picked with probability k/nblocks and keeps < block entries,
    # so delta = k/nblocks (the former k*block/numel claimed 0.004 vs 0.5 for energy outside the tail)
    pytest.param("random_block:ratio=1/2,block=256", 257, "head", id="random_block_tail"),
    # regression guard: E||x - cQ(x)||^2 ~ (1 - 2c)||x||^2 for scale c < 1/(1+beta), so delta =
    # c(2 - c(1+beta)) (the former claim 1/(1+beta) for every c <= 1/(1+beta) was far too large)
    pytest.param("qsgd:s=15,block=512,scale=0.01", 1023, "flat", id="qsgd_scale_0.01"),
]


@pytest.mark.parametrize("spec,n,shape", IN_EXPECTATION)
def test_contraction_in_expectation(spec, n, shape):
    """E ||x - C(x)||^2 <= (1 - delta)||x||^2 over masks / rounding. The claims of random_block (without a
    tail) are equalities in expectation, so the sample mean of R_t = ||x - C_t(x)||^2/||x||^2 over N draws
    may exceed 1 - delta by 4 standard errors (one-sided, p < 4e-5), never more."""
    c = get_compressor(spec)
    delta = c.delta(n)
    assert delta is not None, f"{spec} claims no delta"
    x = make_input(n, torch.float32, seed=6)
    if shape == "head":
        x[-(n % 256 or 256) :] = 0  # all energy outside the short tail block
    xd = x.double()
    r = (xd - draws(c, x, 400)).pow(2).sum(1) / xd.pow(2).sum()
    se = float(r.std()) / math.sqrt(r.numel())
    assert float(r.mean()) <= 1 - delta + 4 * se + 1e-12, (
        f"mean ratio {float(r.mean()):.4g} > 1 - delta = {1 - delta:.4g}"
    )


def test_scaled_random_block_without_tail_round_trips():
    """The scaled variant's wire format where no tail block exists (numel a multiple of the block)."""
    ref = {"kind": "block", "ratio": 1 / 4, "block": 16, "scaled": True}
    c = get_compressor("random_block:ratio=1/4,block=16,scaled=1")
    x = make_input(1024, torch.float32)
    payload = c.compress(x, MK)
    expected, tol = reference(ref, x, MK, None, payload)
    assert_matches(c.decompress(payload, 1024, torch.float32, MK), expected, tol, torch.float32)


# ------------------------------------------------------------------------------------------------
# registry

NAME_EXAMPLES = {
    "identity": "identity",
    "zero": "zero",
    "fp16": "fp16",
    "bf16": "bf16",
    "random_block": "random_block:ratio=1/64,block=128",
    "random_k": "random_k:ratio=0.01,scaled=1",
    "top_k": "top_k:ratio=1/100",
    "sign_blockwise": "sign_blockwise:block=32",
    "sign": "sign",
    "qsgd": "qsgd:s=7,block=256,scale=0.5",
}


def test_every_registry_name_parses():
    assert set(REGISTRY) <= set(NAME_EXAMPLES), (
        f"untested registry names: {set(REGISTRY) - set(NAME_EXAMPLES)}"
    )
    for name, spec in NAME_EXAMPLES.items():
        c = get_compressor(spec)
        assert isinstance(c, Compressor)
        assert c.spec().split(":")[0] in (name, "sign_blockwise", "random_block"), (spec, c.spec())


def test_registry_parameters_reach_the_compressor():
    rb = get_compressor("random_block:ratio=1/64,block=128")
    assert (rb.ratio, rb.block, rb.scaled, rb.linear) == (1 / 64, 128, False, True)
    rk = get_compressor("random_k:ratio=0.01,scaled=1")
    assert (rk.block, rk.scaled, rk.unbiased) == (1, True, True)
    q = get_compressor("qsgd:s=7,block=256,scale=0.5")
    assert (q.s, q.block, q.scale, q.unbiased) == (7, 256, 0.5, False)
    assert get_compressor("sign_blockwise:block=32").block == 32 and get_compressor("sign").block is None
    assert get_compressor("top_k:ratio=0.25").ratio == 0.25
    comp = get_compressor(" top_k:ratio=1/16  +  qsgd:s=3 ")
    assert comp.sparsifier.ratio == 1 / 16 and comp.quantizer.s == 3
    obj = get_compressor("fp16")
    assert get_compressor(obj) is obj


@pytest.mark.parametrize(
    "spec",
    sorted(
        {s for s, _ in CASES.values()}
        | set(NAME_EXAMPLES.values())
        | {
            "random_block:ratio=0.3,block=7",
            "qsgd:s=5,block=100,scale=0.123",
            "random_k:ratio=1/3 + sign_blockwise:block=8",
        }
    ),
)
def test_spec_round_trips(spec):
    """spec() rebuilds a compressor with the same spec and the same output (cross-rank agreement uses it)."""
    c = get_compressor(spec)
    c2 = get_compressor(c.spec())
    assert type(c2) is type(c) and c2.spec() == c.spec()
    x = make_input(1023, torch.float32, seed=7)
    assert torch.equal(c(x, MK), c2(x, MK))
