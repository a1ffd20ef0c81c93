"""Qsparse-local-SGD (docs/algorithms.md §7; Basu, Data, Karakus, Diggavi, NeurIPS 2019).

The spec, worker i, at a synchronization index (between them: plain local SGD steps):
    p_i = m_i + (x̂_i − x_i) ;  Δ_i = QComp(p_i) ;  m_i ← p_i − Δ_i
    x̄ ← x̄ − (1/n) Σ_{j syncing} Δ_j ;  x̂_i ← x̄ ;  x_i ← x̄
x̄ is the global model, x̂_i the last global model worker i received (x̂_i = x̄ in the synchronous
case), m_i the error-compensation memory. QComp = Q ∘ Comp_k, e.g. ``"top_k:ratio=1/64 + qsgd:s=15,
scale=0.5"`` (QSGD scaled by 1/(1+β) so that the composition is a contraction; the paper's
β = min(d/s², √d/s) for blocks of d elements) or ``"top_k:ratio=1/64 + sign"`` (the scaled sign
(‖Comp_k(v)‖₁/k)·sign(Comp_k(v))). Random-k / random_block sparsifiers work too.

Code map (per DDP bucket = per key; all buffers flat over the bucket's parameters):
  ``encode``/``decode``  steps between syncs: the hook returns the local gradient, no communication;
                the user's optimizer takes a local step (its momentum stays local, as in local SGD).
  ``init_bucket``   at the first post-warm-up step: x̄ = x̂_i = the (common) parameters, m_i = 0.
  ``sync``          after ``optimizer.step()`` of every step s that is a sync index of *some* rank
                (step post-hook when the state is given the optimizer; otherwise the hook of step
                s + 1 does it before its bucket is reduced: a one-step shift, as for CSER):
                p_i = m_i + x̂_i − x_i (in the buffer m) ; payload = QComp(p_i) ; m ← p − Δ_i
                one ``allgather_v``: a syncing rank contributes [flag, payload], the others only the
                4-byte flag (every rank knows every schedule: the sizes are known in advance)
                x̄ ← x̄ − Σ_{j syncing} (1/n) Δ_j   (rank order) ; syncing ranks: x̂_i ← x̄, x_i ← x̄
Schedules: ``period=H`` (all ranks sync after steps s with (s + 1) % H == 0, s >= warmup_steps),
``period=[H_0, ..., H_{n−1}]`` (rank r syncs every H_r steps: the asynchronous variant), or
``sync_steps=[[...], ...]`` (explicit per-rank lists). Asynchronous reading (a choice): the paper's
master applies every arriving update with weight 1/n; here every rank keeps the same x̄ by
receiving all updates, so no server is needed and every rank enters every collective (a rank
with nothing to send sends its flag): no collective ever waits on a subset of ranks.

Wire per bucket at a step where some rank syncs: 4 + wire_bytes(numel) bytes from a syncing rank,
4 bytes from the others (counted once, as an allgather); nothing at other steps.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch

from ..compressors import get_compressor
from ..exchange import StepContext, layout_of, pack, unpack
from ..knobs import integer_knob
from ..nonfinite import nonfinite_flag
from .model_sync import ModelSync, flat_params, write_params


class QsparseLocalSGD(ModelSync):
    """Qsparse-local-SGD state. Knobs:

      compressor: QComp, e.g. ``"top_k:ratio=1/64 + qsgd:s=15,scale=0.5"`` or ``"top_k:ratio=1/64 + sign"``.
      period: H (synchronous) or a list of per-rank H_r (asynchronous); or
      sync_steps: one list of steps for all ranks, or one list per rank (steps s after whose
          optimizer step the rank syncs). The gap between a rank's syncs should stay <= H.
      optimizer: pass it so the sync runs right after optimizer.step() (recommended).
    """

    algorithm = "qsparse_local_sgd"
    __slots__ = ("compressor", "period", "sync_steps", "_layouts")

    def __init__(self, comm, compressor="top_k:ratio=1/64 + qsgd:s=15,scale=0.5", *,
                 period: int | Sequence[int] | None = 8, sync_steps: Sequence | None = None, **kw):
        self.compressor = get_compressor(compressor)
        n = comm.world_size
        if sync_steps is not None:
            def steps(x):
                return not isinstance(x, (str, bytes)) and isinstance(x, Iterable)
            lists = list(sync_steps) if steps(sync_steps) else None
            if lists and not isinstance(lists[0], (list, tuple, set, frozenset)):
                lists = [lists] * n
            if lists is None or not all(steps(lst) for lst in lists):
                raise ValueError(f"Qsparse: sync_steps must be a list of steps (integers >= 0) or one such list "
                                 f"per rank ({n}), got {sync_steps!r}")
            if len(lists) != n:
                raise ValueError(f"Qsparse: sync_steps needs one list per rank ({n}), got {len(lists)}")
            self.sync_steps = [frozenset(integer_knob("Qsparse", "sync_steps entry", s, 0) for s in lst)
                               for lst in lists]
            self.period = None
        else:
            hs = list(period) if isinstance(period, (list, tuple)) else [period] * n
            per = [integer_knob("Qsparse", "period (H)", h, 1) for h in hs]
            if len(per) != n:
                raise ValueError(f"Qsparse: period must be an int >= 1 or one per rank ({n} ranks), got {period}")
            self.period, self.sync_steps = per, None
        self._layouts: dict = {}
        super().__init__(comm, **kw)

    def config(self):
        return {**super().config(), "compressor": self.compressor.spec(), "period": self.period,
                "sync_steps": None if self.sync_steps is None else [sorted(s) for s in self.sync_steps]}

    def syncs(self, rank: int, s: int) -> bool:
        if s < self.warmup_steps:
            return False
        if self.sync_steps is not None:
            return s in self.sync_steps[rank]
        return (s + 1) % self.period[rank] == 0

    def sync_due(self, s: int) -> bool:
        return any(self.syncs(r, s) for r in range(self.comm.world_size))

    def init_bucket(self, key, flat):
        self.model_buffer(key, "xbar", flat)
        self.model_buffer(key, "xhat", flat)
        self.buffer(key, "m", flat.numel(), flat.device)

    def layout(self, key, numel, device):
        hit = self._layouts.get((key, numel))
        if hit is None:  # payload shapes depend on numel only: compress zeros once
            z = torch.zeros(numel, device=device)
            hit = self._layouts[(key, numel)] = layout_of(self.compressor.compress(z, self.mask_key(
                StepContext(key, 0, numel), "q")))
        return hit

    def sync(self, key, s, params, pctx):
        t0 = time.perf_counter()
        n, me = self.comm.world_size, self.comm.rank
        x = flat_params(params)
        xbar, xhat, m = (self.buffers[key][k] for k in ("xbar", "xhat", "m"))
        mk = self.mask_key(pctx, "q", step=s)
        layout = self.layout(key, x.numel(), x.device)
        nbytes = 4 + sum(c * torch.empty((), dtype=dt).element_size() for _, dt, c in layout)
        who = [self.syncs(r, s) for r in range(n)]
        if who[me]:
            m.add_(xhat).sub_(x)                                   # p = m + x̂ − x
            flag = nonfinite_flag(m) if self.check_finite else torch.zeros(1, device=x.device)
            payload = self.compressor.compress_ef(m, mk, pctx.segments)   # m ← p − QComp(p)
            buf = pack(payload, flag)
        else:
            buf = torch.zeros(1, device=x.device).view(torch.uint8)      # the flag only
        self.timed(t0)
        received = self.comm.allgather_v_async(buf, [nbytes if w else 4 for w in who]).wait()
        t0 = time.perf_counter()
        acc = torch.zeros_like(xbar)
        flags = []
        for r in range(n):
            if not who[r]:
                continue
            payload, f = unpack(received[r].clone(), layout, True)
            flags.append(f)
            self.compressor.decompress_add(payload, acc, 1.0 / n, mk, pctx.segments)
        xbar.sub_(acc)                                             # x̄ ← x̄ − (1/n) Σ_j Δ_j
        if who[me]:
            xhat.copy_(xbar)
            write_params(params, xbar)
        self.timed(t0)
        if flags:
            self.check_flag(torch.stack(flags).sum().view(1), StepContext(key, s, x.numel()))
