"""Error feedback (EF-SGD), docs/algorithms.md §2.

    p_i = g_i + e_i ;  Δ_i = C(p_i) ;  e_i ← p_i − Δ_i ;  ĝ = avg_j Δ_j      (every rank applies ĝ)

Code map: ``encode`` adds the gradient into the residual buffer ``e`` (p = g + e, in place) and
compresses it with feedback (e ← p − C(p)); ``decode`` writes avg_j C(p_j) into the gradient.
Shared-mask compressors go through one allreduce, the others through one allgather.

Learning-rate changes: the residual is in gradient units; when the state is given the optimizer,
e is multiplied by η_{t−1}/η_t whenever the first param group's lr changes (Zheng et al. 2019, dist-EF-SGDM).
Without the optimizer, a constant η is assumed.

``residual_dtype="bf16"`` stores e in bfloat16 (half the state memory): p = g + e is formed in a
reused fp32 scratch (one per device, shared by the keys: nothing of it outlives the hook call), C(p)
and p − C(p) are computed in fp32 as usual, and only the new residual is rounded to bf16 (round to
nearest even). The rounding error, at most 2⁻⁸ relative per entry per step, is itself not fed back.
"""
from __future__ import annotations

import torch

from ..compressors import get_compressor
from ..exchange import StepContext
from ..state import AlgorithmState
from .compressed_average import decode_average, encode_average

RESIDUAL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ErrorFeedback(AlgorithmState):
    """EF with any compressor.

    Knobs:
      compressor: the registry string, e.g. ``"top_k:ratio=1/64"`` or ``"random_block:ratio=1/32"``.
        Smaller ratios send less but need more steps; EF makes even 1/256 converge, usually with a
        warm-up of dense steps.
      error_feedback: False keeps no residual: ĝ = avg_j C(g_j), plain compressed SGD (for comparison, and
        the Horovod front end's RandomBlockCompression / RandomKCompression).
      residual_dtype: ``"fp32"`` (default) or ``"bf16"``: the residual's storage (module docstring);
        ``stats()["state_bytes"]`` shows the memory it takes.
      warmup_steps: dense allreduce steps first (>= 1 for DDP, which rebuilds buckets after step 0).
    """

    algorithm = "ef"
    __slots__ = ("compressor", "error_feedback", "residual_dtype")

    def __init__(self, comm, compressor="random_block:ratio=1/32", *, error_feedback: bool = True,
                 residual_dtype: str = "fp32", **kw):
        self.compressor = get_compressor(compressor)
        if error_feedback not in (True, False):  # bool("no") is True
            raise ValueError(f"EF: error_feedback must be True or False, got {error_feedback!r}")
        if residual_dtype not in RESIDUAL_DTYPES:
            raise ValueError(f"EF: residual_dtype must be one of {sorted(RESIDUAL_DTYPES)} (the residual's storage), "
                             f"got {residual_dtype!r}")
        self.error_feedback = bool(error_feedback)
        self.residual_dtype = residual_dtype
        super().__init__(comm, **kw)

    def config(self):
        return {**super().config(), "compressor": self.compressor.spec(), "error_feedback": self.error_feedback,
                **({"residual_dtype": self.residual_dtype} if self.residual_dtype != "fp32" else {})}

    def encode(self, grad, ctx: StepContext):
        comp = self.compressor_for(self.compressor, ctx)
        if not self.error_feedback:  # no residual kept (not even a zero one)
            return encode_average(self, comp, grad, ctx, feedback=False)
        e = self.buffer(ctx.key, "e", ctx.numel, grad.device, RESIDUAL_DTYPES[self.residual_dtype])
        self.rescale_on_lr_change(ctx.key, ("e",))
        if e.dtype == torch.float32:
            e.add_(grad)
            return encode_average(self, comp, e, ctx)
        p = self.scratch(ctx.numel, grad.device)  # fp32 p = g + e when e is stored in bf16
        torch.add(grad, e, out=p)
        ex = encode_average(self, comp, p, ctx)  # p <- p - C(p); the payload is a copy
        e.copy_(p)
        return ex

    def decode(self, grad, received, ctx):
        return decode_average(self, self.compressor_for(self.compressor, ctx), grad, received,
                              ctx.exchange, ctx)
