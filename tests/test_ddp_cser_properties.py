"""Properties of the CSER DDP hook on real gloo ranks, and of the CSER reference itself (docs/algorithms.md §3).

Issue "DDP front end", point 2: after every full reset (C2 = identity) the parameters are bitwise
identical on all ranks. With the optimizer given to the state the reset runs right after
``optimizer.step()``; without it the next step's hook runs it, so the replicas are identical after
that step's backward (before its optimizer step), and not yet after the step that triggered it.
Partial resets make the C2-selected blocks identical. Between resets the replicas differ, which is
what gives these checks their teeth. The last tests check the reference's own invariants
(x_i + e_i = x̂ on every rank, C1 = identity is synchronous SGD, paper form == averaging form).
"""
from __future__ import annotations

import pytest
import torch

import ddp_workload as W
from reference import Layout, World, simulate_cser_hookform, simulate_cser_paper, simulate_ef
from reference.masks import random_block_mask

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"W{w}")
def world(request):
    return request.param, W.run_all(request.param)


def reset_steps(cfg: dict) -> list:
    warm = cfg.get("warmup_steps", 1)
    return [s for s in range(W.STEPS) if s >= warm and (s + 1) % cfg["period"] == 0]


def spread(snapshots: list) -> float:
    """max over parameters of |x_i − x_0| across ranks."""
    return max((s[n] - snapshots[0][n]).abs().max().item() for s in snapshots[1:] for n in s)


def bitwise_equal(snapshots: list) -> bool:
    return all(torch.equal(s[n], snapshots[0][n]) for s in snapshots[1:] for n in s)


def after_reset(ranks: list, cfg: dict, s: int) -> list:
    """Every rank's parameters right after the reset of step s took effect."""
    if cfg.get("give_optimizer", True):
        return [r["after_step"][s] for r in ranks]
    return [r["after_backward"][s + 1] for r in ranks]


BURST = [c for c in W.CONFIGS if c["algo"] == "cser" and c.get("reset_schedule", "burst") == "burst"]
FULL = [c["name"] for c in BURST if c["c2"] == "identity"]
PARTIAL = [c["name"] for c in BURST if c["c2"].startswith("random_block") and c["c1"] != "identity"]
SPREAD = [c["name"] for c in W.CONFIGS if c.get("reset_schedule") == "spread"]


@pytest.mark.parametrize("name", SPREAD)
def test_spread_reset_synchronizes_one_chunk_per_step(world, name):
    """reset_schedule="spread": right after the reset of step s, chunk (s + 1) mod H of every bucket (its
    C2 blocks, drawn over the chunk) is bitwise equal across replicas; the full bucket is not."""
    world_size, runs = world
    cfg, ranks = W.CONFIG[name], runs[name]
    shapes = {n: t.shape for n, t in ranks[0]["init"].items()}
    h, apart = cfg["period"], 0
    for s in range(cfg.get("warmup_steps", 1), W.STEPS - 1):
        layout = Layout(ranks[0]["layouts"][s], shapes)
        snaps = after_reset(ranks, cfg, s)
        for b in range(len(layout)):
            flat = [layout.flat(x, b) for x in snaps]
            n, c = flat[0].numel(), (s + 1) % h
            lo, hi = c * n // h, (c + 1) * n // h
            mask = torch.ones(hi - lo, dtype=torch.bool) if cfg["c2"] == "identity" else \
                random_block_mask(hi - lo, 1 / 4, 8, cfg.get("seed", 0), s, b, "c2")
            for f in flat[1:]:
                assert torch.equal(f[lo:hi][mask], flat[0][lo:hi][mask]), f"{name}: step {s} bucket {b}: chunk differs"
                apart += not torch.equal(f, flat[0])
    assert apart > 0, f"{name}: the replicas were equal everywhere: the test could not fail"


@pytest.mark.parametrize("name", FULL)
def test_full_reset_makes_replicas_bitwise_identical(world, name):
    world_size, runs = world
    cfg, ranks = W.CONFIG[name], runs[name]
    resets = [s for s in reset_steps(cfg) if s + 1 < W.STEPS]
    assert len(resets) >= 6
    for s in resets:
        assert bitwise_equal(after_reset(ranks, cfg, s)), f"{name}: replicas differ after the reset of {s}"
    # Teeth: between resets the local models do bifurcate (C1 sends 1/16 of the blocks).
    for s in range(cfg.get("warmup_steps", 1), W.STEPS):
        if s not in resets:
            gap = spread([r["after_step"][s] for r in ranks])
            assert gap > 1e-4, f"{name}: replicas identical after step {s}, which is no reset step"
    if not cfg.get("give_optimizer", True):
        # one-step shift: the step that triggers the reset leaves the replicas apart ...
        for s in resets:
            assert spread([r["after_step"][s] for r in ranks]) > 1e-4
        # ... and the next optimizer step applies local (un-averaged) parts of the gradient again
        for s in resets:
            assert spread([r["after_step"][s + 1] for r in ranks]) > 0.0


@pytest.mark.parametrize("name", PARTIAL)
def test_partial_reset_synchronizes_the_c2_blocks(world, name):
    world_size, runs = world
    cfg, ranks = W.CONFIG[name], runs[name]
    shapes = {n: t.shape for n, t in ranks[0]["init"].items()}
    ratio, block = 1 / 4, 8
    assert cfg["c2"] == f"random_block:ratio=1/4,block={block}"
    for s in [s for s in reset_steps(cfg) if s + 1 < W.STEPS]:
        layout = Layout(ranks[0]["layouts"][s], shapes)
        snaps = after_reset(ranks, cfg, s)
        for b in range(len(layout)):
            flat = [layout.flat(x, b) for x in snaps]
            mask = random_block_mask(flat[0].numel(), ratio, block, cfg.get("seed", 0), s, b, "c2")
            for f in flat[1:]:
                assert torch.equal(f[mask], flat[0][mask]), f"{name}: step {s} bucket {b}: C2 blocks differ"
                if (~mask).any():
                    assert not torch.equal(f[~mask], flat[0][~mask]), \
                        f"{name}: step {s} bucket {b}: the blocks outside C2 were synchronized too"


def test_c1_identity_is_synchronous_sgd(world):
    """C1 = identity: every step averages the whole gradient, so replicas agree bitwise at every step
    and the run is plain DDP's (docs/algorithms.md §3, configurations that double as sanity checks)."""
    world_size, runs = world
    ranks = runs["cser_c1_identity_sgd"]
    plain = runs["plain_ddp_sgd"]
    for s in range(W.STEPS):
        assert bitwise_equal([r["after_step"][s] for r in ranks]), f"step {s}"
    diff = max((ranks[0]["final"][n] - plain[0]["final"][n]).abs().max().item() for n in plain[0]["final"])
    assert diff <= 1e-5


# ------------------------------------------------------------------------------------------------
# The reference's own invariants (single process; W = 3 and two buckets, unlike the DDP runs)

def _reference_world(momentum=0.0, world_size=3):
    init = W.init_params()
    names = list(init)
    layout = Layout([names[4:][::-1], names[:4][::-1]], {n: t.shape for n, t in init.items()})
    return World(init, world_size, W.GradOracle(data_seed=7), W.LR, momentum), layout


def test_reference_paper_form_keeps_the_virtual_model_common():
    world, layout = _reference_world()
    errors: dict = {}
    hist: list = []
    simulate_cser_paper(world, 13, layout, W.RB16, "identity", 4, history=hist, errors=errors)
    xhat = [torch.cat([layout.flat(world.x[i], b) + errors[b][i] for b in range(len(layout))])
            for i in range(world.W)]
    for v in xhat[1:]:
        assert torch.allclose(v, xhat[0], atol=1e-6)
    # step 12 follows the reset of step 11, so every e_i is non-zero again
    assert all(float(e.abs().max()) > 0 for eb in errors.values() for e in eb)
    for s in (3, 7):  # full resets: all x_i equal
        assert spread(hist[s][1]) <= 1e-6
    assert spread(hist[8][1]) > 1e-4


def test_reference_c1_identity_is_synchronous_sgd():
    a, layout = _reference_world()
    b, _ = _reference_world()
    simulate_cser_paper(a, 10, layout, "identity", W.RB4, 4)
    simulate_ef(b, 10, layout, "identity")
    for i in range(3):
        for n in a.x[i]:
            assert torch.allclose(a.x[i][n], b.x[0][n], atol=1e-6)


@pytest.mark.parametrize("c2", ["identity", W.RB4])
def test_reference_paper_form_equals_averaging_form(c2):
    a, layout = _reference_world()
    b, _ = _reference_world()
    simulate_cser_paper(a, 16, layout, W.RB16, c2, 4)
    simulate_cser_hookform(b, 16, layout, W.RB16, c2, 4)
    diff = max((a.x[i][n] - b.x[i][n]).abs().max().item() for i in range(3) for n in a.x[i])
    assert diff <= 1e-6
    c, _ = _reference_world()
    simulate_cser_hookform(c, 16, layout, W.RB16, c2, 4, shifted=True)  # a different algorithm
    assert max((a.x[0][n] - c.x[0][n]).abs().max().item() for n in a.x[0]) > 1e-4
