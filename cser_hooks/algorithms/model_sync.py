"""Model-side synchronization shared by the local-SGD style algorithms (docs/algorithms.md §3, §4, §7).

Like torch's ``ModelAverager`` (torch.distributed.algorithms.model_averaging): gradients stay local,
and after the optimizer step of the steps where ``sync_due(s)`` the model itself is synchronized.
:class:`ModelSync` keeps, per key, the parameters and the StepContext of the key's last hook call and
runs ``sync`` once per (key, step): from the optimizer's step post-hook when the state has the
optimizer, else from the next step's hook before its bucket is reduced (a one-step shift).
QPRSGD and Qsparse-local-SGD subclass it; CSER's reset writes its region back with :func:`write_pieces`.
"""
from __future__ import annotations

import torch

from ..exchange import Exchange, StepContext
from ..nonfinite import local_step_exchange, local_step_verdict, nonfinite_flag
from ..state import AlgorithmState


def flat_params(params) -> torch.Tensor:
    """The parameters as one flat fp32 tensor (a copy), in the key's order."""
    return torch.cat([p.detach().reshape(-1).float() for p in params])


def write_pieces(pieces, flat: torch.Tensor) -> None:
    """Copy ``flat`` into the (parameter, start, stop) pieces of the parameters' flattened elements, in
    order (in place, no autograd; a non-contiguous parameter through a copy of it)."""
    o = 0
    with torch.no_grad():
        for p, i, j in pieces:
            part = flat[o:o + j - i]
            if p.is_contiguous():
                p.view(-1)[i:j].copy_(part)
            else:
                whole = p.reshape(-1).clone()
                whole[i:j] = part
                p.copy_(whole.view_as(p))
            o += j - i


def write_params(params, flat: torch.Tensor) -> None:
    """Copy ``flat`` back into the parameters, in the key's order (in place, no autograd)."""
    write_pieces([(p, 0, p.numel()) for p in params], flat)


class ModelSync(AlgorithmState):
    """Base of the local-SGD style algorithms: gradients stay local, the model is synchronized
    after the optimizer step of the steps where ``sync_due(s)`` (docs/algorithms.md §3 model-side ops).
    Subclasses implement ``init_bucket(key, flat)`` and ``sync(key, s, params, pctx)``."""

    __slots__ = ("params", "_synced")
    persisted = (("_synced", "synced"),)

    def __init__(self, comm, **kw):
        self.params: dict = {}
        self._synced: dict = {}
        super().__init__(comm, **kw)

    def dense_keys_allowed(self) -> bool:
        return False  # gradients stay local between syncs: a dense key would be synchronous SGD

    def sync_due(self, s: int) -> bool:
        raise NotImplementedError

    def init_bucket(self, key, flat: torch.Tensor) -> None:
        raise NotImplementedError

    def sync(self, key, s: int, params, pctx: StepContext) -> None:
        raise NotImplementedError

    def model_buffer(self, key, name: str, flat: torch.Tensor) -> torch.Tensor:
        """Per-key buffer initialised to ``flat`` at first use (or the restored one)."""
        fresh = name not in self.buffers.get(key, {}) and name not in self._loaded.get(key, {})
        t = self.buffer(key, name, flat.numel(), flat.device)
        if fresh:
            t.copy_(flat)
        return t

    def _run_sync(self, key, s: int) -> None:
        if self._synced.get(key) == s or key not in self.params:
            return
        self._synced[key] = s
        params, pctx = self.params[key]
        self.sync(key, s, params, pctx)

    def before_bucket(self, ctx: StepContext, params) -> None:
        seg = [0]
        for p in params:
            seg.append(seg[-1] + p.numel())
        ctx.segments = seg
        self.params[ctx.key] = (list(params), StepContext(ctx.key, ctx.step, ctx.numel, seg, ctx.names))
        if ctx.step >= self.warmup_steps:
            self.init_bucket(ctx.key, flat_params(params))
        if self.optimizer is None and self.sync_due(ctx.step - 1):
            self._run_sync(ctx.key, ctx.step - 1)

    def after_optimizer_step(self) -> None:
        s = self.step - 1
        if self.sync_due(s):
            for key in sorted(self.params, key=repr):
                self._run_sync(key, s)

    def encode(self, grad, ctx: StepContext) -> Exchange:
        flag = nonfinite_flag(grad) if self.check_finite else None
        return local_step_exchange(self, flag, ctx, self.sync_due(ctx.step))

    def decode(self, grad, received, ctx):
        return local_step_verdict(self, grad, received, ctx)
