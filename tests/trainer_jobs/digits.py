"""The workload of the trainer jobs: sklearn's digits (offline), a small MLP, accuracy, digests.

Shared by lightning_job.py and accelerate_job.py (both run as scripts from this folder, so this
module is on their sys.path). 1797 images of 8x8 pixels, 10 classes: 1437 train, 360 test, split and
standardized the same way in every process.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from torch import nn

TRAIN = 1437
LR, MOMENTUM, BATCH = 0.05, 0.9, 36
# CSER for a 4.8k-parameter model: 1/8 of the gradient averaged per step (16-element blocks), full reset
# every 8 steps; ≈ 1/8 + 1/8 of dense traffic
CSER = {"c1": "random_block:ratio=1/8,block=16", "c2": "identity", "period": 8}


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test), float32 features standardized on the train split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order].astype(np.float32), y[order].astype(np.int64)
    mean, std = x[:TRAIN].mean(0), x[:TRAIN].std(0) + 1e-3
    x = (x - mean) / std
    t = torch.from_numpy
    return t(x[:TRAIN]), t(y[:TRAIN]), t(x[TRAIN:]), t(y[TRAIN:])


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((net(x).argmax(1) == y).float().mean()) * 100


def digest(module: nn.Module) -> str:
    """SHA-256 of the parameters' bytes: equal digests = bitwise equal parameters."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def write(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)


def leave_group() -> None:
    """End of a job (its output written): destroy the default process group after every rank got here,
    then end the process without the interpreter's finalization.

    A C++ thread that drops a tensor while the interpreter finalizes aborts the process ("terminate called
    without an active exception", pytorch/pytorch#190489), after the job's work is done; seen twice in CI on
    a loaded 2-core machine, once with destroy_process_group called. Neither trainer destroys the group when
    fit ends.
    """
    import os
    import sys

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
