"""Resume across a learning-rate change, for every algorithm that rescales its errors by η_{t−1}/η_t.

EF, CompSkip and dist-EF-SGDM keep their residuals in gradient units and rescale them when the lr
changes (docs/algorithms.md, "Learning-rate changes"). The lr of each key's last step is part of
``state_dict()``: a job saved at step 15 of a schedule whose lr changes every step, resumed in new
processes, must rescale at its first step and so continue bitwise like the uninterrupted job. A
state dict without that entry (the defect this guards against: dist-EF-SGDM did not save it) resumes
without the first rescale and ends elsewhere, which the last test shows.
"""
from __future__ import annotations

import os

import pytest
import torch

from harness import run_ranks

pytestmark = [pytest.mark.timeout(300)]

ALGOS = {
    "ef": ("EFState", "ef_hook", {"compressor": "top_k:ratio=1/16"}, 0.9),
    "compskip": ("CompSkipState", "compskip_hook", {"compressor": "top_k:ratio=1/8", "send_every": 2}, 0.9),
    "dist_ef_sgdm": ("DistEFSGDMState", "dist_ef_sgdm_hook", {"momentum": 0.9}, 0.0),
}
SAVE_AT, STEPS = 15, 30


def _lr(step: int) -> float:
    return 0.1 / (1 + 0.1 * step)


def _run(rank, ws, algo, phase, ckpt_dir, drop_lr_memory=False):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from cser_hooks import ddp as D

    state_name, hook_name, kw, momentum = ALGOS[algo]
    torch.manual_seed(1234)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    ddp = DDP(model, find_unused_parameters=True)   # one bucket layout from the first step on
    opt = torch.optim.SGD(model.parameters(), lr=_lr(0), momentum=momentum)
    st = getattr(D, state_name)(optimizer=opt, **kw)
    ddp.register_comm_hook(st, getattr(D, hook_name))
    path = os.path.join(ckpt_dir, f"rank{rank}.pt")
    start, stop = 0, STEPS
    if phase == "second":
        ck = torch.load(path, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sd = ck["state"]
        if drop_lr_memory:
            sd = {k: v for k, v in sd.items() if k != "lr_of"}
        st.load_state_dict(sd)
        start = SAVE_AT
    elif phase == "first":
        stop = SAVE_AT
    for s in range(start, stop):
        for g in opt.param_groups:
            g["lr"] = _lr(s)
        opt.zero_grad()
        gen = torch.Generator().manual_seed(10_000 * rank + s)
        x, y = torch.randn(16, 20, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    if phase == "first":
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": st.state_dict()}, path)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.fixture(scope="module")
def full_runs():
    return {}


def _full(full_runs, algo, tmp_path):
    if algo not in full_runs:
        full_runs[algo] = run_ranks(_run, 2, algo, "full", str(tmp_path), timeout=120)
    return full_runs[algo]


@pytest.mark.parametrize("algo", list(ALGOS))
def test_resume_across_lr_changes_is_bitwise(tmp_path, full_runs, algo):
    full = _full(full_runs, algo, tmp_path)
    run_ranks(_run, 2, algo, "first", str(tmp_path), timeout=120)
    resumed = run_ranks(_run, 2, algo, "second", str(tmp_path), timeout=120)
    for r in range(2):
        assert torch.equal(full[r], resumed[r]), f"{algo}, rank {r}: max diff {(full[r] - resumed[r]).abs().max()}"


@pytest.mark.parametrize("algo", list(ALGOS))
def test_resume_without_the_lr_memory_differs(tmp_path, full_runs, algo):
    full = _full(full_runs, algo, tmp_path)
    run_ranks(_run, 2, algo, "first", str(tmp_path), timeout=120)
    resumed = run_ranks(_run, 2, algo, "second", str(tmp_path), True, timeout=120)
    assert (full[0] - resumed[0]).abs().max() > 1e-6
