"""The capability flags the algorithms ask (never a compressor's name) state what each compressor does.

Each flag is checked against the compressor's behaviour on data, for every spec below, so a flag
set wrongly on a new compressor fails here: ``projection`` (C keeps some entries exactly and zeroes
the rest, the same entries for any input under one MaskKey; C(C(x)) = C(x)), ``elementwise`` (C(x)_i
= f(x_i), one f for every position), ``sends_nothing`` (empty payload, C(x) = 0),
``quantizer`` (what ``compose`` accepts after a sparsifier), ``nonfinite_in_payload`` (every NaN/Inf of
the input shows in ``nonfinite_witness(payload)``).
"""
from __future__ import annotations

import pytest
import torch

from cser_hooks.compressors import MaskKey, get_compressor

SPECS = ["identity", "zero", "fp16", "bf16", "random_block:ratio=1/8,block=16", "random_k:ratio=1/8",
         "random_block:ratio=1/8,block=16,scaled=1", "top_k:ratio=1/8", "sign_blockwise:block=32", "qsgd:s=7,block=64"]
N = 512
MK = MaskKey(seed=3, step=5, key=1, salt="c1")


def dense(comp, x):
    return comp.decompress(comp.compress(x, MK), x.numel(), x.dtype, MK)


def inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(N, generator=g) * (k + 1) for k in range(3)]


@pytest.mark.parametrize("spec", SPECS)
def test_projection_flag_matches_behaviour(spec):
    comp = get_compressor(spec)
    xs = inputs()
    outs = [dense(comp, x) for x in xs]
    kept = [(o == x) & (x != 0) for o, x in zip(outs, xs)]
    is_projection = (all(bool(((o == x) | (o == 0)).all()) for o, x in zip(outs, xs))
                     and all(torch.equal(kept[0], k) for k in kept)  # the same entries for every input
                     and all(torch.equal(dense(comp, o), o) for o in outs) and bool(kept[0].any()))
    assert comp.projection == is_projection, spec


@pytest.mark.parametrize("spec", SPECS)
def test_elementwise_flag_matches_behaviour(spec):
    """C(x)_i = f(x_i) with one f for every position: permuting x permutes C(x) (a position-dependent
    mask fails), and mixing two inputs mixes their outputs (top-k, block scales fail)."""
    comp = get_compressor(spec)
    x, y, _ = inputs()
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(N, generator=g)
    pick = torch.rand(N, generator=g) < 0.5
    equivariant = torch.equal(dense(comp, x)[perm], dense(comp, x[perm]))
    local = torch.equal(dense(comp, torch.where(pick, x, y)), torch.where(pick, dense(comp, x), dense(comp, y)))
    assert comp.elementwise == (equivariant and local), spec


@pytest.mark.parametrize("spec", SPECS)
def test_sends_nothing_flag_matches_behaviour(spec):
    comp = get_compressor(spec)
    x = inputs()[0]
    empty = comp.wire_bytes(N) == 0 and not bool(dense(comp, x).any())
    assert comp.sends_nothing == empty, spec


@pytest.mark.parametrize("spec", SPECS)
def test_compose_accepts_exactly_the_quantizers(spec):
    comp = get_compressor(spec)
    try:
        get_compressor(f"top_k:ratio=1/8 + {spec}")
        accepted = True
    except TypeError:
        accepted = False
    assert accepted == comp.quantizer, spec
    assert not comp.quantizer or comp.linear is False or comp.elementwise, "a linear quantizer is elementwise"


@pytest.mark.parametrize("spec", SPECS)
def test_nonfinite_in_payload_flag_matches_behaviour(spec):
    """Set exactly where one NaN or Inf anywhere in x (each of 40 positions, on the kernel path's size
    too) always shows in the witness, and a finite x never does; a compressor without it raises."""
    comp = get_compressor(spec)
    x = inputs()[0]
    g = torch.Generator().manual_seed(1)
    shows = []
    for size in (N, 1 << 16):  # top_k's CPU kernel starts at 2^16 elements
        base = torch.randn(size, generator=g)
        for bad in (float("nan"), float("inf"), -float("inf")):
            for i in torch.randint(0, size, (40,), generator=g).tolist():
                y = base.clone()
                y[i] = bad
                payload = comp.compress(y, MK)
                shows.append(comp.nonfinite_in_payload and
                             not bool(torch.isfinite(comp.nonfinite_witness(payload)).all()))
    if comp.nonfinite_in_payload:
        assert all(shows), spec
        assert bool(torch.isfinite(comp.nonfinite_witness(comp.compress(x, MK))).all()), spec
    else:
        with pytest.raises(NotImplementedError, match="does not show every NaN/Inf"):
            comp.nonfinite_witness(comp.compress(x, MK))
        # a random mask or a subset cast misses some of them: the flag must stay False
        if spec.startswith("random"):
            y = x.clone()
            y[~(dense(comp, x) != 0)] = float("nan")   # NaN only where C drops the entry
            assert bool(torch.isfinite(dense(comp, y)).all()), spec

