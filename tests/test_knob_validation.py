"""Integer knobs reject non-integers; compressor option errors name the compressor and its options.

Before: ``CSERState(period=2.5)`` silently reset every 2 steps (``int(2.5)``), and an unknown
compressor option leaked ``<lambda>() got an unexpected keyword argument``. The states are built on
a stand-in communicator (world size 2, no process group): only their constructors run.
"""
from __future__ import annotations

import numpy as np
import pytest

from cser_hooks.algorithms.compskip import CompSkip
from cser_hooks.algorithms.cser import CSER
from cser_hooks.algorithms.qprsgd import QPRSGD
from cser_hooks.algorithms.qsparse import QsparseLocalSGD
from cser_hooks.compressors import get_compressor
from cser_hooks.knobs import integer_knob


class TwoRanks:
    world_size, rank = 2, 0


BAD_INTEGERS = [2.5, "4", True, 0.999]


@pytest.mark.parametrize("make,name", [
    (lambda v: CSER(TwoRanks(), period=v), "period"),
    (lambda v: QPRSGD(TwoRanks(), period=v), "period"),
    (lambda v: QsparseLocalSGD(TwoRanks(), period=v), "period"),
    (lambda v: QsparseLocalSGD(TwoRanks(), period=[4, v]), "period"),
    (lambda v: CompSkip(TwoRanks(), send_every=v), "send_every"),
    (lambda v: CompSkip(TwoRanks(), adaptive=0.5, max_skips=v), "max_skips"),
    (lambda v: CompSkip(TwoRanks(), send_steps=[1, v]), "send_steps"),
    (lambda v: CSER(TwoRanks(), warmup_steps=v), "warmup_steps"),
    (lambda v: CSER(TwoRanks(), seed=v), "seed"),
])
@pytest.mark.parametrize("value", BAD_INTEGERS, ids=repr)
def test_non_integer_knob_is_a_clear_error(make, name, value):
    with pytest.raises(ValueError, match=rf"{name}.* must be an integer.*got {value!r}".replace("(", r"\(")):
        make(value)


@pytest.mark.parametrize("make", [
    lambda v: CSER(TwoRanks(), period=v), lambda v: QPRSGD(TwoRanks(), period=v),
    lambda v: QsparseLocalSGD(TwoRanks(), period=v), lambda v: CompSkip(TwoRanks(), send_every=v),
])
def test_below_range_is_a_clear_error(make):
    with pytest.raises(ValueError, match=r"must be an integer >= 1, got 0"):
        make(0)


def test_integral_values_are_accepted_as_ints():
    assert CSER(TwoRanks(), period=np.int64(8)).period == 8
    assert CSER(TwoRanks(), period=4.0).period == 4
    assert QsparseLocalSGD(TwoRanks(), period=[2, 3.0]).period == [2, 3]
    assert integer_knob("x", "k", -3) == -3
    with pytest.raises(ValueError, match=r"x: k must be an integer >= -1, got -2"):
        integer_knob("x", "k", -2, -1)


@pytest.mark.parametrize("spec,pattern", [
    ("random_block:ratio=1/8,blok=16", r"'random_block:ratio=1/8,blok=16': unknown option blok; "
                                       r"random_block takes ratio=, block=, scaled="),
    ("top_k:ratio=1/8,block=3,foo=1", r"unknown options block, foo; top_k takes ratio="),
    ("identity:x=1", r"unknown option x; identity takes no options"),
    ("random_block", r"'random_block': needs ratio=\.\.\.; random_block takes ratio=, block=, scaled= "
                     r"\(e\.g\. 'random_block:ratio=1/64'\)"),
])
def test_compressor_option_errors_name_compressor_and_valid_options(spec, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        get_compressor(spec)
    assert "lambda" not in str(info.value)
