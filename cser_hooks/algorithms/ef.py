"""Error feedback (EF-SGD), ALGORITHMS.md §2.

    p_i = g_i + e_i ;  Δ_i = C(p_i) ;  e_i ← p_i − Δ_i ;  ĝ = avg_j Δ_j      (every rank applies ĝ)

Code map: ``encode`` adds the gradient into the residual buffer ``e`` (p = g + e, in place) and
compresses it with feedback (e ← p − C(p)); ``decode`` writes avg_j C(p_j) into the gradient.
Shared-mask compressors go through one allreduce, the others through one allgather.

Learning-rate changes: the residual is in gradient units; when the state is given the optimizer,
e is multiplied by η_{t−1}/η_t whenever the first param group's lr changes (seed 003's correction).
Without the optimizer, a constant η is assumed.
"""
from __future__ import annotations

from ..compressors import get_compressor
from ..state import AlgorithmState, StepContext
from .compressed_average import decode_average, encode_with_feedback


class ErrorFeedback(AlgorithmState):
    """EF with any compressor.

    Knobs:
      compressor: the registry string, e.g. ``"top_k:ratio=1/64"`` or ``"random_block:ratio=1/32"``.
        Smaller ratios send less but need more steps; EF makes even 1/256 converge, usually with a
        warm-up of dense steps.
      error_feedback: False drops the residual (plain compressed SGD; only for comparison).
      warmup_steps: dense allreduce steps first (>= 1 for DDP, which rebuilds buckets after step 0).
    """

    algorithm = "ef"
    __slots__ = ("compressor", "error_feedback", "_lr_of")

    def __init__(self, comm, compressor="random_block:ratio=1/32", *, error_feedback: bool = True, **kw):
        self.compressor = get_compressor(compressor)
        self.error_feedback = bool(error_feedback)
        self._lr_of = {}
        super().__init__(comm, **kw)

    def config(self):
        return {**super().config(), "compressor": self.compressor.spec(), "error_feedback": self.error_feedback}

    def encode(self, grad, ctx: StepContext):
        e = self.buffer(ctx.key, "e", ctx.numel, grad.device)
        rescale_on_lr_change(self, ctx.key, ("e",))
        e.add_(grad)
        return encode_with_feedback(self, self.compressor_for(self.compressor, ctx), e, ctx, self.error_feedback)

    def decode(self, grad, received, ctx):
        return decode_average(self, self.compressor_for(self.compressor, ctx), grad, received,
                              ctx.extra["exchange"], ctx)

    def state_dict(self):
        return {**super().state_dict(), "lr_of": dict(self._lr_of)}

    def load_state_dict(self, sd):
        super().load_state_dict(sd)
        self._lr_of = dict(sd.get("lr_of", {}))



def rescale_on_lr_change(state: AlgorithmState, key, names) -> None:
    """e ← e · η_{t−1}/η_t when the optimizer's lr changed since this key's last step.

    The residuals are kept in gradient units: the unsent part would have been applied with the old
    rate, so it is rescaled to keep η·e unchanged (seed 003's correction). Needs the optimizer.
    """
    if state.optimizer is None:
        return
    lr = state.optimizer.param_groups[0]["lr"]
    last = state._lr_of.get(key)
    state._lr_of[key] = lr
    if last is None or lr == last or lr == 0:
        return
    for n in names:
        t = state.buffers.get(key, {}).get(n)
        if t is not None:
            t.mul_(last / lr)
