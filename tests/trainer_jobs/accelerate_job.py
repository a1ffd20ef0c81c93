"""Accelerate job: ``accelerate launch --cpu --num_processes 2 accelerate_job.py OUT.json WORKDIR RUN [RUN ...]``.

Runs (tests/test_accelerate.py), each with a fresh Accelerator, gradient accumulation over ACCUMULATE
micro-batches (``accelerator.accumulate(model)``) and a seedable sampler (the data order is a function of
the seed and the epoch, so a resumed run sees the same batches):

  plain    no comm hook, EPOCHS epochs
  cser     CSER registered after prepare (the README block below), EPOCHS epochs,
           ``accelerator.save_state(WORKDIR/state)`` after epoch 0
  resume   the same set-up, ``accelerator.load_state(WORKDIR/state)``, epochs 1..EPOCHS-1

OUT.json (rank 0): per run the test accuracy of rank 0's model, every rank's parameter digest, the
state's stats and step, the optimizer steps, and per optimizer step whether the replicas were bitwise equal.
"""
from __future__ import annotations

import sys
from pathlib import Path

import digits
import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch.utils.data import DataLoader, TensorDataset

EPOCHS = 6       # 20 micro-batches of 36 per rank and epoch, 10 optimizer steps: the epoch-0 save is mid-period (H = 8)
ACCUMULATE = 2


def run(name: str, workdir: Path) -> dict:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=0))
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits.data()
    model = digits.mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=digits.LR, momentum=digits.MOMENTUM)
    loader = DataLoader(TensorDataset(xtr, ytr), batch_size=digits.BATCH, shuffle=True)
    state = None
    if name == "plain":
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    else:
        # README (Accelerate) begins
        from cser_hooks.checkpoint import RankLocalCheckpoint
        from cser_hooks.ddp import CSERState, cser_hook

        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        state = CSERState(c1="random_block:ratio=1/8,block=16", c2="identity", period=8,
                          optimizer=optimizer.optimizer)  # the torch optimizer inside Accelerate's wrapper
        model.register_comm_hook(state, cser_hook)
        accelerator.register_for_checkpointing(RankLocalCheckpoint(state, model, optimizer))
        # README (Accelerate) ends
    start = 0
    if name == "resume":
        accelerator.load_state(str(workdir / "state"))
        start = 1
    equal, steps = [], 0
    for epoch in range(start, EPOCHS):
        loader.set_epoch(epoch)
        for x, y in loader:
            with accelerator.accumulate(model):
                accelerator.backward(F.cross_entropy(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                steps += 1
                everyone = [None] * dist.get_world_size()
                dist.all_gather_object(everyone, digits.digest(accelerator.unwrap_model(model)))
                equal.append((steps, len(set(everyone)) == 1))
        if name == "cser" and epoch == 0:
            accelerator.save_state(str(workdir / "state"))
    net = accelerator.unwrap_model(model)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, digits.digest(net))
    out = {"accuracy": digits.accuracy(net, xte, yte), "digests": everyone, "optimizer_steps": steps,
           "equal_after_step": equal}
    if state is not None:
        out["stats"] = {k: v for k, v in state.stats().items() if isinstance(v, (int, float, type(None)))}
        out["state_step"] = state.step
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return out


def main() -> None:
    out_path, workdir, runs = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    torch.set_num_threads(1)
    result = {name: run(name, workdir) for name in runs}
    if dist.get_rank() == 0:
        digits.write(out_path, result)
    digits.leave_group()


if __name__ == "__main__":
    main()
