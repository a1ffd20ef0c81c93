"""Reference CSER (error reset with partial synchronization), W workers (ALGORITHMS.md §3).

Two independent formulations:

``simulate_cser_paper`` is the paper's algorithm with explicit local models x_i and errors e_i
(plain SGD, learning rate η), per bucket b, mask keys (seed, s, b, "c1") and (seed, s, b, "c2"):
    p_i = η g_i ;  c̄ = avg_j C1(p_j) ;  r_i = p_i − C1(p_i)
    x_i ← x_i − c̄ − r_i ;  e_i ← e_i + r_i
    after step s >= warmup_steps with (s + 1) % H == 0:
        ē = avg_j C2(e_j) ;  x_i ← x_i + C2(e_i) − ē ;  e_i ← e_i − C2(e_i)

``simulate_cser_hookform`` is the optimizer-agnostic form the package claims is equivalent: the
optimizer receives ĝ_i = avg_j g_j on the C1 blocks and g_i elsewhere; the reset averages the
C2-selected blocks of the flattened parameters over ranks (C2 = identity: all of them), right
after the optimizer step (``shifted=False``) or, without an optimizer, at the start of the next
step's hook, i.e. after the gradient of step s+1 was computed on the un-reset model
(``shifted=True``). Momentum buffers stay local.
"""
from __future__ import annotations

from .common import Layout, World, allreduce_average, average, layout_at, run_bucketed
from .masks import RefCompressor


def _is_reset_step(step: int, period: int, warmup_steps: int) -> bool:
    return step >= warmup_steps and (step + 1) % period == 0


def simulate_cser_paper(world: World, steps: int, layouts, c1: str, c2: str, period: int, seed: int = 0,
                        warmup_steps: int = 1, history: list | None = None, errors: dict | None = None):
    """Paper form (plain SGD only). ``errors`` (if a dict) receives the final e_i per bucket."""
    if world.momentum != 0.0:
        raise ValueError("the paper form of CSER is written for plain SGD (momentum=0)")
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
            for b in range(len(layout)):
                x = [layout.flat(world.x[i], b) for i in range(world.W)]
                p = [eta * layout.flat(grads[i], b) for i in range(world.W)]
                c = [comp1(p[i], seed, s, b, "c1") for i in range(world.W)]
                cbar = average(c)
                eb = e.setdefault(b, [xi.new_zeros(xi.shape) for xi in x])
                for i in range(world.W):
                    r = p[i] - c[i]
                    x[i] = x[i] - cbar - r
                    eb[i] = eb[i] + r
                if _is_reset_step(s, period, warmup_steps):
                    ce = [comp2(eb[i], seed, s, b, "c2") for i in range(world.W)]
                    ebar = average(ce)
                    for i in range(world.W):
                        x[i] = x[i] + ce[i] - ebar
                        eb[i] = eb[i] - ce[i]
                for i in range(world.W):
                    world.x[i].update(layout.split(x[i], b))
        if history is not None:
            history.append((None, world.snapshot()))
    return world.x


def simulate_cser_hookform(world: World, steps: int, layouts, c1: str, c2: str, period: int, seed: int = 0,
                           warmup_steps: int = 1, shifted: bool = False, history: list | None = None):
    comp1, comp2 = RefCompressor(c1), RefCompressor(c2)

    def transform(step, b, grads):
        mask = comp1.mask(grads[0], seed, step, b, "c1")
        avg = average(grads)
        return [avg.where(mask, g) for g in grads]

    def reset(step, layout):
        for b in range(len(layout)):
            x = [layout.flat(world.x[i], b) for i in range(world.W)]
            mask = comp2.mask(x[0], seed, step, b, "c2")
            avg = average(x)
            for i in range(world.W):
                world.x[i].update(layout.split(avg.where(mask, x[i]), b))

    def after_step(step, layout):
        if _is_reset_step(step, period, warmup_steps):
            reset(step, layout)

    def before_step(step, layout):
        if step >= 1 and _is_reset_step(step - 1, period, warmup_steps):
            reset(step - 1, layout)

    return run_bucketed(world, steps, layouts, warmup_steps, transform,
                        before_step=before_step if shifted else None,
                        after_step=None if shifted else after_step, history=history)
