"""Train a small classifier with DDP and the cser_hooks plugin: one ``register_comm_hook`` line adopts it.

    torchrun --nproc-per-node 2 scripts/examples/train_ddp.py --method cser --steps 300
    scripts/launch_torchrun.sh --method cser --steps 300          # the same, multi-node aware

The adoption (docs/algorithms.md §3, CSER; §2, EF for ``--method ef``)::

    from cser_hooks.ddp import CSERState, cser_hook
    state = CSERState(process_group=None, c1="random_block:ratio=1/64", c2="random_block:ratio=1/4",
                      period=16, seed=0, warmup_steps=1, optimizer=opt)
    model.register_comm_hook(state, cser_hook)

Devices: ``--backend auto`` uses NCCL with ``cuda:$LOCAL_RANK`` when CUDA is available, else gloo on
the CPU; nothing else in the script changes between the two.

Data: no downloads. ``--data synthetic`` (default) draws inputs from N(0, I) and labels them with a
fixed random teacher network, each rank from its own stream; ``--data digits`` uses scikit-learn's
bundled 8x8 digits (needs scikit-learn), sharded by rank.

Output (one JSON object per line, easy to grep in a cluster log):
    cser-stats {...}   every --log-every steps on rank 0: step, loss and ``state.stats()`` (bytes sent
                       by this rank vs the dense bytes DDP would have sent, compress/comm seconds)
    cser-final {...}   once per rank at the end: first/last loss, held-out accuracy, final stats
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

IN_FEATURES, CLASSES = 64, 10
TEACHER_SEED = 1234


def build_model(hidden: int, seed: int) -> nn.Module:
    """The student MLP; every rank builds the same one (DDP also broadcasts rank 0's at wrap time)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, CLASSES))


class SyntheticTask:
    """Inputs x ~ N(0, I_64); label = argmax of a fixed random two-layer teacher (learnable, ~uniform)."""

    def __init__(self):
        g = torch.Generator().manual_seed(TEACHER_SEED)
        self.w1 = torch.randn(IN_FEATURES, 128, generator=g) / math.sqrt(IN_FEATURES)
        self.w2 = torch.randn(128, CLASSES, generator=g) / math.sqrt(128)

    def label(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(x @ self.w1) @ self.w2).argmax(dim=1)

    def batch(self, rank: int, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1_000_003 * (rank + 1) + step)
        x = torch.randn(size, IN_FEATURES, generator=g)
        return x, self.label(x)

    def heldout(self, size: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(size, IN_FEATURES, generator=torch.Generator().manual_seed(TEACHER_SEED + 1))
        return x, self.label(x)


class DigitsTask:
    """scikit-learn's bundled 8x8 digits (1797 images, no download); rank r trains on shard r of 80 %."""

    def __init__(self, rank: int, world: int):
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:
            raise SystemExit("--data digits needs scikit-learn (pip install scikit-learn); "
                             "or use --data synthetic") from exc
        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32) / 16.0
        y = torch.tensor(y, dtype=torch.long)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        x, y = x[perm], y[perm]
        n_train = int(0.8 * len(y))
        self.test = (x[n_train:], y[n_train:])
        self.x, self.y = x[:n_train][rank::world], y[:n_train][rank::world]

    def batch(self, rank: int, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1_000_003 * (rank + 1) + step)
        idx = torch.randint(len(self.y), (size,), generator=g)
        return self.x[idx], self.y[idx]

    def heldout(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.test


def make_task(name: str, rank: int, world: int):
    return DigitsTask(rank, world) if name == "digits" else SyntheticTask()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(dim=1) == y).float().mean())


def pick_backend(requested: str) -> str:
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise SystemExit("--backend nccl needs CUDA GPUs (torch.cuda.is_available() is False); "
                         "use --backend gloo (or auto) on CPU-only hosts")
    return requested


def pick_device(backend: str) -> torch.device:
    if backend != "nccl":
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= torch.cuda.device_count():
        raise SystemExit(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                         f"set NPROC_PER_NODE to at most the GPU count (or check CUDA_VISIBLE_DEVICES)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def attach_compression(model: DDP, method: str, opt: torch.optim.Optimizer, args):
    """Register the chosen comm hook; returns its state (None for plain DDP allreduce)."""
    if method == "cser":
        from cser_hooks.ddp import CSERState, cser_hook

        state = CSERState(process_group=None, c1=args.c1, c2=args.c2, period=args.period, seed=args.seed,
                          warmup_steps=1, optimizer=opt)
        model.register_comm_hook(state, cser_hook)
        return state
    if method == "ef":
        from cser_hooks.ddp import EFState, ef_hook

        state = EFState(process_group=None, compressor=args.ef_compressor, seed=args.seed, warmup_steps=1)
        model.register_comm_hook(state, ef_hook)
        return state
    return None


def log(tag: str, record: dict) -> None:
    # one write per line: with PYTHONUNBUFFERED=1, print() writes text and newline separately and the
    # ranks' lines interleave on the shared pipe
    sys.stdout.write(f"{tag} {json.dumps(record, sort_keys=True)}\n")
    sys.stdout.flush()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=("cser", "ef", "dense"), default="cser",
                   help="cser: CSER comm hook; ef: error feedback; dense: plain DDP allreduce (baseline)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto",
                   help="auto: nccl when CUDA is available, else gloo")
    p.add_argument("--data", choices=("synthetic", "digits"), default="synthetic")
    p.add_argument("--batch-size", type=int, default=64, help="per-rank batch size")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0, help="model init and compressor mask seed (same on all ranks)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--c1", default="random_block:ratio=1/64", help="CSER gradient compressor")
    p.add_argument("--c2", default="random_block:ratio=1/4", help="CSER reset compressor")
    p.add_argument("--period", type=int, default=16, help="CSER reset period H")
    p.add_argument("--ef-compressor", default="top_k:ratio=1/64", help="compressor for --method ef")
    args = p.parse_args(argv)
    if args.steps < 1 or args.log_every < 1 or args.batch_size < 1:
        p.error("--steps, --log-every and --batch-size must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("train_ddp.py expects torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...): "
                         "run it through scripts/launch_torchrun.sh or torchrun --nproc-per-node N")
    backend = pick_backend(args.backend)
    device = pick_device(backend)
    dist.init_process_group(backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    task = make_task(args.data, rank, world)
    model = DDP(build_model(args.hidden, args.seed).to(device),
                device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    state = attach_compression(model, args.method, opt, args)
    if rank == 0:
        nparams = sum(p.numel() for p in model.parameters())
        log("cser-start", {"method": args.method, "backend": backend, "device": str(device), "world_size": world,
                           "parameters": nparams, "torch": torch.__version__})

    loss_fn = nn.CrossEntropyLoss()
    first_loss = last_loss = None
    t0 = time.perf_counter()
    for step in range(args.steps):
        x, y = task.batch(rank, step, args.batch_size)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()  # the comm hook runs here, bucket by bucket
        opt.step()  # CSER's reset runs right after, as an optimizer step post-hook
        if step == 0 or (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            last_loss = loss.item()
            first_loss = last_loss if first_loss is None else first_loss
            if rank == 0:
                record = {"step": step + 1, "loss": round(last_loss, 5), "method": args.method}
                record.update(state.stats() if state is not None else {})
                log("cser-stats", record)

    xt, yt = task.heldout()
    final = {"rank": rank, "method": args.method, "steps": args.steps, "first_loss": first_loss,
             "last_loss": last_loss, "heldout_accuracy": accuracy(model.module, xt.to(device), yt.to(device)),
             "seconds": round(time.perf_counter() - t0, 3)}
    if state is not None:
        final["stats"] = state.stats()
    log("cser-final", final)
    dist.barrier()
    # drop the last references to DDP's reducer (it holds the process group) first, so that destroying the
    # group joins gloo's threads now and not while the interpreter finalizes, where a thread that still holds
    # a tensor aborts the process after the work is done (pytorch/pytorch#190489)
    del model, state, opt  # the optimizer holds CSER's post-step hook, and through it the state
    gc.collect()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
