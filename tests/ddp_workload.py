"""The shared DDP training driver of the multi-process tests, and its single-process twin.

One rank function, :func:`train_rank`, trains several configurations in sequence (each with a fresh
model, DDP wrapper, optimizer and hook state) so one spawn of W ranks covers many cases. Each rank
draws its own batch of every step from a generator seeded by (data_seed, rank, step), and
:func:`grad_fn` recomputes exactly that batch's gradient for the reference simulation.

A configuration is a plain dict (picklable):
    name        label
    algo        "ef" | "cser" | "compskip" | "none" (plain DDP, no hook) | "torch_allreduce" (torch's
                allreduce_hook: a check of this driver)
    compressor  EF / CompSkip compressor string;  c1, c2, period: CSER
    send_every, send_steps: CompSkip schedule
    momentum    0.0 or 0.9 (torch.optim.SGD);  give_optimizer: CSER state gets the optimizer
    state_momentum, nesterov: M-CSER, the momentum applied by the CSER state before C1 (then
                momentum = 0: the torch.optim.SGD outside is plain)
    seed, warmup_steps, bucket_cap_mb (None = DDP default), record (keep per-step snapshots)
The rank returns, per configuration, a dict with the initial and final parameters, the bucket
layout seen by the hook at every step, and (if ``record``) snapshots after backward and after
``optimizer.step()`` of every step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IN_FEATURES, HIDDEN, CLASSES = 20, 32, 10
BATCH = 16
LR = 0.1
MODEL_SEED = 1234


def build_model(seed: int = MODEL_SEED) -> nn.Module:
    """20 -> 32 -> 32 -> 10 MLP with biases (2 058 parameters), initialised from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(),
                          nn.Linear(HIDDEN, CLASSES))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() == 1 else p.shape[1] ** -0.5))
    return model


def init_params(seed: int = MODEL_SEED) -> dict:
    return {n: p.detach().clone() for n, p in build_model(seed).named_parameters()}


def make_batch(rank: int, step: int, data_seed: int = 0):
    """Rank's own batch at ``step``: inputs N(0, 1), labels uniform over the classes."""
    gen = torch.Generator().manual_seed(1_000_003 * (data_seed + 1) + 7_919 * rank + step)
    x = torch.randn(BATCH, IN_FEATURES, generator=gen)
    y = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    return x, y


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y)


class GradOracle:
    """grad_fn(params, rank, step) for the reference: the gradient of rank's loss at ``params``."""

    def __init__(self, data_seed: int = 0):
        self.model = build_model()
        self.data_seed = data_seed

    def __call__(self, params: dict, rank: int, step: int) -> dict:
        x, y = make_batch(rank, step, self.data_seed)
        leaves = {n: t.detach().clone().requires_grad_(True) for n, t in params.items()}
        loss = loss_fn(torch.func.functional_call(self.model, leaves, (x,)), y)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        return {n: g.detach() for n, g in zip(leaves, grads)}


def make_state(cfg: dict, optimizer):
    """The package's hook state and hook for ``cfg`` (None, None for plain DDP)."""
    from cser_hooks import ddp as D

    common = dict(process_group=None, seed=cfg.get("seed", 0), warmup_steps=cfg.get("warmup_steps", 1))
    algo = cfg["algo"]
    if algo == "none":
        return None, None
    if algo == "torch_allreduce":  # torch's own hook: checks this driver and its layout recording
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        return None, allreduce_hook
    if algo == "ef":
        return D.EFState(compressor=cfg["compressor"], error_feedback=cfg.get("error_feedback", True),
                         min_compress_numel=cfg.get("min_compress_numel", 0),
                         residual_dtype=cfg.get("residual_dtype", "fp32"), **common), D.ef_hook
    if algo == "cser":
        opt = optimizer if cfg.get("give_optimizer", True) else None
        state = D.CSERState(c1=cfg["c1"], c2=cfg["c2"], period=cfg["period"], optimizer=opt,
                            momentum=cfg.get("state_momentum", 0.0), nesterov=cfg.get("nesterov", False),
                            reset_schedule=cfg.get("reset_schedule", "burst"), **common)
        return state, D.cser_hook
    if algo == "compskip":
        if cfg.get("send_steps") is not None:
            schedule = dict(send_steps=list(cfg["send_steps"]), send_every=None)
        else:
            schedule = dict(send_every=cfg["send_every"])
        return D.CompSkipState(compressor=cfg["compressor"], **schedule, **common), D.compskip_hook
    raise ValueError(f"unknown algo {algo!r}")


def _params(model: nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_one(rank: int, world_size: int, cfg: dict, steps: int) -> dict:
    import time

    from torch.nn.parallel import DistributedDataParallel as DDP

    start = time.perf_counter()
    model = build_model(cfg.get("model_seed", MODEL_SEED))
    name_of = {id(p): n for n, p in model.named_parameters()}
    kwargs = {} if cfg.get("bucket_cap_mb") is None else {"bucket_cap_mb": cfg["bucket_cap_mb"]}
    ddp = DDP(model, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=cfg.get("momentum", 0.0))
    state, hook = make_state(cfg, opt)
    layouts: dict = {}
    current = [0]

    if hook is not None:
        def recording_hook(st, bucket):
            names = [name_of[id(p)] for p in bucket.parameters()]
            layouts.setdefault(current[0], {})[bucket.index()] = names
            return hook(st, bucket)

        ddp.register_comm_hook(state, recording_hook)

    out = {"name": cfg["name"], "init": _params(model), "after_backward": [], "after_step": []}
    for s in range(steps):
        current[0] = s
        x, y = make_batch(rank, s, cfg.get("data_seed", 0))
        opt.zero_grad()
        loss_fn(ddp(x), y).backward()
        if cfg.get("record"):
            out["after_backward"].append(_params(model))
        opt.step()
        if cfg.get("record"):
            out["after_step"].append(_params(model))
    out["final"] = _params(model)
    out["layouts"] = {s: [b[i] for i in range(len(b))] for s, b in layouts.items()}
    out["seconds"] = time.perf_counter() - start
    out["stats"] = state.stats() if state is not None and hasattr(state, "stats") else None
    return out


def train_rank(rank: int, world_size: int, configs: list, steps: int) -> list:
    """Rank function for ``harness.run_ranks``: train every configuration in turn."""
    return [train_one(rank, world_size, cfg, steps) for cfg in configs]


# ---------------------------------------------------------------------------------------------------
# The configurations the DDP test files check, and one cached run of all of them per world size.

STEPS = 30
RB16 = "random_block:ratio=1/16,block=8"
RB4 = "random_block:ratio=1/4,block=8"
TOPK16 = "top_k:ratio=1/16"
# MB: 5 DDP buckets for this model (4.bias+4.weight, 2.bias, 2.weight, 0.bias, 0.weight)
TINY_BUCKETS = 0.0001


def _cser(name, c2, momentum, give_optimizer=True, c1=RB16, **kw):
    return dict(name=name, algo="cser", c1=c1, c2=c2, period=4, momentum=momentum,
                give_optimizer=give_optimizer, record=True, **kw)


def _mcser(name, c2, nesterov, **kw):
    """M-CSER (momentum 0.9 in the state, before C1); the torch.optim.SGD outside is plain."""
    return _cser(name, c2, 0.0, state_momentum=0.9, nesterov=nesterov, **kw)


CONFIGS = [
    dict(name="ef_rb_sgd", algo="ef", compressor=RB16, momentum=0.0),
    dict(name="ef_rb_mom", algo="ef", compressor=RB16, momentum=0.9),
    dict(name="ef_topk_sgd", algo="ef", compressor=TOPK16, momentum=0.0),
    dict(name="ef_topk_mom", algo="ef", compressor=TOPK16, momentum=0.9),
    dict(name="ef_topk_noef", algo="ef", compressor=TOPK16, momentum=0.9, error_feedback=False),
    # residual stored in bf16 (half the memory), several buckets so the fp32 scratch is shared. tol: hook
    # and reference sum in different orders (3e-7 apart in fp32), which now and then flips a residual's
    # bf16 rounding by one ulp (2^-8 relative); measured 7e-5 at W=4, the fp32-residual reference 1.2e-3 off
    dict(name="ef_rb_mom_bf16", algo="ef", compressor=RB16, momentum=0.9, bucket_cap_mb=TINY_BUCKETS,
         residual_dtype="bf16", tol=2.5e-4),
    _cser("cser_full_sgd", "identity", 0.0),
    _cser("cser_full_mom", "identity", 0.9),
    _cser("cser_part_sgd", RB4, 0.0),
    _cser("cser_part_mom", RB4, 0.9),
    _cser("cser_full_sgd_noopt", "identity", 0.0, give_optimizer=False),
    _cser("cser_full_mom_noopt", "identity", 0.9, give_optimizer=False),
    _cser("cser_part_sgd_noopt", RB4, 0.0, give_optimizer=False),
    _cser("cser_part_mom_warmup3", RB4, 0.9, warmup_steps=3),
    # the reset spread over the period (one H-th of each bucket after every step)
    _cser("cser_full_sgd_spread", "identity", 0.0, reset_schedule="spread"),
    _cser("cser_part_mom_spread_buckets", RB4, 0.9, reset_schedule="spread", bucket_cap_mb=TINY_BUCKETS),
    _cser("cser_full_sgd_noopt_spread", "identity", 0.0, give_optimizer=False, reset_schedule="spread"),
    # M-CSER (the paper's momentum variant) and CSER with a non-linear C1 (each rank's own top-k)
    _mcser("mcser_part", RB4, False),
    _mcser("mcser_full", "identity", False),
    _mcser("mcser_full_nesterov", "identity", True),
    _cser("cser_topk_part_sgd", RB4, 0.0, c1=TOPK16),
    _cser("cser_topk_full_sgd", "identity", 0.0, c1=TOPK16),
    dict(name="compskip_rb_sgd", algo="compskip", compressor=RB16, send_every=2, momentum=0.0),
    dict(name="compskip_rb_mom", algo="compskip", compressor=RB16, send_every=2, momentum=0.9),
    dict(name="compskip_topk_every3_sgd", algo="compskip", compressor=TOPK16, send_every=3, momentum=0.0),
    dict(name="compskip_steps_mom", algo="compskip", compressor=RB16, send_steps=[1, 2, 6, 7, 8, 13, 21, 28],
         momentum=0.9),
    # many small buckets (docs/algorithms.md §8: per-bucket collectives must stay in order on gloo)
    dict(name="ef_rb_mom_buckets", algo="ef", compressor=RB16, momentum=0.9, bucket_cap_mb=TINY_BUCKETS),
    dict(name="ef_topk_sgd_buckets", algo="ef", compressor=TOPK16, momentum=0.0, bucket_cap_mb=TINY_BUCKETS),
    # the two 32-element bias buckets go dense (min_compress_numel), the three others are compressed
    dict(name="ef_rb_mom_small_dense", algo="ef", compressor=RB16, momentum=0.9, bucket_cap_mb=TINY_BUCKETS,
         min_compress_numel=100),
    _cser("cser_part_mom_buckets", RB4, 0.9, bucket_cap_mb=TINY_BUCKETS),
    _cser("cser_full_sgd_buckets", "identity", 0.0, bucket_cap_mb=TINY_BUCKETS),
    _cser("cser_part_sgd_noopt_buckets", RB4, 0.0, give_optimizer=False,
          bucket_cap_mb=TINY_BUCKETS),
    _mcser("mcser_part_nesterov_buckets", RB4, True, bucket_cap_mb=TINY_BUCKETS),
    dict(name="compskip_rb_mom_buckets", algo="compskip", compressor=RB16, send_every=2, momentum=0.9,
         bucket_cap_mb=TINY_BUCKETS),
    # sanity configurations
    dict(name="cser_c1_identity_sgd", algo="cser", c1="identity", c2=RB4, period=4, momentum=0.0,
         record=True),
    dict(name="plain_ddp_sgd", algo="none", momentum=0.0, record=True),
    dict(name="torch_allreduce_hook_mom", algo="torch_allreduce", momentum=0.9),
]
CONFIG = {c["name"]: c for c in CONFIGS}
_RUNS: dict = {}


def run_all(world_size: int, timeout: float = 400) -> dict:
    """{config name: [rank 0 result, rank 1 result, ...]} for every CONFIGS entry; one spawn per world
    size per test session (shared by the test files that import this module)."""
    if world_size not in _RUNS:
        from harness import run_ranks

        per_rank = run_ranks(train_rank, world_size, CONFIGS, STEPS, timeout=timeout)
        _RUNS[world_size] = {c["name"]: [r[k] for r in per_rank] for k, c in enumerate(CONFIGS)}
    return _RUNS[world_size]
