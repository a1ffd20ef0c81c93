"""Horovod job: hvd.DistributedOptimizer keeps the replicas identical (tests/test_horovod_basic.py).

Each rank builds the model from a rank-dependent seed (so the replicas differ before the broadcast),
broadcasts rank 0's parameters and optimizer state, then takes STEPS SGD-with-momentum steps on its
own data through ``hvd.DistributedOptimizer`` (gradients averaged over ranks). It saves the
parameters before and after the broadcast and at the end; the test replays the same run in one
process with plain torch as the reference.

Usage (through tests/hvd_harness.run_horovod): train_identical.py [STEPS]
"""
from __future__ import annotations

import sys

import torch
from torch import nn

IN, HIDDEN, OUT = 8, 16, 4
BATCH = 12
LR, MOMENTUM = 0.05, 0.9


def build_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))


def make_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank's own batch at ``step`` (different data on every rank)."""
    gen = torch.Generator().manual_seed(10_007 * (rank + 1) + step)
    return torch.randn(BATCH, IN, generator=gen), torch.randn(BATCH, OUT, generator=gen)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def main(steps: int) -> None:
    import horovod.torch as hvd
    from hvd_result import save_result

    hvd.init()
    torch.set_num_threads(1)
    rank, size = hvd.rank(), hvd.size()
    model = build_model(seed=100 + rank)
    before = snapshot(model)
    opt = make_optimizer(model)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    after_broadcast = snapshot(model)
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    for step in range(steps):
        x, y = make_batch(rank, step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    save_result(rank, {"rank": rank, "size": size, "steps": steps, "before": before,
                       "after_broadcast": after_broadcast, "final": snapshot(model)})


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
