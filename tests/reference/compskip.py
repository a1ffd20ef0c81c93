"""Reference CompSkip (compressed and skipped communication), W workers (docs/algorithms.md §5).

Per bucket b and rank i: reserve r and residual e, fp32 zero at start. A step s >= warmup_steps
sends iff ``(s + 1) % send_every == 0`` (or ``s in send_steps`` when a list is given):
    skip:  r_i += g_i ; the returned gradient is 0
    send:  p_i = r_i + g_i + e_i ; Δ_i = C(p_i) ; e_i = p_i − Δ_i ; r_i = 0 ; return avg_j Δ_j
Mask key (seed, step, bucket index, "c1"). Warm-up steps are plain averages.
"""
from __future__ import annotations

from .common import World, average, run_bucketed
from .masks import RefCompressor


def sends(step: int, send_every: int | None, send_steps) -> bool:
    if send_steps is not None:
        return step in set(send_steps)
    return (step + 1) % send_every == 0


def simulate_compskip(world: World, steps: int, layouts, compressor: str, send_every: int | None = 2,
                      send_steps=None, seed: int = 0, warmup_steps: int = 1, history: list | None = None):
    comp = RefCompressor(compressor)
    reserve: dict = {}
    residual: dict = {}

    def transform(step, b, grads):
        r = reserve.setdefault(b, [g.new_zeros(g.shape) for g in grads])
        e = residual.setdefault(b, [g.new_zeros(g.shape) for g in grads])
        if not sends(step, send_every, send_steps):
            for i, g in enumerate(grads):
                r[i] = r[i] + g
            return [g.new_zeros(g.shape) for g in grads]
        deltas = []
        for i, g in enumerate(grads):
            p = r[i] + g + e[i]
            d = comp(p, seed, step, b, "c1")
            e[i] = p - d
            r[i] = g.new_zeros(g.shape)
            deltas.append(d)
        avg = average(deltas)
        return [avg] * len(grads)

    return run_bucketed(world, steps, layouts, warmup_steps, transform, history=history)
