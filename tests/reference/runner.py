"""Run the reference for a configuration dict of ``tests/ddp_workload.py`` (same keys)."""
from __future__ import annotations

from .common import Layout, World
from .compskip import simulate_compskip
from .cser import simulate_cser_hookform, simulate_cser_paper, simulate_mcser_paper
from .ef import simulate_ef


def layouts_from_record(recorded: dict, shapes: dict, steps: int) -> list:
    """``{step: [names of bucket 0, names of bucket 1, ...]}`` -> one Layout (or None) per step."""
    return [Layout(recorded[s], shapes) if s in recorded else None for s in range(steps)]


def simulate(cfg: dict, init: dict, grad_fn, world_size: int, steps: int, layouts, lr: float,
             history: list | None = None, form: str = "hook", **override):
    """Final parameters of every rank. ``form="paper"`` selects CSER's explicit-error form (M-CSER's
    when ``state_momentum`` > 0: the momentum the hook state applies before C1; ``momentum`` is
    always that of the torch.optim.SGD outside).

    ``override`` replaces configuration entries (e.g. ``seed=1`` for a test that must fail).
    """
    cfg = {**cfg, **override}
    world = World(init, world_size, grad_fn, lr, cfg.get("momentum", 0.0))
    common = dict(seed=cfg.get("seed", 0), warmup_steps=cfg.get("warmup_steps", 1), history=history)
    algo = cfg["algo"]
    if algo == "ef":
        return simulate_ef(world, steps, layouts, cfg["compressor"], error_feedback=cfg.get("error_feedback", True),
                           min_compress_numel=cfg.get("min_compress_numel", 0),
                           residual_dtype=cfg.get("residual_dtype", "fp32"), **common)
    if algo == "compskip":
        return simulate_compskip(world, steps, layouts, cfg["compressor"], send_every=cfg.get("send_every"),
                                 send_steps=cfg.get("send_steps"), **common)
    if algo == "cser":
        args = (world, steps, layouts, cfg["c1"], cfg["c2"], cfg["period"])
        mom = dict(momentum=cfg.get("state_momentum", 0.0), nesterov=cfg.get("nesterov", False))
        if form == "paper" and mom["momentum"]:
            return simulate_mcser_paper(*args, **mom, **common)
        if form == "paper":
            return simulate_cser_paper(*args, **common)
        return simulate_cser_hookform(*args, shifted=not cfg.get("give_optimizer", True),
                                      reset_schedule=cfg.get("reset_schedule", "burst"), **mom, **common)
    if algo in ("none", "torch_allreduce"):  # plain averaging at every step
        return simulate_ef(world, steps, layouts, "identity", **{**common, "warmup_steps": steps})
    raise ValueError(f"unknown algo {algo!r}")
