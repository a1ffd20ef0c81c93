"""CompSkipDSGD: compressed and skipped communication (docs/algorithms.md §5; IEEE Access 11, 2023).

Per bucket, on every rank (all ranks take the same decision, so collectives stay matched):
    skip round:  reserve_i += g_i ;  ĝ = 0                      (nothing sent, replicas stay equal)
    send round:  p_i = reserve_i + g_i + e_i ;  Δ_i = C(p_i) ;  e_i = p_i − Δ_i ;  reserve_i = 0
                 ĝ = avg_j Δ_j

Schedules (exactly one):
  send_every=k   send on steps s with (s + 1) % k == 0 (k = 1: never skip, i.e. EF).
  send_steps=[...] send exactly on those steps (steps not listed are skipped).
  adaptive=τ     send when ||reserve_i|| >= τ ||g_i|| on *any* rank, or after ``max_skips``
                 consecutive skips; decided by one 1-element MAX allreduce per bucket (blocking:
                 costs a host sync per bucket, the price of a data-dependent schedule).
Only the abstract was available: these rules are our reading of "skip and reserve it for future
iterations" (docs/algorithms.md §5). With momentum SGD, skipped rounds still step the optimizer with a
zero gradient (momentum continues), identically on every rank.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..compressors import get_compressor
from ..compressors.base import is_real
from ..exchange import Exchange, Kind, StepContext
from ..knobs import integer_knob
from ..state import AlgorithmState
from .compressed_average import decode_average, encode_average


class CompSkip(AlgorithmState):
    """CompSkip state. Knobs: ``compressor`` (as EF), one schedule (see module docstring),
    ``max_skips`` (adaptive only). Skipping k−1 of k rounds divides traffic by k on top of C's ratio;
    the reserved gradient is sent later, so little is lost while k stays well below the lr's horizon.
    """

    algorithm = "compskip"
    __slots__ = ("compressor", "send_every", "send_steps", "adaptive", "max_skips", "_skips")
    persisted = (("_skips", "skips"),)

    def __init__(self, comm, compressor="random_block:ratio=1/16", *, send_every: int | None = None,
                 send_steps: Iterable[int] | None = None, adaptive: float | None = None, max_skips: int = 8,
                 **kw):
        given = [x is not None for x in (send_every, send_steps, adaptive)]
        if sum(given) > 1:
            raise ValueError("CompSkip: give exactly one schedule: send_every=k, send_steps=[...] or adaptive=tau")
        if not any(given):
            send_every = 2
        self.compressor = get_compressor(compressor)
        self.send_every = None if send_every is None else integer_knob("CompSkip", "send_every", send_every, 1)
        self.send_steps = None
        if send_steps is not None:
            steps = [] if isinstance(send_steps, (str, bytes)) or not isinstance(send_steps, Iterable) else list(
                send_steps)
            if not steps:  # nothing would ever be sent
                raise ValueError(f"CompSkip: send_steps must be a non-empty list of integers >= 0 (the steps that "
                                 f"send), got {send_steps!r}")
            self.send_steps = frozenset(integer_knob("CompSkip", "send_steps entry", s, 0) for s in steps)
        if adaptive is not None and not (is_real(adaptive) and 0 <= adaptive < math.inf):
            raise ValueError(f"CompSkip: adaptive (τ) must be a finite number >= 0, got {adaptive!r}")
        self.adaptive = None if adaptive is None else float(adaptive)
        self.max_skips = integer_knob("CompSkip", "max_skips", max_skips, 1)
        self._skips = {}
        super().__init__(comm, **kw)

    def config(self):
        return {**super().config(), "compressor": self.compressor.spec(), "send_every": self.send_every,
                "send_steps": sorted(self.send_steps) if self.send_steps is not None else None,
                "adaptive": self.adaptive, "max_skips": self.max_skips}

    def sends(self, grad: torch.Tensor, ctx: StepContext) -> bool:
        s = ctx.step
        if self.send_every is not None:
            return (s + 1) % self.send_every == 0
        if self.send_steps is not None:
            return s in self.send_steps
        reserve = self.buffer(ctx.key, "reserve", ctx.numel, grad.device)
        want = bool(self._skips.get(ctx.key, 0) >= self.max_skips)
        vote = torch.tensor([1.0 if want else 0.0], device=grad.device)
        if not want:
            vote = (reserve.norm() >= self.adaptive * grad.float().norm()).to(torch.float32).view(1)
        return bool(self.comm.allreduce_max(vote).item() > 0)

    def encode(self, grad, ctx: StepContext) -> Exchange:
        reserve = self.buffer(ctx.key, "reserve", ctx.numel, grad.device)
        if not self.sends(grad, ctx):
            if self.guard is not None:  # skip policy: a non-finite local gradient is dropped, not reserved
                grad = torch.where(torch.isfinite(grad.sum(dtype=torch.float32)), grad, torch.zeros_like(grad))
            reserve.add_(grad)
            self._skips[ctx.key] = self._skips.get(ctx.key, 0) + 1
            return Exchange(Kind.NONE)
        self._skips[ctx.key] = 0
        e = self.buffer(ctx.key, "e", ctx.numel, grad.device)
        self.rescale_on_lr_change(ctx.key, ("e", "reserve"))
        e.add_(reserve).add_(grad)
        reserve.zero_()
        return encode_average(self, self.compressor_for(self.compressor, ctx), e, ctx)

    def decode(self, grad, received, ctx):
        ex = ctx.exchange
        if ex.kind is Kind.NONE:
            return grad.zero_()
        return decode_average(self, self.compressor_for(self.compressor, ctx), grad, received, ex, ctx)

