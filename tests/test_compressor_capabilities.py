"""The capability flags the algorithms ask (never a compressor's name) state what each compressor does.

Each flag is checked against the compressor's behaviour on data, for every spec below, so a flag
set wrongly on a new compressor fails here: ``projection`` (C keeps some entries exactly and zeroes
the rest, the same entries for any input under one MaskKey; C(C(x)) = C(x)), ``elementwise`` (C(x)_i
= f(x_i), one f for every position), ``sends_nothing`` (empty payload, C(x) = 0),
``quantizer`` (what ``compose`` accepts after a sparsifier).
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
