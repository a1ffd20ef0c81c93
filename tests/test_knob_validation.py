"""Integer knobs reject non-integers; compressor option errors name the compressor and its options.

Before: ``CSERState(period=2.5)`` silently reset every 2 steps (``int(2.5)``), and an unknown
compressor option leaked ``<lambda>() got an unexpected keyword argument``. The states are built on
a stand-in communicator (world size 2, no process group): only their constructors run.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cser_hooks.algorithms.compskip import CompSkip
from cser_hooks.algorithms.cser import CSER
from cser_hooks.algorithms.dist_ef_sgdm import DistEFSGDM
from cser_hooks.algorithms.ef import ErrorFeedback
from cser_hooks.algorithms.qprsgd import QPRSGD
from cser_hooks.algorithms.qsparse import QsparseLocalSGD
from cser_hooks.compressors import QSGD, RandomBlock, get_compressor
from cser_hooks.knobs import integer_knob
from cser_hooks.progress import ProgressWatch


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


# ------------------------------------------------------------------------------------------------
# every row of the README's "Knobs and their valid values" table: a bad value, the exception it gets
# and a pattern the message must contain (by default the knob's name). The table and these cases are
# compared by test_readme_knob_table_and_cases_agree, so neither can drift from the other.

ALL_STATES = [ErrorFeedback, CSER, CompSkip, DistEFSGDM, QsparseLocalSGD, QPRSGD]

def _case(who, knob, make, error=ValueError, match=None, marks=()):
    return who, knob, make, error, re.escape(knob) if match is None else match, marks


def _spec(spec):
    return lambda: get_compressor(spec)


KNOB_CASES: list = [
    _case("all states", "check_finite", lambda: ErrorFeedback(TwoRanks(), check_finite="no")),
    _case("all states", "on_nonfinite", lambda: ErrorFeedback(TwoRanks(), on_nonfinite="ignore")),
    _case("all states", "on_world_size_change", lambda: ErrorFeedback(TwoRanks(), on_world_size_change="keep")),
    _case("all states", "min_compress_numel", lambda: ErrorFeedback(TwoRanks(), min_compress_numel=-1)),
    _case("all states", "log_gain", lambda: ErrorFeedback(TwoRanks(), log_gain={"link": "1gbit"})),
    _case("all states", "optimizer", lambda: ErrorFeedback(TwoRanks(), optimizer="sgd"), (TypeError, ValueError)),
    _case("all states", "named_parameters", lambda: ErrorFeedback(TwoRanks(), named_parameters=[torch.zeros(2)]),
          (TypeError, ValueError)),
]
for _cls in ALL_STATES:
    KNOB_CASES += [_case("all states", "seed", lambda c=_cls: c(TwoRanks(), seed=2.5)),
                   _case("all states", "warmup_steps", lambda c=_cls: c(TwoRanks(), warmup_steps=-1))]
for _bad in (0, -1.0, "10", True):
    KNOB_CASES.append(_case("all DDP states", "progress_timeout", lambda v=_bad: ProgressWatch(v, 0)))
for _bad in ("no", None, 2):
    KNOB_CASES.append(_case("EFState", "error_feedback", lambda v=_bad: ErrorFeedback(TwoRanks(), error_feedback=v)))
for _bad in ("fp16", torch.bfloat16, None):
    KNOB_CASES.append(_case("EFState", "residual_dtype", lambda v=_bad: ErrorFeedback(TwoRanks(), residual_dtype=v)))
for _bad in (1.0, -0.1, "0.9", None, float("nan")):
    KNOB_CASES += [_case("CSERState", "momentum", lambda v=_bad: CSER(TwoRanks(), momentum=v)),
                   _case("DistEFSGDMState", "momentum", lambda v=_bad: DistEFSGDM(TwoRanks(), momentum=v))]
for _bad in ("yes", "no", None):
    KNOB_CASES += [_case("CSERState", "nesterov", lambda v=_bad: CSER(TwoRanks(), momentum=0.9, nesterov=v)),
                   _case("DistEFSGDMState", "nesterov", lambda v=_bad: DistEFSGDM(TwoRanks(), nesterov=v))]
for _bad in (-1, float("nan"), float("inf"), "0.5", True):
    KNOB_CASES.append(_case("CompSkipState", "adaptive", lambda v=_bad: CompSkip(TwoRanks(), adaptive=v)))
for _bad in (0, 1.5, "0.5", True):
    KNOB_CASES.append(_case("QPRSGDState", "gamma", lambda v=_bad: QPRSGD(TwoRanks(), gamma=v)))
KNOB_CASES += [
    _case("EFState", "compressor", lambda: ErrorFeedback(TwoRanks(), "top_kk:ratio=1/4")),
    _case("EFState", "compressor", lambda: ErrorFeedback(TwoRanks(), 5), TypeError),
    _case("CSERState", "c1", lambda: CSER(TwoRanks(), c1="top_k")),
    _case("CSERState", "c1", lambda: CSER(TwoRanks(), c1=5), TypeError),
    _case("CSERState", "c1", lambda: CSER(TwoRanks(), c1="random_block:ratio=1/4,scaled=1")),
    _case("CSERState", "c2", lambda: CSER(TwoRanks(), c2="top_k:ratio=1/4")),
    _case("CSERState", "c2", lambda: CSER(TwoRanks(), c2="fp16")),
    _case("CSERState", "c2", lambda: CSER(TwoRanks(), c2="random_k:ratio=1/4,blok=2")),
    _case("CSERState", "period", lambda: CSER(TwoRanks(), period=2.5)),
    _case("CSERState", "period", lambda: CSER(TwoRanks(), period=0)),
    _case("CSERState", "reset_schedule", lambda: CSER(TwoRanks(), reset_schedule="staggered")),
    _case("CSERState", "nesterov", lambda: CSER(TwoRanks(), nesterov=True)),
    _case("CompSkipState", "compressor", lambda: CompSkip(TwoRanks(), "random_blok:ratio=1/4")),
    _case("CompSkipState", "send_every", lambda: CompSkip(TwoRanks(), send_every=0)),
    _case("CompSkipState", "send_every", lambda: CompSkip(TwoRanks(), send_every=2.5)),
    _case("CompSkipState", "send_every", lambda: CompSkip(TwoRanks(), send_every=2, adaptive=1.0)),
    _case("CompSkipState", "send_steps", lambda: CompSkip(TwoRanks(), send_steps=[])),
    _case("CompSkipState", "send_steps", lambda: CompSkip(TwoRanks(), send_steps=5)),
    _case("CompSkipState", "send_steps", lambda: CompSkip(TwoRanks(), send_steps="12")),
    _case("CompSkipState", "send_steps", lambda: CompSkip(TwoRanks(), send_steps=[1, -1])),
    _case("CompSkipState", "max_skips", lambda: CompSkip(TwoRanks(), adaptive=0.5, max_skips=0)),
    _case("DistEFSGDMState", "compressor", lambda: DistEFSGDM(TwoRanks(), "top_k:ratio=1/4")),
    _case("DistEFSGDMState", "compressor", lambda: DistEFSGDM(TwoRanks(), "sign_blockwise:block=0")),
    _case("DistEFSGDMState", "nesterov", lambda: DistEFSGDM(TwoRanks(), momentum=0.0)),
    _case("QsparseLocalSGDState", "compressor", lambda: QsparseLocalSGD(TwoRanks(), "top_k:ratio=1/64 + qsgd:s=300")),
    _case("QsparseLocalSGDState", "period", lambda: QsparseLocalSGD(TwoRanks(), period=0)),
    _case("QsparseLocalSGDState", "period", lambda: QsparseLocalSGD(TwoRanks(), period=[4, 4, 4])),
    _case("QsparseLocalSGDState", "sync_steps", lambda: QsparseLocalSGD(TwoRanks(), sync_steps=5)),
    _case("QsparseLocalSGDState", "sync_steps", lambda: QsparseLocalSGD(TwoRanks(), sync_steps=[[1]])),
    _case("QsparseLocalSGDState", "sync_steps", lambda: QsparseLocalSGD(TwoRanks(), sync_steps=[[1], 2])),
    _case("QsparseLocalSGDState", "sync_steps", lambda: QsparseLocalSGD(TwoRanks(), sync_steps=[1, -2])),
    _case("QPRSGDState", "compressor", lambda: QPRSGD(TwoRanks(), "qsgd:s=15,blok=64")),
    _case("QPRSGDState", "period", lambda: QPRSGD(TwoRanks(), period=0)),
    _case("QPRSGDState", "period", lambda: QPRSGD(TwoRanks(), period="4")),
    _case("QPRSGDState", "mode", lambda: QPRSGD(TwoRanks(), mode="ring")),
    _case("compressor string", "name", _spec("top_kk:ratio=1/4"), match=r"unknown compressor 'top_kk'; known: .*top_k"),
    _case("compressor string", "name", lambda: get_compressor(0.1), TypeError, match="compressor"),
    _case("compressor string", "options", _spec("identity:x=1"), match=r"unknown option x; identity takes no options"),
    _case("compressor string", "options", _spec("random_block:ratio=1/4,ratio=1/2"),
          match=r"option ratio is given twice; random_block takes ratio=, block=, scaled="),
    _case("compressor string", "options", _spec("top_k:ratio=abc"), match=r"option ratio='abc' is not a number"),
    _case("compressor string", "options", _spec("top_k:0.1"), match=r"option '0\.1' must be name=value; top_k takes"),
    _case("compressor string", "options", _spec("random_block:=3,ratio=1/4"), match=r"option '=3' must be name=value"),
    _case("compressor string", "options", _spec("qsgd:s=3,block=64,ratio=1"),
          match=r"unknown option ratio; qsgd takes s=, block=, scale="),
    _case("compressor string", "options", _spec("top_k"), match=r"needs ratio=\.\.\.; top_k takes ratio="),
    _case("random_block", "ratio", _spec("random_block:ratio=2")),
    _case("random_block", "ratio", _spec("random_block:ratio=0")),
    _case("random_block", "ratio", _spec("random_block:ratio=-1/4")),
    _case("random_block", "ratio", lambda: RandomBlock("1/64")),
    _case("random_block", "block", _spec("random_block:ratio=1/4,block=0")),
    _case("random_block", "block", _spec("random_block:ratio=1/4,block=2.5")),
    _case("random_block", "block", lambda: RandomBlock(0.25, block=2.5)),
    _case("random_block", "scaled", _spec("random_block:ratio=1/4,scaled=2")),
    _case("random_block", "scaled", _spec("random_block:ratio=1/4,scaled=0.5")),
    _case("random_block", "scaled", lambda: RandomBlock(0.25, scaled="no")),
    _case("random_k", "ratio", _spec("random_k:ratio=1.5"), match=r"random_k: ratio"),
    _case("random_k", "scaled", _spec("random_k:ratio=1/4,scaled=3"), match=r"random_k: scaled"),
    _case("top_k", "ratio", _spec("top_k:ratio=0")),
    _case("top_k", "ratio", _spec("top_k:ratio=1.5")),
    _case("sign_blockwise", "block", _spec("sign_blockwise:block=0")),
    _case("sign_blockwise", "block", _spec("sign_blockwise:block=2.5")),
    _case("sign_blockwise", "block", _spec("sign:block=-1")),
    _case("qsgd", "s", _spec("qsgd:s=0"), match=r"qsgd: s \(levels\)"),
    _case("qsgd", "s", _spec("qsgd:s=256"), match=r"qsgd: s \(levels\)"),
    _case("qsgd", "s", _spec("qsgd:s=2.5"), match=r"qsgd: s \(levels\) must be an integer in \[1, 255\], got 2\.5"),
    _case("qsgd", "s", lambda: QSGD(s=2.5), match=r"qsgd: s \(levels\)"),
    _case("qsgd", "block", _spec("qsgd:block=0")),
    _case("qsgd", "block", _spec("qsgd:block=1.5")),
    _case("qsgd", "scale", _spec("qsgd:scale=0")),
    _case("qsgd", "scale", _spec("qsgd:scale=-1")),
    _case("compose", "sparsifier", _spec("qsgd:s=3 + top_k:ratio=0.1"), TypeError),
    _case("compose", "sparsifier", _spec("top_k:ratio=0.1 + qsgd:s=3 + fp16"), match=r"exactly two parts"),
    _case("compose", "quantizer", _spec("top_k:ratio=0.1 + top_k:ratio=0.1"), TypeError),
    _case("compose", "quantizer", _spec("top_k:ratio=1/4 + zero"), TypeError),
]


@pytest.mark.parametrize("who,knob,make,error,match", [
    pytest.param(*case[:5], marks=case[5], id=f"{case[0]}|{case[1]}|{i}") for i, case in enumerate(KNOB_CASES)])
def test_every_knob_in_the_readme_table_rejects_a_bad_value(who, knob, make, error, match):
    with pytest.raises(error) as info:
        make()
    assert re.search(match, str(info.value)), f"{who} {knob}: the message does not name the knob: {info.value}"
    assert "lambda" not in str(info.value) and "could not convert" not in str(info.value)


def _readme_knob_rows() -> set:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("\n## Knobs and their valid values\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]  # minus header and |---|
    cells = [[c.strip().replace("`", "") for c in row.strip("|").split("|")] for row in rows]
    assert cells and all(len(c) == 5 for c in cells), "the knob table has 5 columns"
    return [(c[0], c[1]) for c in cells]


def test_readme_knob_table_and_cases_agree():
    rows = _readme_knob_rows()
    assert len(rows) == len(set(rows)), "a (state or compressor, knob) row appears twice in the README table"
    cases = {(who, knob) for who, knob, *_ in KNOB_CASES}
    assert not set(rows) - cases, f"README rows without a test case: {sorted(set(rows) - cases)}"
    assert not cases - set(rows), f"test cases without a README row: {sorted(cases - set(rows))}"


@pytest.mark.parametrize("make", [lambda: DistEFSGDM(TwoRanks(), min_compress_numel=64),
                                  lambda: CSER(TwoRanks(), momentum=0.9, min_compress_numel=64),
                                  lambda: QsparseLocalSGD(TwoRanks(), min_compress_numel=64),
                                  lambda: QPRSGD(TwoRanks(), min_compress_numel=64)])
def test_min_compress_numel_refused_where_a_dense_key_would_skip_the_algorithm(make):
    with pytest.raises(ValueError, match="min_compress_numel needs an algorithm that averages gradients"):
        make()


def test_valid_edge_values_are_still_accepted():
    assert ErrorFeedback(TwoRanks(), min_compress_numel=4096).config()["min_compress_numel"] == 4096
    assert "min_compress_numel" not in ErrorFeedback(TwoRanks()).config()  # old checkpoints keep loading
    assert ErrorFeedback(TwoRanks(), error_feedback=0).error_feedback is False
    assert CSER(TwoRanks(), momentum=np.float64(0.9), nesterov=np.bool_(True)).nesterov is True
    assert CSER(TwoRanks(), momentum=0, nesterov=0).momentum == 0.0
    assert DistEFSGDM(TwoRanks(), momentum=0.0, nesterov=False).nesterov is False
    assert CompSkip(TwoRanks(), adaptive=0).adaptive == 0.0
    assert CompSkip(TwoRanks(), send_steps=(s for s in (3, 1))).send_steps == {1, 3}  # a generator, read once
    assert QPRSGD(TwoRanks(), gamma=1).gamma == 1.0
    assert QsparseLocalSGD(TwoRanks(), sync_steps=[1, 3]).sync_steps == [{1, 3}, {1, 3}]
    assert get_compressor("random_block:ratio=1/4,block=64.0,scaled=1").spec() == \
        "random_block:ratio=0.25,block=64,scaled=1"
    assert get_compressor("random_k:ratio=1,scaled=0").spec() == "random_block:ratio=1.0,block=1"
    assert get_compressor("qsgd:s=255,block=1,scale=2").spec() == "qsgd:s=255,block=1,scale=2.0"
    assert get_compressor("sign:block=8").spec() == "sign_blockwise:block=8"
    assert get_compressor("top_k:ratio=1/64 + identity").spec() == "top_k:ratio=0.015625 + identity"
