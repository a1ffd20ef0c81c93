"""Reference dist-EF-SGDM, W workers in one process (docs/algorithms.md §6; no code shared with cser_hooks).

Written from the spec, in gradient units (the user's SGD with lr η applies the returned Δ):
    m_i ← μ m_i + g_i ;  v_i = g_i + μ m_i (Nesterov) or m_i ;  p_i = v_i + e_i
    per chunk r of the bucket:  Δ_i[r] = C(p_i[r]) ;  e_i[r] = p_i[r] − Δ_i[r]
    server of chunk r:  p̄ = Σ_j (1/n) Δ_j[r] + ẽ_r ;  Δ[r] = C(p̄) ;  ẽ_r = p̄ − Δ[r]
    every rank: x ← x − η (Δ + λ x)        (λ: the optimizer's weight decay, outside compression)
C(v)_B = (Σ_B |v| / |B|)·sign(v_B) with sign(0) = +1. Chunks of a bucket of N elements on n ranks:
[min(r·⌈N/n⌉, N), min((r+1)·⌈N/n⌉, N)). Blocks: the bucket's parameter tensors (or fixed blocks of
b elements counted from the bucket start), cut at the chunk boundaries. When the lr changes from
η' to η (at a post-warm-up step), e and ẽ are multiplied by η'/η. Warm-up steps average the
gradients and leave m, e, ẽ alone.
"""
from __future__ import annotations

import math

import torch

from .common import Layout, layout_at
from .qsparse import average_divide_first, sign_scale


def sign_c(v: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    """Dense C(v) for blocks [cuts[k], cuts[k+1])."""
    out = torch.empty_like(v)
    for a, b in zip(cuts, cuts[1:]):
        scale = sign_scale(v[a:b])
        out[a:b] = torch.where(v[a:b] >= 0, scale, -scale)
    return out


def chunks_and_blocks(sizes: list[int], world_size: int, block: int | None):
    """[(a, b, block cuts relative to a)] per chunk."""
    N = sum(sizes)
    c = math.ceil(N / world_size)
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s)
    global_cuts = list(range(0, N, block)) if block else starts
    out = []
    for r in range(world_size):
        a, b = min(r * c, N), min((r + 1) * c, N)
        cuts = sorted({a, b} | {x for x in global_cuts if a < x < b})
        out.append((a, b, [x - a for x in cuts]))
    return out


def simulate_dist_ef_sgdm(init: dict, grad_fn, world_size: int, steps: int, layouts, lr_at, momentum: float,
                          nesterov: bool = False, block: int | None = None, weight_decay: float = 0.0,
                          warmup_steps: int = 1, rescale_errors: bool = True, start: int = 0):
    """Final parameters per rank. ``lr_at(step)`` is the lr of that step's optimizer step.
    ``rescale_errors=False`` drops the η'/η correction (a wrong reference, for the tests' teeth).
    ``start`` = warmup_steps: ``init`` is the model after the warm-up (the loop starts there)."""
    n = world_size
    x = [{k: t.detach().clone().float() for k, t in init.items()} for _ in range(n)]
    m: dict = {}
    e: dict = {}
    es: dict = {}
    last_lr: dict = {}
    for s in range(start, steps):
        lr = lr_at(s)
        grads = [grad_fn(x[i], i, s) for i in range(n)]
        if s < warmup_steps:
            upd = [{k: average_divide_first([g[k] for g in grads]) for k in grads[0]}] * n
        else:
            layout: Layout = layout_at(layouts, s)
            upd = [{} for _ in range(n)]
            for b in range(len(layout)):
                sizes = [layout.shapes[k].numel() for k in layout.buckets[b]]
                plan = chunks_and_blocks(sizes, n, block)
                g = [layout.flat(grads[i], b) for i in range(n)]
                mb = m.setdefault(b, [torch.zeros_like(g[0]) for _ in range(n)])
                eb = e.setdefault(b, [torch.zeros_like(g[0]) for _ in range(n)])
                esb = es.setdefault(b, [torch.zeros(hi - lo) for lo, hi, _ in plan])
                if rescale_errors and b in last_lr and last_lr[b] != lr:
                    for i in range(n):
                        eb[i] = eb[i] * (last_lr[b] / lr)
                        esb[i] = esb[i] * (last_lr[b] / lr)
                last_lr[b] = lr
                deltas = []
                for i in range(n):
                    mb[i] = momentum * mb[i] + g[i]
                    # p = v + e, v = g + μ m (Nesterov) or m; evaluated as (e + g) + μ·m, the package's
                    # order, so both round alike (last bits decide signs of near-zero elements)
                    p = eb[i].add(g[i]).add(mb[i], alpha=momentum) if nesterov else eb[i] + mb[i]
                    d = torch.cat([sign_c(p[lo:hi], cuts) for lo, hi, cuts in plan])
                    eb[i] = p - d
                    deltas.append(d)
                out = []
                for r, (lo, hi, cuts) in enumerate(plan):
                    pbar = torch.zeros(hi - lo)
                    for j in range(n):
                        pbar = pbar.add(deltas[j][lo:hi], alpha=1.0 / n)   # the package's rounding
                    pbar = pbar + esb[r]
                    d = sign_c(pbar, cuts)
                    esb[r] = pbar - d
                    out.append(d)
                flat = torch.cat(out)
                for i in range(n):
                    upd[i].update(layout.split(flat, b))
        for i in range(n):
            for k in x[i]:
                d = upd[i][k]
                if weight_decay:
                    d = d.add(x[i][k], alpha=weight_decay)
                x[i][k] = x[i][k].add(d, alpha=-lr)         # torch.optim.SGD's rounding
    return x
