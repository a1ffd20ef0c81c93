"""dist-EF-SGDM DDP hook on real gloo ranks vs the single-process reference (docs/algorithms.md §6).

One spawn per world size (W = 2, 4) trains every configuration of :data:`CONFIGS` for 30 steps
(plain and Nesterov momentum, per-tensor and fixed blocks, weight decay, an lr change, many small
buckets) and a model with one 1 048 576-element bucket for the wire-size bound. The reference in
``tests/reference/dist_ef_sgdm.py`` shares no code with the package. The DDP training driver, shared
with ``test_qsparse.py`` and ``test_qprsgd.py``, is ``driver_ddp_suites.train_configs``.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import ddp_workload as W
from driver_ddp_suites import lr_at, max_diff, per_step_bytes, register_suite, run_suite
from reference.dist_ef_sgdm import chunks_and_blocks, simulate_dist_ef_sgdm
from reference.runner import layouts_from_record

TOL = 1e-5
STEPS = W.STEPS
pytestmark = [pytest.mark.timeout(1500), pytest.mark.usefixtures("one_thread")]


# ---------------------------------------------------------------------------------------------------
# configurations

def _cfg(name, **kw):
    opt = {"momentum": 0.0, "weight_decay": kw.pop("weight_decay", 0.0)}
    state_kw = {"momentum": kw.pop("mu", 0.9), "nesterov": kw.pop("nesterov", False),
                "compressor": kw.pop("compressor", "sign_blockwise"), "warmup_steps": kw.pop("warmup_steps", 1)}
    return dict(name=name, state="DistEFSGDMState", hook="dist_ef_sgdm_hook", opt=opt, kw=state_kw, **kw)


CONFIGS = [
    _cfg("mom"),
    _cfg("nesterov", nesterov=True),
    _cfg("block64_wd", compressor="sign_blockwise:block=64", weight_decay=1e-2),
    _cfg("lr_change", lr_steps={10: 0.05, 20: 0.02}, warmup_steps=2),
    _cfg("buckets", bucket_cap_mb=W.TINY_BUCKETS),
    _cfg("big", model="big", steps=3, record=False),
]
CONFIG = {c["name"]: c for c in CONFIGS}
register_suite("dist_ef_sgdm", lambda ws: CONFIGS)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"W{w}")
def world(request):
    ws = request.param
    return ws, {name: ranks for name, (_, ranks) in run_suite("dist_ef_sgdm", ws, STEPS).items()}


def reference_for(cfg, ranks, world_size, rescale_errors=True, from_warmup=True, **override):
    """The reference's final parameters. ``from_warmup``: start from the real run's model after the
    warm-up steps (plain allreduce; gloo's 4-rank ring sums in an order no reference mirrors)."""
    cfg = {**cfg, "kw": {**cfg["kw"], **override.pop("kw", {})}, **override}
    init = W.init_params()
    shapes = {n: t.shape for n, t in init.items()}
    layouts = layouts_from_record(ranks[0]["layouts"], shapes, STEPS)
    warm = cfg["kw"]["warmup_steps"]
    start = warm if from_warmup else 0
    if from_warmup:
        init = ranks[0]["after_step"][warm - 1]
    comp = cfg["kw"]["compressor"]
    block = int(comp.split("block=")[1]) if "block=" in comp else None
    return simulate_dist_ef_sgdm(init, W.GradOracle(), world_size, STEPS, layouts, lambda s: lr_at(cfg, s),
                                 cfg["kw"]["momentum"], cfg["kw"]["nesterov"], block,
                                 cfg["opt"]["weight_decay"], warm, rescale_errors, start=start)


MLP = [c["name"] for c in CONFIGS if c.get("model") != "big"]


@pytest.mark.parametrize("name", MLP)
def test_matches_reference(world, name):
    world_size, runs = world
    cfg, ranks = CONFIG[name], runs[name]
    if cfg.get("bucket_cap_mb") is not None:
        assert len(ranks[0]["layouts"][STEPS - 1]) > 1
    for from_warmup in ([True, False] if world_size == 2 else [True]):
        ref = reference_for(cfg, ranks, world_size, from_warmup=from_warmup)
        diffs = [max_diff(ranks[i]["final"], ref[i]) for i in range(world_size)]
        assert max(diffs) <= TOL, f"{name}, W={world_size}, {from_warmup=}: max |hook - reference| = {diffs}"
    moved = max_diff(ranks[0]["final"], ranks[0]["init"])
    assert moved > 100 * TOL
    # one update everywhere: replicas identical at every step
    for s in range(STEPS):
        for r in ranks[1:]:
            assert max_diff(r["after_step"][s], ranks[0]["after_step"][s]) == 0.0


WRONG = [("mom", dict(kw={"momentum": 0.8})), ("mom", dict(kw={"nesterov": True})),
         ("block64_wd", dict(opt={"momentum": 0.0, "weight_decay": 0.0})),
         ("lr_change", dict(rescale_errors=False))]


@pytest.mark.parametrize("name,override", WRONG, ids=[f"{n}-{i}" for i, (n, _) in enumerate(WRONG)])
def test_wrong_reference_is_detected(world, name, override):
    world_size, runs = world
    ranks = runs[name]
    ref = reference_for(CONFIG[name], ranks, world_size, **override)
    diff = max(max_diff(ranks[i]["final"], ref[i]) for i in range(world_size))
    assert diff > 100 * TOL, f"{name} with {override}: the reference should differ, max diff {diff}"


def formula_bytes(sizes: list, world_size: int, block) -> int:
    """Σ_r (⌈len_r/8⌉ + 4·blocks_r) to all_to_all + 4 + max_r(...) to allgather (module docstring)."""
    per = [(hi - lo + 7) // 8 + 4 * (len(cuts) - 1) if hi > lo else 0
           for lo, hi, cuts in chunks_and_blocks(sizes, world_size, block)]
    return sum(per) + 4 + max(per)


@pytest.mark.parametrize("name", MLP)
def test_wire_bytes_equal_formula(world, name):
    world_size, runs = world
    cfg, r = CONFIG[name], runs[name][0]
    shapes = {n: t.shape for n, t in r["init"].items()}
    comp = cfg["kw"]["compressor"]
    block = int(comp.split("block=")[1]) if "block=" in comp else None
    dense = sum(t.numel() for t in shapes.values()) * 4
    got = per_step_bytes(r)
    for s in range(STEPS):
        if s < cfg["kw"]["warmup_steps"]:
            assert got[s] == dense
        else:
            want = sum(formula_bytes([shapes[n].numel() for n in names], world_size, block)
                       for names in r["layouts"][s])
            assert got[s] == want, f"step {s}: {got[s]} bytes sent, formula {want}"
            if block is None:  # fixed 64-element blocks add 4/64 byte per element of scales
                assert got[s] < dense / 16


def test_one_million_element_bucket_sends_at_most_a_sixteenth(world):
    world_size, runs = world
    r = runs["big"][0]
    numel = 1024 * 1024
    assert r["layouts"][2] == [["weight"]]
    got = per_step_bytes(r)[1:]
    want = formula_bytes([numel], world_size, None)
    assert got == [want, want]
    ratio = want / (4 * numel)
    assert ratio <= 1 / 16, ratio
    assert math.isclose(ratio, (1 + 1 / world_size) / 32, rel_tol=1e-3)
    assert r["stats"]["dense_bytes_last_step"] == 4 * numel


def test_optimizer_with_momentum_is_rejected():
    from cser_hooks.algorithms.dist_ef_sgdm import DistEFSGDM, check_plain_sgd

    p = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="momentum=0"):
        check_plain_sgd(torch.optim.SGD(p, lr=0.1, momentum=0.9))
    with pytest.raises(ValueError, match="betas"):
        check_plain_sgd(torch.optim.Adam(p))
    check_plain_sgd(torch.optim.SGD(p, lr=0.1, weight_decay=1e-4))
    with pytest.raises(ValueError, match="sign_blockwise"):
        DistEFSGDM(None, "top_k:ratio=0.1")
    with pytest.raises(ValueError, match="has momentum of its own"):  # the state checks what it is given
        DistEFSGDM(None, optimizer=torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True))
