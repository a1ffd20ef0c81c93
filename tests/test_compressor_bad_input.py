"""Bad input to the compressors and the registry: a clear error naming the fix, or a documented behaviour.

docs/algorithms.md §8 asks for clear errors on bad input. Checked for every compressor of §1 and each entry
point that takes a tensor (``compress``, ``compress_ef``, ``C(x)``):

* not a flat contiguous float tensor (non-contiguous, 2-D, 0-d, integer or bool dtype): ValueError /
  TypeError whose message names the fix (``x.contiguous()``, ``x.view(-1)``, ``x.float()``);
* float64: accepted, as base.check_input documents, and compressed like the same values in fp32;
* empty tensors (Horovod may hand a 0-element tensor; DDP never sends an empty bucket): C(x) is empty,
  the payload decodes, ``wire_bytes`` counts it and carries no NaN, error feedback works;
* NaN / ±Inf: never silently turned into finite numbers in both C(x) and the residual (the algorithms'
  finite check must still see them), with the per-compressor behaviour the docstrings state;
* registry specs that are not valid: ValueError / TypeError naming the compressor and the parameter.

Regression guards for fixed bugs (the tests say which): ``compress_ef`` of identity / zero checks its input;
empty tensors through scaled random_block / random_k and sign_blockwise (with and without a block, alone and
after top_k); registry parameters that are not numbers, or not integers where an integer is needed.
"""

from __future__ import annotations

import pytest
import torch

from cser_hooks.compressors import MaskKey, get_compressor

MK = MaskKey(seed=1, step=2, key=3, salt="c1", rank=0)

SPECS = [
    "identity",
    "zero",
    "fp16",
    "bf16",
    "random_block:ratio=1/4,block=64",
    "random_block:ratio=1/4,block=64,scaled=1",
    "random_k:ratio=1/8",
    "random_k:ratio=1/8,scaled=1",
    "top_k:ratio=1/16",
    "sign_blockwise",
    "sign_blockwise:block=64",
    "qsgd:s=15,block=64",
    "top_k:ratio=1/16 + qsgd:s=7",
    "top_k:ratio=1/16 + sign_blockwise",
    "random_block:ratio=1/4,block=64 + qsgd:s=3",
]
METHODS = ["compress", "compress_ef", "call"]


def run(c, method: str, x: torch.Tensor):
    if method == "compress":
        return c.compress(x, MK)
    if method == "compress_ef":
        return c.compress_ef(x, MK)
    return c(x, MK)


def cases(methods=METHODS):
    for spec in SPECS:
        for m in methods:
            yield pytest.param(spec, m, id=f"{spec}-{m}")


# ------------------------------------------------------------------------------------------------
# shape, layout and dtype
#
# Regression guard (identity-compress_ef, zero-compress_ef): Identity.compress_ef / Zero.compress_ef
# used to skip check_input and accept integer, 2-D and non-contiguous tensors silently (Identity zeroed p).


@pytest.mark.parametrize("spec,method", list(cases()))
def test_non_contiguous_is_refused_with_the_fix(spec, method):
    c = get_compressor(spec)
    x = torch.randn(200)[::2]
    assert x.dim() == 1 and not x.is_contiguous()
    with pytest.raises(ValueError, match=r"contiguous\(\)"):
        run(c, method, x)


@pytest.mark.parametrize("spec,method", list(cases()))
def test_not_flat_is_refused_with_the_fix(spec, method):
    c = get_compressor(spec)
    for x in (torch.randn(10, 10), torch.tensor(1.5)):
        with pytest.raises(ValueError, match=r"view\(-1\)"):
            run(c, method, x)


@pytest.mark.parametrize("spec,method", list(cases()))
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_and_bool_are_refused_with_the_fix(spec, method, dtype):
    c = get_compressor(spec)
    x = (torch.arange(100) % 3).to(dtype)
    with pytest.raises(TypeError, match=r"(?s)dtype.*float\(\)"):
        run(c, method, x)


@pytest.mark.parametrize("spec", SPECS)
def test_float64_is_compressed_like_the_same_values_in_fp32(spec):
    """base.check_input accepts float64; values exact in fp32 must give C(x) of the fp32 tensor (exactly;
    the scaled sparsifiers multiply in the input dtype, so there the fp32 result is one rounding off)."""
    c = get_compressor(spec)
    x32 = torch.randn(1000, generator=torch.Generator().manual_seed(5))
    y64 = c(x32.double(), MK)
    y32 = c(x32, MK).double()
    assert y64.dtype == torch.float64
    if "scaled=1" in spec:
        assert torch.all((y64 - y32).abs() <= 2.0**-24 * y64.abs())
    else:
        assert torch.equal(y64, y32)


# ------------------------------------------------------------------------------------------------
# empty tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("spec", SPECS)
def test_empty_tensor_round_trips(spec, dtype):
    """A 0-element tensor (Horovod can hand one): empty C(x), a decodable payload of wire_bytes(0) bytes
    holding no NaN, and error feedback that leaves the empty tensor alone. Regression guards: scaled
    random_block / random_k (ZeroDivisionError in the scale for k = 0); sign_blockwise:block=64 (float32
    block lengths broke repeat_interleave in decompress); sign_blockwise alone and after top_k (the empty
    block's scale was 0/0 = NaN on the wire; cser_hooks/kernels/__init__.py specifies 0)."""
    c = get_compressor(spec)
    x = torch.zeros(0, dtype=dtype)
    payload = c.compress(x, MK)
    assert sum(t.numel() * t.element_size() for t in payload) == c.wire_bytes(0, dtype)
    assert all(torch.isfinite(t).all() for t in payload if t.is_floating_point()), (
        f"payload of an empty tensor holds non-finite values: {payload}"
    )
    out = c.decompress(payload, 0, dtype, MK)
    assert out.shape == (0,) and out.dtype == dtype
    y = c(x, MK)
    assert y.shape == (0,) and y.dtype == dtype
    p = x.clone()
    c.compress_ef(p, MK)
    assert p.shape == (0,)


# ------------------------------------------------------------------------------------------------
# NaN and Inf

BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("spec", SPECS)
def test_nonfinite_input_is_never_laundered(spec, bad):
    """After compress_ef, a NaN/Inf at position i is still non-finite in C(x)[i] or in the residual p[i]:
    the finite checks of the algorithms (state.nonfinite_flag) cannot be fooled by a compressor."""
    c = get_compressor(spec)
    for i in (0, 300, 1022):  # a position inside and outside the shared masks / top-k picks
        x = torch.randn(1023, generator=torch.Generator().manual_seed(i))
        x[i] = BAD[bad]
        p = x.clone()
        cx = c.decompress(c.compress_ef(p, MK), x.numel(), x.dtype, MK)
        assert not (torch.isfinite(cx[i]) and torch.isfinite(p[i])), (
            f"{bad} at {i} vanished: C(x)[i] = {float(cx[i])}, residual {float(p[i])}"
        )


# What the docstrings say happens to the block holding a non-finite entry (block of 64 entries):
# "entry": only that entry is affected (it passes through, or is dropped by the mask);
# "block": every entry of its block is non-finite (its block statistic is), other blocks are untouched.
LOCALITY = {
    "identity": "entry",
    "bf16": "entry",
    "random_block:ratio=1/4,block=64": "entry",
    "random_k:ratio=1/8": "entry",
    "sign_blockwise:block=64": "block",
    "qsgd:s=15,block=64": "block",
}


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("spec", list(LOCALITY))
def test_nonfinite_input_stays_local(spec, bad):
    c = get_compressor(spec)
    x = torch.randn(1024, generator=torch.Generator().manual_seed(11))
    clean = c(x, MK)
    for i in range(1, 1024, 64):  # one position in each block
        xb = x.clone()
        xb[i] = BAD[bad]
        y = c(xb, MK)
        blk = slice(i - i % 64, i - i % 64 + 64)
        outside = torch.ones(1024, dtype=torch.bool)
        outside[blk if LOCALITY[spec] == "block" else i] = False
        assert torch.equal(y[outside], clean[outside]), (
            f"{bad} at {i} changed C(x) outside its {LOCALITY[spec]}"
        )
        if LOCALITY[spec] == "block":
            assert not torch.isfinite(y[blk]).any(), f"{bad} at {i}: its block should be non-finite"
        elif clean[i] != 0 or spec in ("identity", "bf16"):  # entry i is sent: it arrives non-finite
            assert not torch.isfinite(y[i])


def test_sign_nan_gets_bit_zero():
    """sign.py: 'NaN gets bit 0 (-1)'; sign(0) = sign(-0.0) = +1."""
    c = get_compressor("sign_blockwise:block=8")
    x = torch.tensor([1.0, float("nan"), 0.0, -0.0, -2.0, 3.0, float("-inf"), float("inf")])
    bits, _ = c.compress(x, MK)
    assert bits.tolist() == [0b10101101]


def test_fp16_clips_instead_of_overflowing():
    """cast.py: beyond ±65504 values are clipped (±Inf too), NaN stays NaN."""
    x = torch.tensor(
        [1e5, -7e4, 65504.0, 65519.0, 65520.0, -1e30, float("inf"), float("-inf"), 1.0, float("nan")]
    )
    y = get_compressor("fp16")(x, MK)
    assert y[:8].tolist() == [65504.0, -65504.0, 65504.0, 65504.0, 65504.0, -65504.0, 65504.0, -65504.0]
    assert y[8] == 1.0 and torch.isnan(y[9])


# ------------------------------------------------------------------------------------------------
# registry specs


@pytest.mark.parametrize(
    "spec,error,pattern",
    [
        ("nonsense", ValueError, r"unknown compressor 'nonsense'.*known:.*random_block"),
        ("top_k:0.1", ValueError, r"'0\.1' must be name=value"),
        ("top_k", ValueError, r"top_k.*ratio"),
        ("identity:foo=1", ValueError, r"foo"),
        ("top_k:ratio=2", ValueError, r"top_k: ratio must be in \(0, 1\]"),
        ("random_block:ratio=0", ValueError, r"random_block: ratio must be in \(0, 1\]"),
        ("random_block:ratio=1/4,block=0", ValueError, r"block must be >= 1"),
        ("sign_blockwise:block=0", ValueError, r"block must be >= 1"),
        ("qsgd:s=0", ValueError, r"s \(levels\) must be in \[1, 255\]"),
        ("qsgd:s=256", ValueError, r"s \(levels\) must be in \[1, 255\]"),
        ("qsgd:s=3,block=0", ValueError, r"block must be >= 1"),
        ("top_k:ratio=0.1 + qsgd:s=3 + fp16", ValueError, r"exactly two parts"),
        ("qsgd:s=3 + top_k:ratio=0.1", TypeError, r"sparsifier must be"),
        ("top_k:ratio=0.1 + top_k:ratio=0.1", TypeError, r"quantizer must be"),
    ],
)
def test_bad_spec_gives_a_clear_error(spec, error, pattern):
    with pytest.raises(error, match=pattern):
        get_compressor(spec)


def test_non_string_spec_is_refused():
    with pytest.raises(TypeError, match="string spec or a Compressor"):
        get_compressor(0.1)


@pytest.mark.parametrize(
    "spec,param",
    [
        pytest.param("top_k:ratio=abc", "ratio", id="ratio=abc"),
        pytest.param("top_k:ratio=", "ratio", id="ratio=empty"),
        pytest.param("top_k:ratio=1/0", "ratio", id="ratio=1/0"),
        pytest.param("random_block:ratio=1/64,block=1.5", "block", id="block=1.5"),
        pytest.param("qsgd:s=2.5", "s", id="s=2.5"),
    ],
)
def test_bad_parameter_value_names_the_compressor_and_parameter(spec, param):
    """Regression guards: a parameter that is not a number used to raise Fraction's own error (or
    ZeroDivisionError) naming neither compressor nor parameter; int(block) / int(s) truncated 1.5 / 2.5
    silently. Both must be a ValueError naming the compressor and the parameter."""
    name = spec.split(":")[0]
    with pytest.raises(ValueError, match=rf"(?s){name}.*\b{param}\b"):
        get_compressor(spec)
