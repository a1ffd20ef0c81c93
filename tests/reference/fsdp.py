"""Reference of EF and CSER run on the replicate dimension of HSDP (docs/algorithms.md §2, §3), on the
unsharded model, in one process. No code shared with cser_hooks.

R replicas, each holding the full model; replica i's gradient is the average over its S shard ranks'
data. The algorithm runs per (FSDP group, shard s) on the flat shard: the concatenation, over the group's
parameters, of rows [s·c, min((s+1)·c, dim0)) (c = ceil(dim0/S)) flattened, unpadded, keyed
``f"{fqn or '<root>'}#{s}/{S}"`` (the front end's documented keys). Masks come from masks.RefCompressor:
a function of (seed, step, key, salt) and the shard's numel.

    EF:   p_i = g_i + e_i ; Δ_i = C(p_i) ; e_i = p_i − Δ_i ; every replica applies avg_j Δ_j
    CSER: ĝ_i = avg_j C1(g_j) + g_i − C1(g_i) ; after the optimizer step s >= warmup with (s+1) % H == 0:
          x_i ← x_i + avg_j C2(x_j) − C2(x_i)   (C2 a projection: the selected entries averaged)
Warm-up steps: the dense average. Plain SGD x ← x − lr·ĝ.
"""
from __future__ import annotations

import math

import torch

from .masks import RefCompressor


def shard_rows(t: torch.Tensor, s: int, shards: int) -> torch.Tensor:
    rows = t.shape[0]
    c = math.ceil(rows / shards)
    return t[min(s * c, rows):min((s + 1) * c, rows)]


def group_key(fqn: str, s: int, shards: int) -> str:
    return f"{fqn or '<root>'}#{s}/{shards}"


def flat_shard(tensors: dict, names, s: int, shards: int) -> torch.Tensor:
    return torch.cat([shard_rows(tensors[n], s, shards).reshape(-1) for n in names])


def write_shard(tensors: dict, names, s: int, shards: int, flat: torch.Tensor) -> None:
    o = 0
    for n in names:
        part = shard_rows(tensors[n], s, shards)
        part.copy_(flat[o:o + part.numel()].view_as(part))
        o += part.numel()


def simulate(build, groups, data, loss_fn, *, algorithm: str, replicas: int, shards: int, steps: int, lr: float,
             seed: int = 0, warmup_steps: int = 1, compressor: str | None = None, c1: str | None = None,
             c2: str | None = None, period: int = 1, key_fn=group_key, snapshot_steps=()):
    """Returns (list of per-replica {name: tensor}, {step: list of per-replica params} for snapshot_steps).

    build(): the unsharded model (same init as the job); groups: [(fqn, [param names])];
    data(step, rank) -> batch; loss_fn(model, batch) -> scalar. Rank r = i·S + s is replica i."""
    models = [build() for _ in range(replicas)]
    params = [dict(m.named_parameters()) for m in models]
    comp = RefCompressor(compressor if algorithm == "ef" else c1)
    comp2 = RefCompressor(c2) if algorithm == "cser" else None
    e: dict = {}
    snaps = {}
    for step in range(steps):
        grads = []
        for i, m in enumerate(models):
            acc = {n: torch.zeros_like(p) for n, p in params[i].items()}
            for sr in range(shards):
                m.zero_grad()
                loss_fn(m, data(step, i * shards + sr)).backward()
                for n, p in params[i].items():
                    acc[n] += p.grad / shards
            grads.append(acc)
        for fqn, names in groups:
            for s in range(shards):
                key = key_fn(fqn, s, shards)
                g = [flat_shard(grads[i], names, s, shards) for i in range(replicas)]
                if step < warmup_steps:
                    avg = sum(g) / replicas
                    applied = [avg] * replicas
                elif algorithm == "ef":
                    deltas = []
                    for i in range(replicas):
                        p = g[i] + e.get((fqn, s, i), torch.zeros_like(g[i]))
                        d = comp(p, seed, step, key, "c1")
                        e[(fqn, s, i)] = p - d
                        deltas.append(d)
                    avg = sum(deltas) / replicas
                    applied = [avg] * replicas
                else:
                    cs = [comp(g[i], seed, step, key, "c1") for i in range(replicas)]
                    avg = sum(cs) / replicas
                    applied = [avg + g[i] - cs[i] for i in range(replicas)]
                for i in range(replicas):
                    write_shard(grads[i], names, s, shards, applied[i])
        with torch.no_grad():
            for i in range(replicas):
                for n, p in params[i].items():
                    p -= lr * grads[i][n]
            if algorithm == "cser" and step >= warmup_steps and (step + 1) % period == 0:
                for fqn, names in groups:
                    for s in range(shards):
                        key = key_fn(fqn, s, shards)
                        x = [flat_shard(params[i], names, s, shards) for i in range(replicas)]
                        mask = comp2.mask(x[0], seed, step, key, "c2")
                        avg = sum(x) / replicas
                        for i in range(replicas):
                            write_shard(params[i], names, s, shards, torch.where(mask, avg, x[i]))
        if step in snapshot_steps:
            snaps[step] = [{n: p.detach().clone() for n, p in params[i].items()} for i in range(replicas)]
    return [{n: p.detach().clone() for n, p in params[i].items()} for i in range(replicas)], snaps
