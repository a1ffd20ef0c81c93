"""CSER: error reset with partial synchronization (docs/algorithms.md §3; Xie et al., arXiv 2007.13221).

The paper, per step t on worker i (p_i = η g_i):
    c̄ = avg_j C1(p_j) ;  r_i = p_i − C1(p_i) ;  x_i ← x_i − c̄ − r_i ;  e_i ← e_i + r_i
    every H steps:  ē = avg_j C2(e_j) ;  x_i ← x_i + C2(e_i) − ē ;  e_i ← e_i − C2(e_i)
and its M-CSER, momentum applied *before* C1 (m_i local, never averaged, untouched by resets):
    m_i ← β m_i + g_i ;  v_i = g_i + β m_i (Nesterov) or m_i ;  p_i = η v_i ;  then as above.

Two modes of the state:
  * ``momentum=0`` (default), any user optimizer: the hook returns the partially synchronized
    gradient ĝ_i below and the user's optimizer applies its lr, momentum, Adam, weight decay to it
    (its buffers stay local). With plain SGD this *is* the paper's CSER. With momentum or Adam in
    the optimizer it is a practical variant (momentum applied *after* C1), not the paper's M-CSER.
  * ``momentum=β > 0`` (M-CSER, the paper's algorithm with momentum): the state keeps m_i per key
    (fp32, saved by ``state_dict``) and runs the C1 path below on v_i instead of g_i; the user's
    optimizer must be ``torch.optim.SGD(..., momentum=0)`` (checked when given: ``optimizer=``).
    Its lr may change (ĝ_i is in gradient units; the optimizer applies the current η), and its
    ``weight_decay`` acts on x_i directly, outside m and C1. The hook sees the gradient as DDP
    hands it over, so m is in loss-scaled units: with a GradScaler use ``on_nonfinite="skip"`` (a
    skipped overflow step leaves m untouched), and note that each change of the scale mixes two
    scales in m until β^k forgets the old one; bf16 (no scaler) avoids both.

The exact, optimizer-agnostic form implemented here (docs/algorithms.md §3 "Design choice"), with u_i
= g_i (CSER) or v_i (M-CSER):
  * gradient part (``encode``/``decode``): the hook returns ĝ_i = c̄/η + r_i/η, i.e. the rank
    average of u on what C1 selects and the local u_i elsewhere; x_i ← x_i − η ĝ_i is the paper's
    x_i ← x_i − c̄ − r_i.
    - shared-mask C1 (random_block/random_k/identity): one allreduce of the selected values,
      written back over the local gradient: no residual is stored at all.
    - non-linear C1 (top_k, sign_blockwise, qsgd, compose): allgather of payloads;
      ĝ_i = (u_i − C1(u_i)) + avg_j C1(u_j).
    - C1 = zero: purely local steps (CSER-PL, or local SGD when C2 = identity).
  * reset (``reset``): x̂ is the same on every rank and x_i = x̂ − e_i, so
    C2(e_i) − avg_j C2(e_j) = avg_j C2(x_j) − C2(x_i): the reset *averages the C2-selected blocks
    of the parameters across ranks and overwrites them* (C2 = identity: all parameters, a full
    reset that makes the ranks' models bitwise identical). No e_i is ever stored; m_i stays local.
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
from ..exchange import Exchange, Kind, StepContext, average_into, exchange_for
from ..knobs import integer_knob, momentum_knobs
from ..nonfinite import local_step_exchange, local_step_verdict, nonfinite_flag
from ..state import AlgorithmState
from .dist_ef_sgdm import check_plain_sgd
from .model_sync import write_pieces

RESET_SCHEDULES = ("burst", "spread")


def check_mcser_optimizer(optimizer, momentum: float) -> None:
    """M-CSER applies the momentum in the hook (before C1): the user's optimizer must have none."""
    try:
        check_plain_sgd(optimizer)
    except ValueError:
        raise ValueError(
            f"CSER: the state runs M-CSER (CSERState(momentum={momentum}, ...)), which applies the momentum "
            f"itself, before C1; {type(optimizer).__name__} must not add momentum of its own (momentum, "
            f"nesterov or Adam's betas). Build it as torch.optim.SGD(params, lr=..., momentum=0, "
            f"weight_decay=...), or use CSERState(momentum=0) to keep your optimizer (momentum applied after "
            f"C1: a practical variant, not the paper's M-CSER).") from None


def _compressor(knob: str, spec):
    """get_compressor(spec), its errors prefixed with the knob: CSER takes two compressors."""
    try:
        return get_compressor(spec)
    except (TypeError, ValueError) as e:
        raise type(e)(f"CSER: {knob}: {e}") from None


class CSER(AlgorithmState):
    """CSER state. Knobs (and how to tune them):

      c1: gradient compressor, ratio ρ1 (e.g. ``"random_block:ratio=1/64"``). Smaller ρ1 = more
          local drift between resets; the paper's presets pair it with H below.
      c2: reset compressor (``"identity"`` = full reset, or ``"random_block:ratio=1/4"``): what
          share of the model is averaged at each reset. Must be a shared-mask compressor.
      period (H): steps between resets. Traffic ≈ ρ1 + ρ2/H of dense. Paper (ImageNet) presets:
          (ρ1, ρ2, H) = (1/64, 1/4, 16) ≈ 1/32; (1/512, 1/16, 32) ≈ 1/256; (1/2048, 1/8, 256).
      momentum (β), nesterov: ``momentum > 0`` runs M-CSER, the paper's CSER with momentum (applied
          in the state, before C1; the user's optimizer must be plain SGD, momentum=0). The default
          0 leaves momentum (or Adam) to the user's optimizer, applied to the partially synchronized
          gradient ĝ_i: a practical variant, exact to the paper's CSER only for plain SGD.
      reset_schedule: ``"burst"`` (the paper: every key's C2 blocks averaged after each H-th step) or
          ``"spread"``: the same reset spread over the period, one H-th of each key per step (chunk
          c = (s + 1) mod H of the flattened parameters, [⌊c·n/H⌋, ⌊(c+1)·n/H⌋), C2 applied to the
          chunk as one tensor), so each element is still reset every H steps, at its own phase, and
          every step carries 1/H of the reset's bytes instead of one step all of them (no spike).
      optimizer: pass it so the reset runs right after optimizer.step() (recommended).
      warmup_steps: dense allreduce steps first (>= 1: DDP rebuilds buckets after step 0); their
          averaged gradients go to the user's optimizer and leave the M-CSER momentum untouched.
    """

    algorithm = "cser"
    # params: key -> (tensors, StepContext)
    __slots__ = ("c1", "c2", "period", "momentum", "nesterov", "params", "_reset_done", "reset_schedule")
    persisted = (("_reset_done", "reset_done"),)

    def __init__(self, comm, c1="random_block:ratio=1/64", c2="identity", period: int = 16, *,
                 momentum: float = 0.0, nesterov: bool = False, reset_schedule: str = "burst", **kw):
        self.c1 = _compressor("c1", c1)
        self.c2 = _compressor("c2", c2)
        for name, c in (("c1", self.c1), ("c2", self.c2)):
            if c.linear and getattr(c, "scaled", False):
                raise ValueError(f"CSER: {name}={c.spec()!r} is scaled; CSER overwrites the selected blocks with "
                                 f"their average (a projection), which a scaled mask is not. Drop ',scaled=1'.")
        if not (self.c2.linear and self.c2.projection):
            raise ValueError(f"CSER: c2 must be 'identity' or a shared-mask sparsifier (random_block/random_k), "
                             f"got {self.c2.spec()!r}: the reset averages the selected parameter blocks.")
        self.momentum, self.nesterov = momentum_knobs(
            "CSER", momentum, nesterov, "M-CSER's momentum; for the optimizer's own Nesterov momentum pass it to "
            "the optimizer and keep the state's momentum=0", label="momentum (M-CSER's β)")
        self.period = integer_knob("CSER", "period (H)", period, 1)
        if reset_schedule not in RESET_SCHEDULES:
            raise ValueError(f"CSER: reset_schedule must be one of {RESET_SCHEDULES} (all of a reset after every "
                             f"H-th step, or one H-th of it after every step), got {reset_schedule!r}")
        self.reset_schedule = reset_schedule
        self.params: dict[object, tuple] = {}
        self._reset_done: dict[object, int] = {}
        super().__init__(comm, **kw)

    def config(self):
        cfg = {**super().config(), "c1": self.c1.spec(), "c2": self.c2.spec(), "period": self.period}
        if self.reset_schedule != "burst":
            cfg["reset_schedule"] = self.reset_schedule
        if self.momentum:  # only in M-CSER mode: checkpoints of the default mode keep loading
            cfg.update(momentum=self.momentum, nesterov=self.nesterov)
        return cfg

    def attach_optimizer(self, optimizer) -> None:
        if self.momentum:
            check_mcser_optimizer(optimizer, self.momentum)
        super().attach_optimizer(optimizer)

    def dense_keys_allowed(self) -> bool:
        return not self.momentum  # M-CSER's momentum lives in the hook

    # -- gradient part ---------------------------------------------------------------------
    def momentum_direction(self, grad, ctx: StepContext) -> None:
        """M-CSER: m ← β m + g ; grad ← v = g + β m (Nesterov) or m. m is fp32, grad may be fp16/bf16."""
        if self.optimizer is not None and ctx.step == self.warmup_steps:
            check_mcser_optimizer(self.optimizer, self.momentum)  # the optimizer may have been rebuilt since
        m = self.buffer(ctx.key, "m", ctx.numel, grad.device)
        g = grad if grad.dtype == torch.float32 else grad.float()
        m.mul_(self.momentum).add_(g)
        if self.nesterov:
            g.add_(m, alpha=self.momentum)
            if g is not grad:
                grad.copy_(g)
        else:
            grad.copy_(m)

    def encode(self, grad, ctx: StepContext) -> Exchange:
        t0 = time.perf_counter()
        if self.momentum:
            self.momentum_direction(grad, ctx)  # the rest runs on v (sent, checked, averaged) as CSER on g
        flag = nonfinite_flag(grad) if self.check_finite else None
        mk = self.mask_key(ctx, "c1")
        c1 = self.compressor_for(self.c1, ctx)
        if c1.sends_nothing:  # CSER-PL: a local step; the flag is shared before a reset only (skip policy)
            ex = local_step_exchange(self, flag, ctx, self.reset_due(ctx.step))
        elif c1.linear:
            ex = exchange_for(c1, c1.compress(grad, mk, ctx.segments), flag)
        else:
            r = grad.float()  # own copy: becomes r_i = g_i − C1(g_i)
            if r.data_ptr() == grad.data_ptr():
                r = r.clone()
            payload = c1.compress_ef(r, mk, ctx.segments)
            ex = exchange_for(c1, payload, flag)
            ex.carry = r
        self.timed(t0)
        return ex

    def decode(self, grad, received, ctx):
        ex = ctx.exchange
        if self.c1.sends_nothing:
            return local_step_verdict(self, grad, received, ctx)
        t0 = time.perf_counter()
        mk = self.mask_key(ctx, "c1")
        c1 = self.compressor_for(self.c1, ctx)
        if ex.kind is Kind.ALLREDUCE:
            values = received
            if ex.flag is not None:
                flag, values = values[-1:].float() * self.comm.world_size, values[:-1]
            # overwrite the selected blocks with their average; the local gradient stays elsewhere
            c1.overwrite(values, grad, mk, ctx.segments)
        else:
            r, ex.carry = ex.carry, None
            flag = average_into(c1, ex, received, grad, mk, ctx.segments, self.comm.world_size)
            grad.add_(r.to(grad.dtype))
        self.timed(t0)
        if ex.flag is not None:
            self.check_flag(flag, ctx, grad)
        return grad

    # -- reset (model part) --------------------------------------------------------------------
    def reset_due(self, s: int) -> bool:
        return s >= self.warmup_steps and (self.reset_schedule == "spread" or (s + 1) % self.period == 0)

    def reset_region(self, params, pctx: StepContext, s: int):
        """What the reset of step ``s`` averages of this key: elements [lo, hi) of its flattened parameters,
        all of them (burst) or chunk (s + 1) mod H (spread), as (parameter, start, stop) pieces; with the
        C2 compressor and segments that apply to it. Only the region is copied, not the whole key."""
        n = sum(p.numel() for p in params)
        if self.reset_schedule == "burst":
            lo, hi, c2, segments = 0, n, self.compressor_for(self.c2, pctx), pctx.segments
        else:
            c = (s + 1) % self.period
            lo, hi, c2, segments = c * n // self.period, (c + 1) * n // self.period, self.c2, None
        pieces, o = [], 0
        for p in params:
            a, b = max(lo, o), min(hi, o + p.numel())
            if a < b:
                pieces.append((p, a - o, b - o))
            o += p.numel()
        return pieces, c2, segments

    def reset(self, key, s: int) -> None:
        """Average the C2-selected blocks of this key's flattened parameters over ranks (in place)."""
        self.reset_many([key], s)

    def reset_many(self, keys, s: int) -> None:
        """The reset of step ``s`` for ``keys`` in one collective per parameter dtype (not one per key:
        Horovod's keys are single tensors, hundreds per model). Element-wise the same average as one
        collective per key, so the result does not depend on the grouping."""
        keys = [k for k in keys if self._reset_done.get(k) != s]
        if not keys:
            return
        parts = []
        with torch.no_grad():
            for key in keys:
                self._reset_done[key] = s
                params, pctx = self.params[key]
                pieces, c2, segments = self.reset_region(params, pctx, s)
                target = torch.cat([p.detach().reshape(-1)[i:j] for p, i, j in pieces])
                mk = self.mask_key(pctx, "c2", step=s)
                values = c2.compress(target, mk, segments)[0]  # identity: target itself
                parts.append((pieces, segments, c2, target, mk, values))
            for dtype in sorted({v.dtype for *_, v in parts}, key=str):
                group = [v for *_, v in parts if v.dtype == dtype]
                joined = torch.cat(group) if len(group) > 1 else group[0]
                self.comm.allreduce_mean(joined)
                if len(group) > 1:
                    o = 0
                    for v in group:
                        v.copy_(joined[o:o + v.numel()])
                        o += v.numel()
            for pieces, segments, c2, target, mk, values in parts:
                if values is not target:
                    c2.overwrite(values, target, mk, segments)
                write_pieces(pieces, target)

    def after_optimizer_step(self) -> None:
        s = self.step - 1
        if self.reset_due(s):
            self.reset_many(sorted(self.params, key=repr), s)

    def before_bucket(self, ctx: StepContext, params) -> None:
        self.params[ctx.key] = (list(params), StepContext(ctx.key, ctx.step, ctx.numel, ctx.segments, ctx.names))
        s = ctx.step - 1
        if self.optimizer is None and self.reset_due(s):
            self.reset(ctx.key, s)

