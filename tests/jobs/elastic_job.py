"""A torchrun job that checkpoints a state at one world size and resumes it at another.

    torchrun --standalone --nproc-per-node 2 tests/jobs/elastic_job.py save   DIR ALGO
    torchrun --standalone --nproc-per-node 3 tests/jobs/elastic_job.py resume DIR ALGO POLICY

``save`` trains STEPS steps and writes each rank's ``state.state_dict()`` (state_rank<r>.pt) and rank 0's
model and optimizer (model.pt), as an elastic job's checkpoint would. ``resume`` loads model.pt on every
rank and the state file of its own rank, or rank 0's when there is none (the new rank of a grown job),
with ``on_world_size_change=POLICY``, trains STEPS more steps and writes what it saw to
result_rank<r>.json: the load error or warning, the step, the state's bytes, whether the replicas agree.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

STEPS = 8


def batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(32, 16, generator=g)
    return x, (x[:, :4].sum(1) > 0).long()


def build(algo: str, model, opt, policy: str):
    from cser_hooks import ddp as D

    if algo == "cser":
        return D.CSERState(c1="random_block:ratio=1/4,block=8", c2="identity", period=4, optimizer=opt,
                           on_world_size_change=policy), D.cser_hook
    return D.EFState(compressor="top_k:ratio=1/8", optimizer=opt, on_world_size_change=policy), D.ef_hook


def train(model, opt, rank: int, first: int) -> float:
    loss = torch.tensor(0.0)
    for s in range(first, first + STEPS):
        x, y = batch(rank, s)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return float(loss)


def readme_resume(state, out: Path, rank: int) -> None:
    """The README's torchrun block, verbatim (tests/test_elastic_resume.py checks that README.md has it)."""
    # README (torchrun) begins
    # each rank loads its own file; a rank the saving job did not have loads rank 0's
    mine = out / f"state_rank{rank}.pt"
    state.load_state_dict(torch.load(mine if mine.exists() else out / "state_rank0.pt", weights_only=False))
    # README (torchrun) ends


def main(phase: str, folder: str, algo: str, policy: str = "raise") -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(folder)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
    model = DDP(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    result = {"rank": rank, "world_size": world}
    if phase == "save":
        state, hook = build(algo, model, opt, "raise")
        model.register_comm_hook(state, hook)
        result["loss"] = train(model, opt, rank, 0)
        torch.save(state.state_dict(), out / f"state_rank{rank}.pt")
        if rank == 0:
            torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, out / "model.pt")
    else:
        saved = torch.load(out / "model.pt", weights_only=False)
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        state, hook = build(algo, model, opt, policy)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                readme_resume(state, out, rank)
            except ValueError as e:
                result["error"] = str(e)
        result["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        if "error" not in result:
            model.register_comm_hook(state, hook)
            result["loss"] = train(model, opt, rank, STEPS)
            result["step"] = state.step
            result["state_bytes"] = state.stats()["state_bytes"]
            flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
            everyone = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(everyone, flat)
            result["replica_spread"] = max(float((t - everyone[0]).abs().max()) for t in everyone)
    (out / f"result_{phase}_rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    # skip the interpreter's finalization: a gloo thread dropping a tensor then aborts the process
    # (pytorch/pytorch#190489; seen in CI after this job's work was done)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(*sys.argv[1:])
