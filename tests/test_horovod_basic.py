"""Real Horovod (horovodrun --gloo, 2 ranks): DistributedOptimizer keeps the replicas identical.

The job (tests/hvd_scripts/train_identical.py) starts the ranks from different parameters,
broadcasts rank 0's, then trains on different data per rank. Checked against a single-process
replay with plain torch: SGD with momentum on the rank-averaged gradient (docs/algorithms.md §8: every
rank ends in the same state because every rank applies the same averaged update).
"""
from __future__ import annotations

import pytest
import torch

from hvd_harness import run_horovod
from hvd_scripts.train_identical import build_model, make_batch, make_optimizer, snapshot

pytestmark = pytest.mark.horovod

STEPS = 5
NP = 2


def replay(steps: int, world_size: int) -> dict[str, torch.Tensor]:
    """Single-process reference: rank 0's initial model, gradients averaged over the ranks' batches."""
    model = build_model(seed=100)
    opt = make_optimizer(model)
    for step in range(steps):
        grads = []
        for rank in range(world_size):
            model.zero_grad()
            x, y = make_batch(rank, step)
            torch.nn.functional.mse_loss(model(x), y).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for i, p in enumerate(model.parameters()):
            p.grad = sum(g[i] for g in grads) / world_size
        opt.step()
    return snapshot(model)


def test_distributed_optimizer_keeps_ranks_identical():
    results = run_horovod("train_identical.py", NP, args=(STEPS,), timeout=240)
    assert [r["rank"] for r in results] == list(range(NP))
    assert all(r["size"] == NP for r in results)
    r0, r1 = results
    names = list(r0["final"])
    # The ranks really started apart, and the broadcast made rank 1 a copy of rank 0.
    assert any(not torch.equal(r0["before"][n], r1["before"][n]) for n in names)
    for n in names:
        assert torch.equal(r1["after_broadcast"][n], r0["before"][n]), n
    # Training moved the parameters and left the replicas bit-identical.
    assert any(not torch.allclose(r0["final"][n], r0["after_broadcast"][n]) for n in names)
    for n in names:
        assert torch.equal(r0["final"][n], r1["final"][n]), f"{n} differs between ranks"
    # Independent reference: averaged-gradient SGD in one process.
    expected = replay(STEPS, NP)
    for n in names:
        torch.testing.assert_close(r0["final"][n], expected[n], rtol=1e-5, atol=1e-6)
