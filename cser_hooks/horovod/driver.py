"""Driving one algorithm state from Horovod (composition: the driver *holds* an ``AlgorithmState``).

Horovod's ``compress`` is the algorithm's ``encode`` (it returns the shared-mask payload: the
selected values and a 1-element non-finite flag), Horovod averages it in place of the algorithm's
allreduce, and ``decompress`` is ``decode`` (scatters the average back into the gradient). Keys are
parameter names (per-tensor mode), so the DDP states built with ``named_parameters=`` select the
same coordinates and train to the same parameters.

Steps. Horovod has no "last bucket" signal. The mask of a tensor at its k-th ``compress`` uses step
k (per-key counter: every rank compresses every parameter once per optimizer step, whatever
``backward_passes_per_step``, ``groups=`` or hook order). The step is closed (``finish_step``:
counters, CSER's reset) by an optimizer step post-hook when the optimizer is attached, else when a
parameter comes back for its next step. The post-hook is registered globally and matches the
optimizer by its param groups, so the inner optimizer or the ``hvd.DistributedOptimizer`` both
work (Horovod's wrapped ``step`` runs post-hooks twice; the second call is ignored).
"""
from __future__ import annotations

import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ..exchange import Kind, StepContext
from .comm import HorovodCommunicator
from .names import NamedParameters

NOT_ALLREDUCE_HINT = (
    "{who}: compressor {spec!r} is not a shared-mask compressor: its payload (indices, signs, levels) "
    "differs per rank, and Horovod's compression= path can only *average* the tensor compress() returns. "
    "Use cser_hooks.horovod.{alt}(model.named_parameters(), ..., optimizer=opt) with the plain optimizer "
    "(no hvd.DistributedOptimizer): it exchanges the payloads with hvd.allgather. Or pick a shared-mask "
    "compressor (random_block, random_k) for compression=.")


def require_allreducible(comp, who: str, alt: str) -> None:
    if not comp.linear:
        raise ValueError(NOT_ALLREDUCE_HINT.format(who=who, spec=comp.spec(), alt=alt))


def refuse_elastic(who: str) -> None:
    if os.environ.get("HOROVOD_ELASTIC", "0") not in ("", "0"):
        raise RuntimeError(
            f"{who}: Horovod elastic is not supported: the residuals and step counters (the shared-mask RNG "
            f"position) are per rank and would disagree after workers join or leave. Run without elastic "
            f"(fixed -np), or use FP16Compression() which keeps no state.")


@dataclass
class Pending:
    """Horovod's ``ctx`` between compress and decompress."""

    flat: torch.Tensor
    shape: torch.Size
    ctx: StepContext | None  # None: dense warm-up step
    scale: float = 1.0       # payload pre-divided by this (fp16 payloads), multiplied back after


class HorovodDriver:
    """One algorithm state behind Horovod's contract; subclasses only choose and build the algorithm.

    ``algorithm`` is the core state (``cser_hooks.algorithms``), built with a
    :class:`HorovodCommunicator` and the parameter names; ``stats()``, ``state_dict()`` and
    ``load_state_dict()`` are its own plus the per-parameter step counters (``key_steps``).
    """

    def __init__(self, who: str, named_parameters, algorithm_cls, *args, optimizer=None, **kw):
        refuse_elastic(who)
        self.who = who
        self.named = NamedParameters(named_parameters, who)
        self.algorithm = algorithm_cls(HorovodCommunicator(), *args, named_parameters=self.named.items, **kw)
        self.comm = self.algorithm.comm
        self.optimizer = None
        self._key_step: dict[str, int] = {}
        self._active = 0   # parameters compressed since the step was last closed
        self._warned = False
        self._handles: list = []
        if optimizer is not None:
            self.attach_optimizer(optimizer)

    def __repr__(self):
        return f"{self.who}({self.algorithm.config()})"

    @property
    def step(self) -> int:
        return self.algorithm.step

    # -- Horovod's contract ----------------------------------------------------------------------
    def compress(self, tensor: torch.Tensor):
        alg = self.algorithm
        name = self.named.name_of(tensor)
        self.check_world()
        step = self._key_step.get(name, 0)
        if step > alg.step:  # this parameter is back for its next step and no post-hook closed the last one
            if self.optimizer is not None and not self._warned:
                self._warned = True
                warnings.warn(f"{self.who}: step {alg.step} ended without a step of the attached optimizer "
                              f"(skipped by GradScaler, or another optimizer steps); it is closed now and "
                              f"its after-step work (CSER's reset) did not run.", RuntimeWarning, stacklevel=2)
            self.finish_step()
        self._key_step[name] = step + 1
        self._active += 1
        self.agree()
        flat = tensor.view(-1) if tensor.is_contiguous() else tensor.reshape(-1)
        ctx = StepContext(name, step, flat.numel(), [0, flat.numel()], None)
        with self.comm.named(f"p.{name}"):
            alg.before_bucket(ctx, [self.named.params[name]])
        alg.count_dense(flat)
        if step < alg.warmup_steps or flat.numel() < alg.min_compress_numel:  # dense: Horovod averages it
            if step >= alg.warmup_steps:
                alg.counters.count_uncompressed(name, flat)
            self.comm.count_handed(tensor)
            return tensor, Pending(flat, tensor.shape, None)
        ex = ctx.exchange = alg.encode(flat, ctx)
        if ex.kind is Kind.ALLGATHER:  # guarded at construction; kept for compressors added later
            raise ValueError(NOT_ALLREDUCE_HINT.format(who=self.who, spec="?", alt="AllgatherEF"))
        payload = ex.tensors[0] if ex.kind is Kind.ALLREDUCE else flat.new_empty(0)
        scale = 1.0
        if payload.dtype == torch.float16 and self.comm.world_size > 1:
            scale = float(self.comm.world_size)  # Horovod sums in fp16 before averaging: keep the sum finite
            payload = payload / scale
        self.comm.count_handed(payload)
        return payload, Pending(flat, tensor.shape, ctx, scale)

    def decompress(self, tensor: torch.Tensor, pending: Pending) -> torch.Tensor:
        if pending.ctx is None:
            return tensor
        received = tensor if pending.scale == 1.0 else tensor.float().mul_(pending.scale)
        return self.algorithm.decode(pending.flat, received, pending.ctx).view(pending.shape)

    # -- steps -------------------------------------------------------------------------------------
    def agree(self) -> None:
        """The configuration agreement, once (the algorithm's own check, under a fixed collective name)."""
        if not self.algorithm.agreed:
            with self.comm.named("agree"):
                self.algorithm.check_agreement()

    def check_world(self) -> None:
        hvd = self.comm.hvd
        if hvd.size() != self.comm.world_size or hvd.rank() != self.comm.rank:
            raise RuntimeError(f"{self.who}: the Horovod world changed (rank {self.comm.rank} of "
                               f"{self.comm.world_size} -> {hvd.rank()} of {hvd.size()}); the state cannot "
                               f"follow (elastic is not supported). Create a new object after hvd.init().")

    def finish_step(self) -> None:
        self._active = 0
        self.algorithm.finish_step()

    def after_step(self, opt=None) -> None:
        """Optimizer step post-hook: close the step, then the model-side work (CSER's reset)."""
        if self._active == 0:  # nothing compressed since the last close: a repeated post-hook call
            return
        self.finish_step()
        with self.comm.named("after_step"):
            self.algorithm.after_optimizer_step()

    def attach_optimizer(self, optimizer):
        """Close each step right after ``optimizer.step()`` (the inner or the hvd.DistributedOptimizer);
        the algorithm reads its learning rate. Returns the optimizer, so
        ``opt = comp.attach_optimizer(hvd.DistributedOptimizer(...))`` works."""
        if not getattr(optimizer, "param_groups", None):
            raise TypeError(f"{self.who}: attach_optimizer needs a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        for h in self._handles:
            h.remove()
        self.optimizer = optimizer
        self.algorithm.use_optimizer(optimizer)
        self._handles = self.step_hooks(optimizer)
        return optimizer

    def step_hooks(self, optimizer) -> list:
        return [matching_hook(self, optimizer, "post", type(self).after_step)]

    # -- what the algorithm reports and saves, plus the per-parameter steps ----------------------------
    def config(self) -> dict[str, Any]:
        return self.algorithm.config()

    def stats(self) -> dict[str, Any]:
        return self.algorithm.stats()

    def state_dict(self) -> dict[str, Any]:
        return {**self.algorithm.state_dict(), "key_steps": dict(self._key_step)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        sd = dict(sd)
        key_steps = sd.pop("key_steps", {})
        self.algorithm.load_state_dict(sd)
        self._key_step = dict(key_steps)
        self._active = 0


def matching_hook(driver, optimizer, kind: str, method):
    """A global optimizer step hook that fires for ``optimizer`` and for any optimizer sharing its param
    groups (``hvd.DistributedOptimizer`` re-uses the inner optimizer's group dicts). Holds the driver
    weakly."""
    group0 = optimizer.param_groups[0]
    ref = weakref.ref(driver)

    def hook(opt, args, kwargs):
        d = ref()
        if d is not None and opt.param_groups and opt.param_groups[0] is group0:
            method(d, opt)
    register = register_optimizer_step_post_hook if kind == "post" else register_optimizer_step_pre_hook
    return register(hook)
