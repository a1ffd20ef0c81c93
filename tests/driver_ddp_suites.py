"""The DDP driver of the state/hook suites (dist-EF-SGDM, Qsparse-local-SGD, QPRSGD), and their shared spawn.

:func:`train_configs` runs in the spawned gloo ranks (``harness.run_ranks``): it trains several
configurations in sequence, each with a fresh model, DDP wrapper, optimizer and hook state, using the
package's state class and hook named by the configuration (``cfg["state"]``, ``cfg["hook"]``). Models:
the shared MLP workload of ``ddp_workload`` (default), ``"big"`` (one 1 048 576-element bucket) or
``"lsq"`` (least squares on :func:`lsq_data`). Per configuration a rank returns its initial and final
parameters, per-step snapshots (``record``), the bucket layout the hook saw at every step, cumulative
bytes sent, the state's stats and diagnostics.

One spawn per world size serves every suite: each test module calls :func:`register_suite` at import
(collection) time, and the first :func:`run_suite` for a world size trains every suite registered so
far. This is the real package at work, so it is not part of ``tests/reference/`` (the references share
no code with the package).
"""
from __future__ import annotations

import time

import torch
from torch import nn

import ddp_workload as W
from harness import run_ranks


def _params(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _big_batch(rank, step):
    g = torch.Generator().manual_seed(77 + 1000 * rank + step)
    return torch.randn(16, 1024, generator=g)


LSQ_DIM, LSQ_ROWS = 10, 32


def lsq_data(rank: int):
    """Least-squares data of a rank (same x_true everywhere, rank-specific rows and noise)."""
    x_true = torch.linspace(-1.0, 1.0, LSQ_DIM)
    g = torch.Generator().manual_seed(4242 + rank)
    A = torch.randn(LSQ_ROWS, LSQ_DIM, generator=g) + 0.5 * rank
    return A, A @ x_true + 0.3 * torch.randn(LSQ_ROWS, generator=g)


def lr_at(cfg: dict, step: int) -> float:
    lr = W.LR
    for s, v in sorted(cfg.get("lr_steps", {}).items()):
        if step >= s:
            lr = v
    return lr


def train_one(rank: int, world_size: int, cfg: dict, steps: int) -> dict:
    """Train ``cfg`` with the package's state/hook named by cfg["state"]/cfg["hook"]."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from cser_hooks import ddp as D

    torch.manual_seed(0)
    big, lsq = cfg.get("model") == "big", cfg.get("model") == "lsq"
    if big or lsq:
        model = nn.Linear(1024, 1024, bias=False) if big else nn.Linear(LSQ_DIM, 1, bias=False)
    else:
        model = W.build_model(cfg.get("model_seed", W.MODEL_SEED))
    name_of = {id(p): n for n, p in model.named_parameters()}
    kwargs = {} if cfg.get("bucket_cap_mb") is None else {"bucket_cap_mb": cfg["bucket_cap_mb"]}
    ddp = DDP(model, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=lr_at(cfg, 0), **cfg.get("opt", {}))
    before_sync: list = []
    if cfg.get("record", True):  # registered before the state's own post-hook, so it runs first
        opt.register_step_post_hook(lambda o, a, k: before_sync.append(_params(model)))
    state = getattr(D, cfg["state"])(optimizer=opt if cfg.get("give_optimizer", True) else None,
                                     **cfg.get("kw", {}))
    hook = getattr(D, cfg["hook"])
    layouts: dict = {}
    current = [0]

    def recording_hook(st, bucket):
        layouts.setdefault(current[0], {})[bucket.index()] = [name_of[id(p)] for p in bucket.parameters()]
        return hook(st, bucket)

    ddp.register_comm_hook(state, recording_hook)
    out = {"name": cfg["name"], "init": _params(model), "after_step": [], "cum_bytes": []}
    start = time.perf_counter()
    for s in range(steps):
        current[0] = s
        for grp in opt.param_groups:
            grp["lr"] = lr_at(cfg, s)
        opt.zero_grad()
        if big:
            ddp(_big_batch(rank, s)).pow(2).mean().backward()
        elif lsq:
            A, b = lsq_data(rank)
            (0.5 * (ddp(A).squeeze(1) - b).pow(2).mean()).backward()
        else:
            x, y = W.make_batch(rank, s, cfg.get("data_seed", 0))
            W.loss_fn(ddp(x), y).backward()
        opt.step()
        if s == cfg.get("perturb_after_step"):
            g = torch.Generator().manual_seed(999 + rank)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * cfg.get("perturb_scale", 0.1))
        if cfg.get("record", True):
            out["after_step"].append(_params(model))
        if s == cfg.get("kw", {}).get("warmup_steps", 1) - 1:  # the state a reference may start from
            out["momentum_after_warmup"] = {n: opt.state[p]["momentum_buffer"].clone()
                                            for n, p in model.named_parameters()
                                            if opt.state.get(p, {}).get("momentum_buffer") is not None}
        # bytes closed into the stats + bytes of a post-step collective not yet closed
        out["cum_bytes"].append(state.stats()["bytes_sent_total"] + state.comm.bytes_sent)
    out["before_sync"] = before_sync  # after each optimizer step, before a model-side sync
    out["final"] = _params(model)
    out["layouts"] = {s: [b[i] for i in range(len(b))] for s, b in layouts.items()}
    out["stats"] = state.stats()
    out["seconds"] = time.perf_counter() - start
    out["extra"] = getattr(state, "diagnostics", lambda: None)()
    return out


def train_configs(rank: int, world_size: int, configs: list, steps: int) -> list:
    return [train_one(rank, world_size, cfg, cfg.get("steps", steps)) for cfg in configs]


# One spawn per world size for all three algorithm test files: each registers its configurations at
# import (collection) time; the first fixture that needs a world size trains every registered suite.
_SUITES: dict = {}   # suite -> configs(world_size) -> list of configuration dicts
_SHARED: dict = {}   # world_size -> suite -> {name: (cfg, [rank 0 result, ...])}


def register_suite(suite: str, configs) -> None:
    _SUITES[suite] = configs


def run_suite(suite: str, world_size: int, steps: int, timeout: float = 900) -> dict:
    done = _SHARED.setdefault(world_size, {})
    if suite not in done:
        pending = [s for s in _SUITES if s not in done]
        cfgs = [(s, c) for s in pending for c in _SUITES[s](world_size)]
        per_rank = run_ranks(train_configs, world_size, [c for _, c in cfgs], steps, timeout=timeout)
        for s in pending:
            done[s] = {}
        for k, (s, c) in enumerate(cfgs):
            done[s][c["name"]] = (c, [r[k] for r in per_rank])
    return done[suite]


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[n] - b[n]).abs().max().item() for n in a)


def per_step_bytes(r: dict) -> list:
    c = r["cum_bytes"]
    return [c[0]] + [c[s] - c[s - 1] for s in range(1, len(c))]
