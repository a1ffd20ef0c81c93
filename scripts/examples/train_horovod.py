"""Train the same small classifier as train_ddp.py with Horovod; cser_hooks plugs in as the compression.

    horovodrun -np 2 -H localhost:2 --gloo python scripts/examples/train_horovod.py --method cser
    scripts/launch_horovodrun.sh --method cser                     # HOSTS / NP from the environment

The adoption (docs/algorithms.md §3, CSER)::

    from cser_hooks.horovod import CSERCompression
    cser = CSERCompression(model.named_parameters(), c1="random_block:ratio=1/64", c2="random_block:ratio=1/4",
                           period=16, seed=0, warmup_steps=1, optimizer=opt)
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), compression=cser)

``optimizer=opt`` runs CSER's error reset right after each ``optimizer.step()``. ``--method ef`` uses
``cser_hooks.horovod.EFCompression`` (error feedback, docs/algorithms.md §2) with a shared-mask compressor the same way.

Devices: with CUDA each rank uses ``cuda:hvd.local_rank()`` (Horovod built with
HOROVOD_GPU_OPERATIONS=NCCL, as in the Docker image, then reduces on the GPU with NCCL); without it the
CPU and gloo. Data, model and output lines (``cser-stats`` / ``cser-final``, one JSON object each) are
those of train_ddp.py, whose workload helpers this script imports.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_ddp import accuracy, build_model, log, make_task  # noqa: E402  (the shared workload)


def make_compression(method: str, model: nn.Module, opt: torch.optim.Optimizer, args):
    """The Horovod ``compression=``: cser_hooks' CSERCompression or EFCompression, or Horovod's no-op."""
    import horovod.torch as hvd

    if method == "cser":
        from cser_hooks.horovod import CSERCompression

        return CSERCompression(model.named_parameters(), c1=args.c1, c2=args.c2, period=args.period,
                               seed=args.seed, warmup_steps=1, optimizer=opt)
    if method == "ef":
        from cser_hooks.horovod import EFCompression

        return EFCompression(model.named_parameters(), compressor=args.ef_compressor, seed=args.seed,
                             warmup_steps=1, optimizer=opt)
    return hvd.Compression.none


def stats_of(compression) -> dict:
    stats = getattr(compression, "stats", None)
    return stats() if callable(stats) else {}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=("cser", "ef", "dense"), default="cser",
                   help="cser / ef: cser_hooks.horovod.CSERCompression / EFCompression; dense: hvd.Compression.none")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--data", choices=("synthetic", "digits"), default="synthetic")
    p.add_argument("--batch-size", type=int, default=64, help="per-rank batch size")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--c1", default="random_block:ratio=1/64", help="CSER gradient compressor")
    p.add_argument("--c2", default="random_block:ratio=1/4", help="CSER reset compressor")
    p.add_argument("--period", type=int, default=16, help="CSER reset period H")
    p.add_argument("--ef-compressor", default="random_block:ratio=1/64",
                   help="shared-mask compressor for --method ef (Horovod averages what compress returns)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.log_every < 1 or args.batch_size < 1:
        p.error("--steps, --log-every and --batch-size must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import horovod.torch as hvd

    hvd.init()
    rank, world = hvd.rank(), hvd.size()
    if torch.cuda.is_available():
        torch.cuda.set_device(hvd.local_rank())
        device = torch.device("cuda", hvd.local_rank())
    else:
        device = torch.device("cpu")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    task = make_task(args.data, rank, world)
    model = build_model(args.hidden, args.seed).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    compression = make_compression(args.method, model, opt, args)
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), compression=compression)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    if rank == 0:
        log("cser-start", {"method": args.method, "device": str(device), "world_size": world,
                           "nccl_built": bool(hvd.nccl_built()), "gloo_built": bool(hvd.gloo_built()),
                           "parameters": sum(p.numel() for p in model.parameters()), "torch": torch.__version__})

    loss_fn = nn.CrossEntropyLoss()
    first_loss = last_loss = None
    t0 = time.perf_counter()
    for step in range(args.steps):
        x, y = task.batch(rank, step, args.batch_size)
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()  # Horovod starts the (compressed) allreduces from gradient hooks
        opt.step()  # waits for them, then applies the update
        if step == 0 or (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            last_loss = loss.item()
            first_loss = last_loss if first_loss is None else first_loss
            if rank == 0:
                log("cser-stats", {"step": step + 1, "loss": round(last_loss, 5), "method": args.method,
                                   **stats_of(compression)})

    xt, yt = task.heldout()
    final = {"rank": rank, "method": args.method, "steps": args.steps, "first_loss": first_loss,
             "last_loss": last_loss, "heldout_accuracy": accuracy(model, xt.to(device), yt.to(device)),
             "seconds": round(time.perf_counter() - t0, 3)}
    if args.method != "dense":
        final["stats"] = stats_of(compression)
    log("cser-final", final)
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
