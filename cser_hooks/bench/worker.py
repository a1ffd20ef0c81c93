"""One benchmark worker: ``python -m cser_hooks.bench.worker --config FILE --rank R``.

Started W times by the launcher (:mod:`cser_hooks.bench.launch`), directly or through
``ip netns exec NAME`` for ``--link`` runs. It joins the gloo process group once, then trains the
model with each method of the config in turn (fresh model, optimizer, DDP and hook state, same
seed) and writes ``<out_dir>/<slug>/rank<R>.json`` per method:

* the training clock covers forward, backward (with the hook's communication) and
  ``optimizer.step()`` (with any step post-hook, e.g. CSER's reset); evaluation is outside it;
* rank 0 evaluates *its own* model on the whole test set every ``eval_every`` steps (the others
  wait in a barrier) and prints ``@@{json}`` progress lines on stdout for the launcher's bars; at
  the end it also evaluates the rank-averaged model (for local-SGD-like methods these differ);
* bytes: ``state.stats()`` counters (handed and ring-model wire bytes, cser_hooks/wire.py), and the
  veth's ``tx_bytes`` when ``ifname`` is set, both over
  the steady-state window ``[window_start, steps)`` (warm-up steps send dense gradients).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from . import methods as methods_mod
from . import models


def _die_with_parent() -> None:
    """SIGKILL this worker when the launcher dies, even by SIGKILL (Linux prctl PDEATHSIG)."""
    parent = int(os.environ.get("CSER_BENCH_PARENT", "0") or 0)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if parent and os.getppid() != parent:  # the launcher died before prctl took effect
        os._exit(1)


class TxCounter:
    """Sum of ``tx_bytes`` deltas of one interface over the segments between start() and stop()."""

    def __init__(self, ifname: str | None):
        self.path = Path(f"/sys/class/net/{ifname}/statistics/tx_bytes") if ifname else None
        self.total = 0
        self._t0: int | None = None

    def _read(self) -> int:
        return int(self.path.read_text())

    def start(self) -> None:
        if self.path is not None and self._t0 is None:
            self._t0 = self._read()

    def stop(self) -> None:
        if self.path is not None and self._t0 is not None:
            self.total += self._read() - self._t0
            self._t0 = None


def lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over 5 % of the steps, then cosine decay to 0."""
    warm = max(1, int(0.05 * steps))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    correct = 0
    for i in range(0, len(y), 1000):
        correct += int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum())
    return correct / len(y)


def _emit(obj) -> None:
    sys.stdout.write("@@" + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _json_stats(stats: dict) -> dict:
    """The JSON-able entries of ``stats()``: scalars, and dicts of scalars (wire_bytes_by_collective)."""
    scalar = (int, float, str, bool, type(None))
    out = {}
    for k, v in stats.items():
        if isinstance(v, scalar):
            out[k] = v
        elif isinstance(v, dict) and all(isinstance(x, scalar) for x in v.values()):
            out[k] = {str(a): x for a, x in v.items()}
    return out


def _snapshot(state) -> dict:
    """``state.stats()`` now, plus what its communicator has counted but no step has closed yet.

    Work launched right after ``optimizer.step()`` (CSER's reset, the local-SGD-like syncs) is closed
    into the *next* step's counters, so at a window boundary it belongs to the step that issued it, as
    the veth counter sees it: both window ends include it (none of the last step's sync is lost)."""
    st = _json_stats(state.stats())
    comm = getattr(state, "comm", None)
    for key, pending in (("bytes_sent_total", "bytes_sent"), ("wire_bytes_total", "wire_bytes")):
        if isinstance(st.get(key), int) and isinstance(getattr(comm, pending, None), int):
            st[key] += getattr(comm, pending)
    return st


def run(cfg: dict, rank: int) -> int:
    """Run every method of ``cfg["methods"]`` in order; per method write a result or an error file.

    A method whose hook is unavailable (MethodUnavailable, raised identically on every rank before
    any hook collective) is recorded and skipped; any other exception ends the worker (exit 1) and
    the launcher restarts the workers for the remaining methods.
    """
    torch.set_num_threads(1)
    world = int(cfg["world"])
    dist.init_process_group("gloo", init_method=f"tcp://{cfg['master_addr']}:{cfg['master_port']}",
                            rank=rank, world_size=world, timeout=timedelta(seconds=float(cfg["timeout_s"])))
    try:
        with np.load(cfg["data"]) as z:
            arrays = tuple(torch.from_numpy(z[k]) for k in ("x_train", "y_train", "x_test", "y_test"))
        from cser_hooks import kernels

        kernels.warm_up()  # Numba's one-time kernel loading is not training time
        dist.barrier()  # every rank is up: connections are made before the first clock starts
        for name, slug in zip(cfg["methods"], cfg["slugs"]):
            out = Path(cfg["out_dir"]) / slug
            out.mkdir(parents=True, exist_ok=True)
            if rank == 0:
                _emit({"method": name, "event": "start"})
            try:
                result = _train(dict(cfg, method=name), rank, world, arrays)
            except methods_mod.MethodUnavailable as exc:
                _write(out / f"rank{rank}.error.json", {"unavailable": True, "message": str(exc)})
                dist.barrier()
                if rank == 0:
                    _emit({"method": name, "event": "end"})
                continue
            except Exception as exc:
                _write(out / f"rank{rank}.error.json", {"unavailable": False,
                                                         "message": f"{type(exc).__name__}: {exc}"})
                raise
            _write(out / f"rank{rank}.json", result)
            dist.barrier()  # every rank's result file exists before rank 0 reports the method done
            if rank == 0:
                _emit({"method": name, "event": "end"})
        return 0
    finally:
        dist.destroy_process_group()


def _write(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _train(cfg: dict, rank: int, world: int, arrays) -> dict:
    xtr, ytr, xte, yte = arrays
    classes = int(max(ytr.max(), yte.max())) + 1
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    model = models.build(cfg["model"], xtr.shape[1:], classes)
    method = methods_mod.get(cfg["method"])
    opt_kw = {"lr": float(cfg["lr"]) * method.lr_scale, "momentum": float(cfg["momentum"]),
              "weight_decay": float(cfg["weight_decay"])}
    opt_kw.update(method.optimizer_overrides)
    opt = torch.optim.SGD(model.parameters(), **opt_kw)
    steps = int(cfg["steps"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps))
    cap = method.bucket_cap_mb if method.bucket_cap_mb is not None else float(cfg["bucket_cap_mb"])
    ddp = DDP(model, bucket_cap_mb=cap)
    state, hook = method.make(None, opt, seed=seed, block=int(cfg["block"]))
    if hook is not None:
        ddp.register_comm_hook(state, hook)

    batch = int(cfg["batch"])
    ntrain = len(ytr)
    if ntrain // world < batch:
        raise ValueError(f"{ntrain} training samples over {world} workers is fewer than --batch {batch} each")
    eval_every, window_start = int(cfg["eval_every"]), int(cfg["window_start"])
    progress_every = max(1, steps // 100)
    tx = TxCounter(cfg.get("ifname"))
    curve = []
    train_time = 0.0
    stats_window0 = None
    loss_sum, loss_n = 0.0, 0

    stop_at = cfg.get("stop_at")

    def evaluate(step: int) -> bool:
        """Rank 0 evaluates; the broadcast of its stop flag doubles as the barrier."""
        tx.stop()
        flag = torch.zeros(1)
        if rank == 0:
            acc = accuracy(model, xte, yte)
            curve.append({"step": step, "time": train_time, "acc": acc,
                          "loss": (loss_sum / loss_n) if loss_n else None})
            _emit({"method": cfg["method"], "step": step, "acc": acc})
            flag[0] = float(stop_at is not None and step > 0 and acc >= stop_at)
        dist.broadcast(flag, 0)
        return bool(flag[0])

    evaluate(0)
    step, epoch, stopped = 0, 0, False
    while step < steps and not stopped:
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        shard = torch.randperm(ntrain, generator=g)[rank::world]
        for i in range(0, len(shard) - batch + 1, batch):
            if step >= steps:
                break
            if step == window_start:
                stats_window0 = _snapshot(state)
            if step >= window_start:
                tx.start()
            idx = shard[i:i + batch]
            t0 = time.perf_counter()
            loss = F.cross_entropy(ddp(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            train_time += time.perf_counter() - t0
            loss_sum += float(loss.detach())
            loss_n += 1
            step += 1
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"training loss is not finite at step {step}: lower --lr")
            if step % eval_every == 0 or step == steps:
                stopped = evaluate(step)
                loss_sum, loss_n = 0.0, 0
                if stopped:
                    break
            elif rank == 0 and step % progress_every == 0:
                _emit({"method": cfg["method"], "step": step})
        epoch += 1
    tx.stop()
    stats_end = _snapshot(state)

    # the rank-averaged model (outside the clock): equal to every rank's model for synchronous methods
    with torch.no_grad():
        for p in model.parameters():
            dist.all_reduce(p.data)
            p.data.div_(world)
    acc_avg = accuracy(model, xte, yte) if rank == 0 else None

    return {"rank": rank, "method": cfg["method"], "steps": step, "planned_steps": steps,
            "stopped_at_target": stopped, "train_time": train_time,
            "curve": curve, "acc_final": curve[-1]["acc"] if curve else None, "acc_avg": acc_avg,
            "stats_window_start": stats_window0, "stats_end": stats_end, "window_start": window_start,
            "veth_tx_window": tx.total if tx.path is not None else None,
            "params": models.count_parameters(model), "protocol": method.protocol,
            "bucket_cap_mb": cap, "optimizer": opt_kw}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cser_hooks.bench.worker",
                                description="one benchmark worker (started by python -m cser_hooks.bench)")
    p.add_argument("--config", required=True, help="JSON written by the launcher")
    p.add_argument("--rank", type=int, required=True)
    a = p.parse_args(argv)
    _die_with_parent()
    return run(json.loads(Path(a.config).read_text()), a.rank)


if __name__ == "__main__":
    sys.exit(main())
