"""Reference CSER (error reset with partial synchronization), W workers (docs/algorithms.md §3).

Three formulations:

``simulate_cser_paper`` is the paper's algorithm with explicit local models x_i and errors e_i
(plain SGD, learning rate η), per bucket b, mask keys (seed, s, b, "c1") and (seed, s, b, "c2"):
    p_i = η g_i ;  c̄ = avg_j C1(p_j) ;  r_i = p_i − C1(p_i)
    x_i ← x_i − c̄ − r_i ;  e_i ← e_i + r_i
    after step s >= warmup_steps with (s + 1) % H == 0:
        ē = avg_j C2(e_j) ;  x_i ← x_i + C2(e_i) − ē ;  e_i ← e_i − C2(e_i)
C1 may be shared-mask (random_block, identity, zero) or not (top_k: C1(p_j) is rank j's own top-k).

``simulate_mcser_paper`` is the paper's M-CSER: the same, with momentum applied *before* C1. Each
rank keeps its own momentum m_i per parameter (never averaged, not touched by the resets):
    m_i ← β m_i + g_i ;  v_i = g_i + β m_i (Nesterov) or m_i ;  p_i = η v_i
Warm-up steps (s < warmup_steps) are plain averaged gradients applied by plain SGD; m stays zero.

``simulate_cser_hookform`` is the optimizer-agnostic form the package claims is equivalent: the
optimizer receives ĝ_i = avg_j g_j on the C1 blocks and g_i elsewhere (non-linear C1:
ĝ_i = g_i − C1(g_i) + avg_j C1(g_j)); the reset averages the C2-selected blocks of the flattened
parameters over ranks (C2 = identity: all of them), right after the optimizer step
(``shifted=False``) or, without an optimizer, at the start of the next step's hook, i.e. after the
gradient of step s+1 was computed on the un-reset model (``shifted=True``). The optimizer's
momentum buffers stay local. With ``momentum`` > 0 the hook form runs M-CSER: every rank keeps a
momentum buffer per bucket and g_i above is replaced by v_i (the optimizer is then plain SGD).
``reset_schedule="spread"``: a reset after *every* step s >= warmup_steps, of chunk c = (s + 1) mod H of
each flat bucket only, [c·n // H, (c + 1)·n // H), with the C2 mask drawn over the chunk's elements.
"""
from __future__ import annotations

from .common import Layout, World, allreduce_average, average, layout_at, run_bucketed
from .masks import RefCompressor


def _is_reset_step(step: int, period: int, warmup_steps: int) -> bool:
    return step >= warmup_steps and (step + 1) % period == 0


def _paper_bucket_step(x: list, p: list, e: list, comp1, comp2, seed: int, s: int, b, reset: bool) -> list:
    """One step of the paper on one bucket; x, p, e are per-rank flat tensors (e is updated in place)."""
    c = [comp1(pi, seed, s, b, "c1") for pi in p]
    cbar = average(c)
    for i in range(len(x)):
        r = p[i] - c[i]
        x[i] = x[i] - cbar - r
        e[i] = e[i] + r
    if reset:
        ce = [comp2(ei, seed, s, b, "c2") for ei in e]
        ebar = average(ce)
        for i in range(len(x)):
            x[i] = x[i] + ce[i] - ebar
            e[i] = e[i] - ce[i]
    return x


def _simulate_paper(world: World, steps: int, layouts, c1: str, c2: str, period: int, direction,
                    seed: int, warmup_steps: int, history: list | None, errors: dict | None):
    """The paper's loop with p_i = η · direction(i, g_i) (a {name: tensor} dict per rank)."""
    if world.momentum != 0.0:
        raise ValueError("the paper form of CSER is written for plain SGD outside the algorithm (momentum=0)")
    comp1, comp2 = RefCompressor(c1), RefCompressor(c2)
    eta = world.lr
    e = {} if errors is None else errors
    for s in range(steps):
        grads = world.grads(s)
        if s < warmup_steps:
            avg = allreduce_average(grads)
            for i in range(world.W):
                world.sgd_step(i, avg[i])
        else:
            layout: Layout = layout_at(layouts, s)
            v = [direction(i, grads[i]) for i in range(world.W)]
            for b in range(len(layout)):
                x = [layout.flat(world.x[i], b) for i in range(world.W)]
                p = [eta * layout.flat(v[i], b) for i in range(world.W)]
                eb = e.setdefault(b, [xi.new_zeros(xi.shape) for xi in x])
                x = _paper_bucket_step(x, p, eb, comp1, comp2, seed, s, b,
                                       _is_reset_step(s, period, warmup_steps))
                for i in range(world.W):
                    world.x[i].update(layout.split(x[i], b))
        if history is not None:
            history.append((None, world.snapshot()))
    return world.x


def simulate_cser_paper(world: World, steps: int, layouts, c1: str, c2: str, period: int, seed: int = 0,
                        warmup_steps: int = 1, history: list | None = None, errors: dict | None = None):
    """Paper form (plain SGD only). ``errors`` (if a dict) receives the final e_i per bucket."""
    return _simulate_paper(world, steps, layouts, c1, c2, period, lambda i, g: g, seed, warmup_steps,
                           history, errors)


def simulate_mcser_paper(world: World, steps: int, layouts, c1: str, c2: str, period: int, momentum: float,
                         nesterov: bool = False, seed: int = 0, warmup_steps: int = 1,
                         history: list | None = None, errors: dict | None = None):
    """Paper form of M-CSER: m_i ← β m_i + g_i, v_i = g_i + β m_i (Nesterov) or m_i, p_i = η v_i."""
    m: list[dict] = [{} for _ in range(world.W)]

    def direction(i, grad):
        v = {}
        for n, g in grad.items():
            m[i][n] = momentum * m[i][n] + g if n in m[i] else g.clone()
            v[n] = g + momentum * m[i][n] if nesterov else m[i][n]
        return v

    return _simulate_paper(world, steps, layouts, c1, c2, period, direction, seed, warmup_steps, history, errors)


def simulate_cser_hookform(world: World, steps: int, layouts, c1: str, c2: str, period: int, seed: int = 0,
                           warmup_steps: int = 1, shifted: bool = False, momentum: float = 0.0,
                           nesterov: bool = False, history: list | None = None, reset_schedule: str = "burst"):
    comp1, comp2 = RefCompressor(c1), RefCompressor(c2)
    bufs: dict = {}  # M-CSER: bucket -> per-rank momentum of the flat bucket

    def directions(b, grads):
        m = bufs.setdefault(b, [g.new_zeros(g.shape) for g in grads])
        for i, g in enumerate(grads):
            m[i] = momentum * m[i] + g
        return [g + momentum * mi if nesterov else mi for g, mi in zip(grads, m)]

    def transform(step, b, grads):
        v = directions(b, grads) if momentum else grads
        if comp1.shared_mask:
            mask = comp1.mask(v[0], seed, step, b, "c1")
            avg = average(v)
            return [avg.where(mask, vi) for vi in v]
        c = [comp1(vi, seed, step, b, "c1") for vi in v]
        cbar = average(c)
        return [vi - ci + cbar for vi, ci in zip(v, c)]

    spread = reset_schedule == "spread"

    def reset(step, layout):
        for b in range(len(layout)):
            x = [layout.flat(world.x[i], b) for i in range(world.W)]
            n = x[0].numel()
            # spread: chunk c = (step + 1) mod H of the flat bucket, C2 drawn over the chunk alone
            lo, hi = ((step + 1) % period * n // period, ((step + 1) % period + 1) * n // period) if spread else (0, n)
            chunk = [xi[lo:hi] for xi in x]
            mask = comp2.mask(chunk[0], seed, step, b, "c2")
            avg = average(chunk)
            for i in range(world.W):
                new = x[i].clone()
                new[lo:hi] = avg.where(mask, chunk[i])
                world.x[i].update(layout.split(new, b))

    def due(step):
        return step >= warmup_steps if spread else _is_reset_step(step, period, warmup_steps)

    def after_step(step, layout):
        if due(step):
            reset(step, layout)

    def before_step(step, layout):
        if step >= 1 and due(step - 1):
            reset(step - 1, layout)

    return run_bucketed(world, steps, layouts, warmup_steps, transform,
                        before_step=before_step if shifted else None,
                        after_step=None if shifted else after_step, history=history)
