"""Lightning job: ``python lightning_job.py OUT.json WORKDIR RUN [RUN ...]`` (tests/test_lightning.py).

Trainer(accelerator="cpu", devices=2, strategy="ddp") launches rank 1 itself (it re-runs this script),
so every run below happens in both processes, one Trainer after the other. Runs:

  plain        no callback, EPOCHS epochs
  cser         CommHook("cser", ...), EPOCHS epochs, a checkpoint at every epoch end (WORKDIR/ckpt)
  resume       a new Trainer with CommHook, fit(ckpt_path=<cser's epoch-0 checkpoint>) to EPOCHS
  plain_acc2   plain with accumulate_grad_batches=2
  cser_acc2    cser with accumulate_grad_batches=2
  cser_fp16    cser with Lightning's fp16 MixedPrecision plugin on the CPU (a real GradScaler("cpu"); the
               callback picks on_nonfinite="auto"), overflows injected on rank 1 at OVERFLOW_STEPS
  single       CommHook with one CPU device (SingleDeviceStrategy): must raise; and two bad constructions
               (unknown algorithm, optimizer=...)   [1 process]
  world1       strategy="ddp", devices=1, ckpt_path=<a 2-rank checkpoint>: must raise   [1 process]

OUT.json (written by rank 0): per run the test accuracy of rank 0's model, every rank's parameter
digest, the state's stats and step, the global step, and per step whether the replicas were bitwise
equal after it; for the two error runs, the error text.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import digits
import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from cser_hooks.lightning import CommHook

EPOCHS = 4  # 20 steps per epoch per rank (batch 36): the epoch-0 checkpoint (step 20) is mid-period (H = 8),
#            the last step (80) is a reset step


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = digits.mlp()
        self.xtr, self.ytr, self.xte, self.yte = digits.data()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=digits.LR, momentum=digits.MOMENTUM)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.xtr, self.ytr), batch_size=digits.BATCH, shuffle=True)


OVERFLOW_STEPS = (5, 30)


class Overflowing(Net):
    """Rank 1's loss times inf at OVERFLOW_STEPS (as a too-large loss scale overflows fp16)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_rank == 1 and self.trainer.global_step in OVERFLOW_STEPS:
            loss = loss * float("inf")
        return loss


class Probe(pl.Callback):
    """After each optimizer step: are the replicas bitwise equal? (one all_gather_object per step)."""

    def __init__(self):
        self.equal: list[tuple[int, bool]] = []
        self.global_step = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.equal or self.equal[-1][0] != trainer.global_step:
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, digits.digest(pl_module))
            self.equal.append((trainer.global_step, len(set(everyone)) == 1))

    def on_train_end(self, trainer, pl_module):
        self.global_step = trainer.global_step


def readme_fit(model: pl.LightningModule, callbacks: list, ckpt_path=None) -> CommHook:
    """The README's Lightning block, verbatim (tests/test_lightning.py checks that README.md has it)."""
    # README (Lightning) begins
    from cser_hooks.lightning import CommHook

    comm = CommHook("cser", c1="random_block:ratio=1/8,block=16", c2="identity", period=8)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=4, callbacks=[comm, *callbacks])
    trainer.fit(model, ckpt_path=ckpt_path)  # ckpt_path="...ckpt" resumes: each rank gets its own state back
    print(comm.state.stats()["compression_ratio"])
    # README (Lightning) ends
    return comm


def fit(name: str, workdir: Path, accumulate: int = 1, hook: bool = True, ckpt_path=None) -> dict:
    """One run. Without accumulation the hooked runs go through :func:`readme_fit`."""
    pl.seed_everything(0, verbose=False)
    probe = Probe()
    callbacks = [probe]
    if name == "cser":
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=workdir / "ckpt", every_n_epochs=1, save_top_k=-1,
                                                      save_on_train_epoch_end=True))
    model = Overflowing() if name == "cser_fp16" else Net()
    comm = None
    if name == "cser_fp16":
        from lightning.pytorch.plugins import MixedPrecision

        comm = CommHook("cser", **digits.CSER)
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=EPOCHS,
                             callbacks=[*callbacks, comm], plugins=[MixedPrecision("16-mixed", "cpu")])
        trainer.fit(model)
        scaler = trainer.precision_plugin.scaler
    elif hook and accumulate == 1:
        comm = readme_fit(model, callbacks, ckpt_path)
    else:
        if hook:
            comm = CommHook("cser", **digits.CSER)
            callbacks.append(comm)
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=EPOCHS, callbacks=callbacks,
                             accumulate_grad_batches=accumulate)
        trainer.fit(model, ckpt_path=ckpt_path)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, digits.digest(model))
    out = {"accuracy": digits.accuracy(model.net, model.xte, model.yte), "digests": everyone,
           "global_step": probe.global_step, "equal_after_step": probe.equal}
    if comm is not None:
        out["stats"] = {k: v for k, v in comm.state.stats().items() if isinstance(v, (int, float, type(None)))}
        out["state_step"] = comm.state.step
        out["on_nonfinite"] = comm.state.on_nonfinite
    if name == "cser_fp16":
        out["scale"] = scaler.get_scale()
    return out


def expect_error(trainer: pl.Trainer, **fit_kw) -> str:
    try:
        trainer.fit(Net(), **fit_kw)
    except Exception as e:  # the run must fail with cser_hooks' message
        return f"{type(e).__name__}: {e}"
    return "no error"


def construct_error(*args, **kw) -> str:
    try:
        CommHook(*args, **kw)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def main() -> None:
    out_path, workdir, runs = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    torch.set_num_threads(1)
    result = {}
    for run in runs:
        if run == "single":
            trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, callbacks=[CommHook("cser")],
                                 logger=False, enable_progress_bar=False, enable_checkpointing=False)
            result[run] = {"error": expect_error(trainer), "bad_name": construct_error("cserr"),
                           "optimizer_knob": construct_error("cser", optimizer=None)}
        elif run == "world1":
            ckpt = sorted((workdir / "ckpt").glob("epoch=0-*.ckpt"))[0]
            trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="ddp", max_epochs=EPOCHS,
                                 callbacks=[CommHook("cser", **digits.CSER)], logger=False,
                                 enable_progress_bar=False, enable_checkpointing=False)
            result[run] = {"error": expect_error(trainer, ckpt_path=ckpt)}
        elif run == "resume":
            ckpt = sorted((workdir / "ckpt").glob("epoch=0-*.ckpt"))[0]
            result[run] = fit(run, workdir, ckpt_path=ckpt)
            result[run]["ckpt"] = ckpt.name
        else:
            result[run] = fit(run, workdir, accumulate=2 if run.endswith("_acc2") else 1,
                              hook=run.startswith("cser"))
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        digits.write(out_path, result)
    digits.leave_group()


if __name__ == "__main__":
    main()
