"""The building block shared by EF and CompSkip: send C(p) with error feedback, receive avg_j C(p_j).

    Δ_i = C(p_i) ;  e_i ← p_i − Δ_i ;  ĝ = avg_j Δ_j            (docs/algorithms.md §2)

``p`` is the fp32 residual buffer into which the caller has already added what is to be sent; it
is overwritten with the new residual in the same pass as the compression (``compress_ef``).
Without error feedback (plain compressed SGD, for contrast) ``encode_average(..., feedback=False)``
sends C(g_i) straight from the gradient and keeps no residual.
"""
from __future__ import annotations

import time

import torch

from ..exchange import Exchange, StepContext, average_into, exchange_for
from ..nonfinite import nonfinite_flag
from ..state import AlgorithmState


def encode_average(state: AlgorithmState, comp, x: torch.Tensor, ctx: StepContext, feedback: bool = True
                   ) -> Exchange:
    """feedback: Δ_i = C(p_i) and p_i ← p_i − Δ_i in one pass (``compress_ef``; ``x`` is the residual
    buffer p). Without: Δ_i = C(g_i) from the gradient ``x``, nothing kept."""
    t0 = time.perf_counter()
    by_payload = comp.nonfinite_in_payload  # the flag from the payload, which shows every NaN/Inf: no pass over x
    flag = nonfinite_flag(x) if state.check_finite and not by_payload else None
    mk = state.mask_key(ctx, "c1")
    payload = comp.compress_ef(x, mk, ctx.segments) if feedback else comp.compress(x, mk, ctx.segments)
    if state.check_finite and by_payload:
        flag = nonfinite_flag(comp.nonfinite_witness(payload))
    ex = exchange_for(comp, payload, flag)
    state.timed(t0)
    return ex


def decode_average(state: AlgorithmState, comp, grad: torch.Tensor, received, ex: Exchange, ctx: StepContext
                   ) -> torch.Tensor:
    t0 = time.perf_counter()
    mk = state.mask_key(ctx, "c1")
    flag = average_into(comp, ex, received, grad, mk, ctx.segments, state.comm.world_size)
    state.timed(t0)
    if flag is not None:
        state.check_flag(flag, ctx, grad)
    return grad
