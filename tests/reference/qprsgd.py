"""Reference QPRSGD, W workers in one process (docs/algorithms.md §4 as read in cser_hooks' module
docstring; no code shared with cser_hooks).

Rounds end after the optimizer step of steps s >= warmup with (s + 1) % K == 0; Q's stochastic
rounding uses the key (seed, s, bucket, "q", rank) of ``reference.qsparse.rank_uniforms``.
All-reduce:  Δ_i = (e_i + x_i) − x_last ; q_i = Q(Δ_i) ; e_i = Δ_i − q_i ;
             x_last += Σ_j q_j / n (rank order) ; x_i = x_last
Gossip (ring; w = 1/3 for self, left, right; n = 2: 1/3 self, 2/3 the other rank):
             Δ_i = x_i − x̂_i ; q_i = Q(Δ_i) ; x̂_i += q_i ; s_i += w_ii q_i + w q_left + w q_right ;
             x_i += γ (s_i − x̂_i)
The reference keeps every rank's public copy x̂_j explicitly and checks s_i = Σ_j w_ij x̂_j (to
1e-5) at every round, so the incremental mixing is itself verified.
"""
from __future__ import annotations

import torch

from .common import layout_at
from .qsparse import QComp, average_divide_first


def ring_weights(n: int) -> torch.Tensor:
    w = torch.zeros(n, n)
    for i in range(n):
        w[i, i] += 1 / 3 if n > 1 else 1.0
        if n > 1:
            w[i, (i - 1) % n] += 1 / 3
            w[i, (i + 1) % n] += 1 / 3 if n > 2 else 0.0
            if n == 2:
                w[i, 1 - i] = 2 / 3
    return w


def simulate_qprsgd(world, steps: int, layouts, compressor: str, period: int, mode: str, gamma: float = 1.0,
                    seed: int = 0, warmup_steps: int = 1, history: list | None = None, start: int = 0):
    """Final parameters per rank (``world``: a ``TorchWorld``). ``history`` gets per-step snapshots."""
    n = world.W
    comp = QComp(compressor, seed)
    W = ring_weights(n)
    state: dict = {}

    def round_(s, layout):
        for b in range(len(layout)):
            x = [layout.flat(world.x[i], b) for i in range(n)]
            st = state[b]
            if mode == "allreduce":
                acc = torch.zeros_like(st["xlast"])
                for i in range(n):
                    delta = (st["e"][i] + x[i]) - st["xlast"]
                    q = comp(delta, s, b, i)
                    st["e"][i] = delta - q
                    acc.add_(q, alpha=1.0 / n)
                st["xlast"] = st["xlast"] + acc
                new = [st["xlast"]] * n
            else:
                q = [comp(x[i] - st["xhat"][i], s, b, i) for i in range(n)]
                new = []
                for i in range(n):
                    st["mix"][i] = st["mix"][i].add(q[i], alpha=W[i, i].item())
                    nbrs = [(1 - i, 2 / 3)] if n == 2 else [((i - 1) % n, 1 / 3), ((i + 1) % n, 1 / 3)]
                    for j, w in nbrs:  # s + (w·q_j): the product rounded once, then the sum
                        st["mix"][i] = st["mix"][i] + q[j] * w
                for i in range(n):
                    st["xhat"][i] = st["xhat"][i] + q[i]
                for i in range(n):
                    explicit = sum(W[i, j].item() * st["xhat"][j] for j in range(n))
                    assert (explicit - st["mix"][i]).abs().max() <= 1e-5, "s_i != Σ_j w_ij x̂_j"
                    new.append(x[i].add(st["mix"][i] - st["xhat"][i], alpha=gamma))
            for i in range(n):
                world.x[i].update(layout.split(new[i], b))

    for s in range(start, steps):
        grads = world.grads(s)
        if s < warmup_steps:
            avg = {k: average_divide_first([g[k] for g in grads]) for k in grads[0]}
            grads = [avg] * n
        else:
            layout = layout_at(layouts, s)
            for b in range(len(layout)):
                if b not in state:
                    flat = layout.flat(world.x[0], b)
                    state[b] = {"xlast": flat.clone(), "e": [torch.zeros_like(flat) for _ in range(n)],
                                "xhat": [flat.clone() for _ in range(n)], "mix": [flat.clone() for _ in range(n)]}
        for i in range(n):
            world.sgd_step(i, grads[i])
        if s >= warmup_steps and (s + 1) % period == 0:
            round_(s, layout_at(layouts, s))
        if history is not None:
            history.append(world.snapshot())
    return world.x
