"""The building block shared by EF and CompSkip: send C(p) with error feedback, receive avg_j C(p_j).

    Δ_i = C(p_i) ;  e_i ← p_i − Δ_i ;  ĝ = avg_j Δ_j            (docs/algorithms.md §2)

``p`` is the fp32 residual buffer into which the caller has already added what is to be sent; it
is overwritten with the new residual in the same pass as the compression (``compress_ef``).
With ``error_feedback=False`` the residual is dropped (plain compressed SGD, for contrast).
"""
from __future__ import annotations

import time

import torch

from ..exchange import average_into, exchange_for
from ..state import AlgorithmState, Exchange, StepContext, nonfinite_flag


def encode_with_feedback(state: AlgorithmState, comp, p: torch.Tensor, ctx: StepContext,
                         error_feedback: bool = True) -> Exchange:
    t0 = time.perf_counter()
    flag = nonfinite_flag(p) if state.check_finite else None
    mk = state.mask_key(ctx, "c1")
    payload = comp.compress_ef(p, mk, ctx.segments)
    if not error_feedback:
        p.zero_()
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
