"""CSER: error reset with partial synchronization (ALGORITHMS.md §3; Xie et al., arXiv 2007.13221).

The paper, per step t on worker i (p_i = η g_i):
    c̄ = avg_j C1(p_j) ;  r_i = p_i − C1(p_i) ;  x_i ← x_i − c̄ − r_i ;  e_i ← e_i + r_i
    every H steps:  ē = avg_j C2(e_j) ;  x_i ← x_i + C2(e_i) − ē ;  e_i ← e_i − C2(e_i)

The exact, optimizer-agnostic form implemented here (ALGORITHMS.md §3 "Design choice"):
  * gradient part (``encode``/``decode``): the hook returns ĝ_i = c̄/η + r_i/η, i.e. the rank
    average on what C1 selects and the local gradient elsewhere. The user's optimizer applies its
    lr, momentum and weight decay (momentum buffers stay local, as in local SGD).
    - shared-mask C1 (random_block/random_k/identity): one allreduce of the selected values,
      written back over the local gradient: no residual is stored at all.
    - non-linear C1 (top_k, sign_blockwise, qsgd, compose): allgather of payloads;
      ĝ_i = (g_i − C1(g_i)) + avg_j C1(g_j).
    - C1 = zero: purely local steps (CSER-PL, or local SGD when C2 = identity).
  * reset (``reset``): x̂ is the same on every rank and x_i = x̂ − e_i, so
    C2(e_i) − avg_j C2(e_j) = avg_j C2(x_j) − C2(x_i): the reset *averages the C2-selected blocks
    of the parameters across ranks and overwrites them* (C2 = identity: all parameters, a full
    reset that makes the ranks' models bitwise identical). No e_i is ever stored.
  * when: after the optimizer step of every step s >= warmup_steps with (s + 1) % H == 0. Given
    the optimizer, a step post-hook does it at once; otherwise the hook of step s + 1 does it for
    its bucket before compressing (one-step shift: that step's gradient was computed on the
    parameters before the reset).

Traffic per step ≈ ρ1 + ρ2/H of dense, and no index travels for shared-mask C1/C2.
"""
from __future__ import annotations

import time

import torch

from ..compressors import get_compressor
from ..exchange import average_into, exchange_for, layout_of
from ..state import AlgorithmState, Exchange, StepContext, nonfinite_flag


class CSER(AlgorithmState):
    """CSER state. Knobs (and how to tune them):

      c1: gradient compressor, ratio ρ1 (e.g. ``"random_block:ratio=1/64"``). Smaller ρ1 = more
          local drift between resets; the paper's presets pair it with H below.
      c2: reset compressor (``"identity"`` = full reset, or ``"random_block:ratio=1/4"``): what
          share of the model is averaged at each reset. Must be a shared-mask compressor.
      period (H): steps between resets. Traffic ≈ ρ1 + ρ2/H of dense. Paper (ImageNet) presets:
          (ρ1, ρ2, H) = (1/64, 1/4, 16) ≈ 1/32; (1/512, 1/16, 32) ≈ 1/256; (1/2048, 1/8, 256).
      optimizer: pass it so the reset runs right after optimizer.step() (recommended).
      warmup_steps: dense allreduce steps first (>= 1: DDP rebuilds buckets after step 0).
    """

    algorithm = "cser"
    __slots__ = ("c1", "c2", "period", "params", "_reset_done")  # params: key -> (tensors, StepContext)

    def __init__(self, comm, c1="random_block:ratio=1/64", c2="identity", period: int = 16, **kw):
        self.c1 = get_compressor(c1)
        self.c2 = get_compressor(c2)
        if not self.c2.linear or self.c2.name in ("fp16", "bf16", "zero"):
            raise ValueError(f"CSER: c2 must be 'identity' or a shared-mask sparsifier (random_block/random_k), "
                             f"got {self.c2.spec()!r}: the reset averages the selected parameter blocks.")
        if int(period) < 1:
            raise ValueError(f"CSER: period (H) must be >= 1, got {period}")
        self.period = int(period)
        self.params: dict[object, tuple] = {}
        self._reset_done: dict[object, int] = {}
        super().__init__(comm, **kw)

    def config(self):
        return {**super().config(), "c1": self.c1.spec(), "c2": self.c2.spec(), "period": self.period}

    # -- gradient part ---------------------------------------------------------------------
    def encode(self, grad, ctx: StepContext) -> Exchange:
        t0 = time.perf_counter()
        flag = nonfinite_flag(grad) if self.check_finite else None
        mk = self.mask_key(ctx, "c1")
        c1 = self.compressor_for(self.c1, ctx)
        if c1.name == "zero":
            ex = Exchange("none", (), flag)
            if flag is not None:
                self.check_flag(flag, ctx)  # local only: nothing is shared, no other rank can hang
        elif c1.linear:
            ex = exchange_for(c1, c1.compress(grad, mk, ctx.segments), flag)
        else:
            r = grad.float()  # own copy: becomes r_i = g_i − C1(g_i)
            if r.data_ptr() == grad.data_ptr():
                r = r.clone()
            payload = c1.compress_ef(r, mk, ctx.segments)
            ctx.extra["layout"] = layout_of(payload)
            ctx.extra["r"] = r
            ex = exchange_for(c1, payload, flag)
        self.timed(t0)
        return ex

    def decode(self, grad, received, ctx):
        ex = ctx.extra["exchange"]
        if ex.kind == "none":
            return grad
        t0 = time.perf_counter()
        mk = self.mask_key(ctx, "c1")
        c1 = self.compressor_for(self.c1, ctx)
        if ex.kind == "allreduce":
            values = received
            if ex.flag is not None:
                flag, values = values[-1:].float() * self.comm.world_size, values[:-1]
            # overwrite the selected blocks with their average; the local gradient stays elsewhere
            c1.overwrite(values, grad, mk, ctx.segments)
        else:
            r = ctx.extra.pop("r")
            flag = average_into(c1, ex, received, grad, mk, ctx.segments, self.comm.world_size,
                                ctx.extra["layout"])
            grad.add_(r.to(grad.dtype))
        self.timed(t0)
        if ex.flag is not None:
            self.check_flag(flag, ctx)
        return grad

    # -- reset (model part) --------------------------------------------------------------------
    def reset_due(self, s: int) -> bool:
        return s >= self.warmup_steps and (s + 1) % self.period == 0

    def reset(self, key, s: int) -> None:
        """Average the C2-selected blocks of this key's flattened parameters over ranks (in place)."""
        if self._reset_done.get(key) == s:
            return
        self._reset_done[key] = s
        params, pctx = self.params[key]
        segments = pctx.segments
        c2 = self.compressor_for(self.c2, pctx)
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in params])
            if c2.name == "identity":
                self.comm.allreduce_mean(flat)
            else:
                mk = self.mask_key(pctx, "c2", step=s)
                (values,) = c2.compress(flat, mk, segments)
                self.comm.allreduce_mean(values)
                c2.overwrite(values, flat, mk, segments)
            o = 0
            for p in params:
                n = p.numel()
                p.copy_(flat[o:o + n].view_as(p))
                o += n

    def after_optimizer_step(self) -> None:
        s = self.step - 1
        if self.reset_due(s):
            for key in sorted(self.params, key=repr):
                self.reset(key, s)

    def before_bucket(self, ctx: StepContext, params) -> None:
        self.params[ctx.key] = (list(params), StepContext(ctx.key, ctx.step, ctx.numel, ctx.segments, ctx.names))
        s = ctx.step - 1
        if self.optimizer is None and self.reset_due(s):
            self.reset(ctx.key, s)

    def state_dict(self):
        sd = super().state_dict()
        sd["reset_done"] = dict(self._reset_done)
        return sd

    def load_state_dict(self, sd):
        super().load_state_dict(sd)
        self._reset_done = dict(sd.get("reset_done", {}))
