"""One benchmark worker: ``python -m cser_hooks.bench.worker --config FILE --rank R``.

Started W times by the launcher (:mod:`cser_hooks.bench.launch`), directly or through
``ip netns exec NAME`` for ``--link`` runs. It joins the gloo process group once, then trains the
model with each method of the config in turn (fresh model, optimizer, DDP and hook state, same
seed) and writes ``<out_dir>/<slug>/rank<R>.json`` per method:

* the training clock covers forward, backward (with the hook's communication) and
  ``optimizer.step()`` (with any step post-hook, e.g. CSER's reset); evaluation is outside it;
* the task (:mod:`cser_hooks.bench.tasks`: classification, or byte-level language modelling for
  ``gpt``) gives the batches, the loss and the metric (:mod:`cser_hooks.bench.metrics`);
* rank 0 evaluates *its own* model every ``eval_every`` steps (test accuracy on the whole test set, or
  the validation loss over the fixed validation windows; the others wait in a barrier) and prints
  ``@@{json}`` progress lines on stdout for the launcher's bars; at the end it also evaluates the
  rank-averaged model (for local-SGD-like methods these differ);
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

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from . import methods as methods_mod
from . import models, tasks


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


def lr_factor(step: int, steps: int, warmup: float = 0.05) -> float:
    """Linear warm-up over ``warmup`` (default 5 %) of the steps, then cosine decay to 0."""
    warm = max(1, int(warmup * steps))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


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
        task = tasks.load(cfg)
        from cser_hooks import kernels

        kernels.warm_up()  # Numba's one-time kernel loading is not training time
        dist.barrier()  # every rank is up: connections are made before the first clock starts
        for name, slug in zip(cfg["methods"], cfg["slugs"]):
            out = Path(cfg["out_dir"]) / slug
            out.mkdir(parents=True, exist_ok=True)
            if rank == 0:
                _emit({"method": name, "event": "start"})
            try:
                result = _train(dict(cfg, method=name), rank, world, task)
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


def bucket_count(ddp: DDP) -> int | None:
    """DDP's bucket count after its one rebuild (in the forward of the third step; None before it)."""
    try:
        sizes = ddp._get_ddp_logging_data().get("rebuilt_bucket_sizes") or ""
    except Exception:  # a private API: absent in some torch versions
        return None
    return len([s for s in str(sizes).split(",") if s.strip()]) or None


def _train(cfg: dict, rank: int, world: int, task) -> dict:
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    model = task.build_model()
    method = methods_mod.get(cfg["method"])
    opt_kw = {"lr": float(cfg["lr"]) * method.lr_scale, "momentum": float(cfg["momentum"]),
              "weight_decay": float(cfg["weight_decay"])}
    opt_kw.update(method.optimizer_overrides)
    opt = torch.optim.SGD(model.parameters(), **opt_kw)
    steps = int(cfg["steps"])
    warmup = float(cfg["warmup"]) if cfg.get("warmup") is not None else 0.05
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))
    clip = cfg.get("clip_grad")
    cap = method.bucket_cap_mb if method.bucket_cap_mb is not None else float(cfg["bucket_cap_mb"])
    ddp = DDP(model, bucket_cap_mb=cap)
    state, hook = method.make(None, opt, seed=seed, block=int(cfg["block"]))
    if hook is not None:
        ddp.register_comm_hook(state, hook)

    batch = int(cfg["batch"])
    task.check(world, batch)
    metric = task.metric
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
            value = task.evaluate(model)
            curve.append({"step": step, "time": train_time, metric.key: value,
                          "loss": (loss_sum / loss_n) if loss_n else None})
            _emit({"method": cfg["method"], "step": step, metric.key: value})
            flag[0] = float(stop_at is not None and step > 0 and metric.reached(value, stop_at))
        dist.broadcast(flag, 0)
        return bool(flag[0])

    evaluate(0)
    step, stopped = 0, False
    data = task.batches(rank, world, batch, seed)
    while step < steps and not stopped:
        if step == window_start:
            stats_window0 = _snapshot(state)
        if step >= window_start:
            tx.start()
        x, y = next(data)
        t0 = time.perf_counter()
        loss = tasks.loss_fn(ddp(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:  # on what the optimizer gets: the hook's output (rank-local for CSER-like methods)
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip))
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
        elif rank == 0 and step % progress_every == 0:
            _emit({"method": cfg["method"], "step": step})
    tx.stop()
    stats_end = _snapshot(state)
    buckets = bucket_count(ddp)

    # the rank-averaged model (outside the clock): equal to every rank's model for synchronous methods
    with torch.no_grad():
        for p in model.parameters():
            dist.all_reduce(p.data)
            p.data.div_(world)
    value_avg = task.evaluate(model) if rank == 0 else None

    return {"rank": rank, "method": cfg["method"], "steps": step, "planned_steps": steps,
            "stopped_at_target": stopped, "train_time": train_time, "metric": metric.key,
            "curve": curve, f"{metric.key}_final": curve[-1][metric.key] if curve else None,
            f"{metric.key}_avg": value_avg,
            "stats_window_start": stats_window0, "stats_end": stats_end, "window_start": window_start,
            "veth_tx_window": tx.total if tx.path is not None else None,
            "params": models.count_parameters(model), "protocol": method.protocol,
            "bucket_cap_mb": cap, "ddp_buckets": buckets, "optimizer": opt_kw, "clip_grad": clip, "warmup": warmup}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cser_hooks.bench.worker",
                                description="one benchmark worker (started by python -m cser_hooks.bench)")
    p.add_argument("--config", required=True, help="JSON written by the launcher")
    p.add_argument("--rank", type=int, required=True)
    a = p.parse_args(argv)
    _die_with_parent()
    return run(json.loads(Path(a.config).read_text()), a.rank)


if __name__ == "__main__":
    code = main()
    # every result file is written and the process group destroyed: skip the interpreter's finalization,
    # where a gloo thread still holding a tensor can abort the process (pytorch/pytorch#190489)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
