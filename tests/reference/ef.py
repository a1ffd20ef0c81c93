"""Reference error feedback, W workers in one process (docs/algorithms.md §2).

Per bucket b and rank i, residual e (fp32, zero at start):
    p_i = g_i + e_i ;  Δ_i = C(p_i) ;  e_i = p_i − Δ_i ;  every rank applies avg_j Δ_j
with the mask key (seed, step, bucket index, "c1"). Steps before ``warmup_steps`` are plain
averages and leave e untouched. ``error_feedback=False``: Δ_i = C(g_i), no residual (plain
compressed SGD). A bucket of fewer than ``min_compress_numel`` elements is always a plain average.
``residual_dtype="bf16"``: e is rounded to bfloat16 after every update (p is formed in fp32).
"""
from __future__ import annotations

import torch

from .common import World, average, run_bucketed
from .masks import RefCompressor


def simulate_ef(world: World, steps: int, layouts, compressor: str, seed: int = 0, warmup_steps: int = 1,
                history: list | None = None, error_feedback: bool = True, min_compress_numel: int = 0,
                residual_dtype: str = "fp32"):
    comp = RefCompressor(compressor)
    residual: dict = {}

    def transform(step, b, grads):
        if grads[0].numel() < min_compress_numel:
            return [average(grads)] * len(grads)
        e = residual.setdefault(b, [g.new_zeros(g.shape) for g in grads])
        deltas = []
        for i, g in enumerate(grads):
            p = g + e[i] if error_feedback else g
            d = comp(p, seed, step, b, "c1")
            if error_feedback:
                e[i] = p - d
                if residual_dtype == "bf16":
                    e[i] = e[i].to(torch.bfloat16).to(torch.float32)
            deltas.append(d)
        avg = average(deltas)
        return [avg] * len(grads)

    return run_bucketed(world, steps, layouts, warmup_steps, transform, history=history)
