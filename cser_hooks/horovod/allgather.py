"""Any compressor over Horovod: :class:`AllgatherEF`, :class:`AllgatherCSER` replace ``hvd.DistributedOptimizer``.

Non-linear compressors (top_k, sign_blockwise, qsgd, compose) cannot be averaged by an allreduce.
These drivers run the same core algorithms with their own Horovod collectives from optimizer step
hooks: before ``optimizer.step()`` every parameter's gradient (in name order; Horovod matches
collectives by name) is encoded and its collective launched (allgather of the packed payload,
``cser_hooks.exchange.pack``, for non-linear compressors; allreduce for shared-mask ones), then all
are awaited and decoded into ``.grad``. After the step: ``finish_step`` and the model-side work
(CSER's reset). Call :meth:`AllgatherDriver.synchronize` yourself to edit the averaged gradients
before the step (e.g. clipping); the pre-hook then does nothing.
"""
from __future__ import annotations

import torch

from ..algorithms.cser import CSER
from ..algorithms.ef import ErrorFeedback
from ..exchange import StepContext, launch
from .driver import HorovodDriver, matching_hook

_WRAPPED_MSG = ("{who}: the optimizer is an hvd.DistributedOptimizer, which would allreduce the dense "
                "gradients again. Give {who} the plain torch optimizer and step that one.")


def is_horovod_optimizer(opt) -> bool:
    return hasattr(opt, "_compression") and hasattr(opt, "synchronize") and hasattr(opt, "_allreduce_delay")


class AllgatherDriver(HorovodDriver):
    """A :class:`HorovodDriver` that exchanges the gradients itself, in the optimizer's step pre-hook."""

    def __init__(self, who, named_parameters, algorithm_cls, *args, optimizer=None, **kw):
        if optimizer is None:
            raise ValueError(f"{who} needs optimizer= (the plain torch optimizer, not "
                             f"hvd.DistributedOptimizer): it exchanges the gradients in that optimizer's "
                             f"step pre-hook.")
        if is_horovod_optimizer(optimizer):
            raise ValueError(_WRAPPED_MSG.format(who=who))
        self._synced = False
        super().__init__(who, named_parameters, algorithm_cls, *args, optimizer=optimizer, **kw)

    def compress(self, tensor):
        raise TypeError(f"{self.who} is not a compression= object: it exchanges the gradients itself with "
                        f"hvd.allgather. Pass the plain optimizer to it (optimizer=...) and do not wrap that "
                        f"optimizer in hvd.DistributedOptimizer.")

    decompress = compress

    def step_hooks(self, optimizer) -> list:
        return [matching_hook(self, optimizer, "pre", type(self).before_step),
                matching_hook(self, optimizer, "post", type(self).after_step)]

    def before_step(self, opt=None) -> None:
        if opt is not None and is_horovod_optimizer(opt):
            raise RuntimeError(_WRAPPED_MSG.format(who=self.who))
        if not self._synced:
            self.synchronize()

    def after_step(self, opt=None) -> None:
        if not self._synced:
            return
        self._synced = False
        self.finish_step()
        with self.comm.named("after_step"):
            self.algorithm.after_optimizer_step()

    def synchronize(self) -> None:
        """Average the gradients of this step over the ranks (idempotent until the next optimizer step)."""
        if self._synced:
            return
        alg = self.algorithm
        self.check_world()
        self.agree()
        step = alg.step
        launched = []
        for name, p in self.named.items:
            if not p.requires_grad:
                continue
            if p.grad is None:  # another rank may have a gradient here: every rank must send
                p.grad = torch.zeros_like(p)
            grad = p.grad
            flat = grad.view(-1) if grad.is_contiguous() else grad.reshape(-1)
            ctx = StepContext(name, step, flat.numel(), [0, flat.numel()], None)
            self._key_step[name] = step + 1
            with self.comm.named(f"p.{name}"):
                alg.before_bucket(ctx, [p])
                alg.count_dense(flat)
                if step < alg.warmup_steps or flat.numel() < alg.min_compress_numel:
                    if step >= alg.warmup_steps:
                        alg.counters.count_uncompressed(name, flat)
                    fut, ctx = self.comm.allreduce_mean_async(flat), None
                else:
                    ctx.exchange = alg.encode(flat, ctx)
                    fut = launch(self.comm, ctx.exchange)
            launched.append((grad, flat, ctx, fut))
        for grad, flat, ctx, fut in launched:
            received = fut.wait()
            out = received if ctx is None else alg.decode(flat, received, ctx)
            if out.data_ptr() != grad.data_ptr():
                grad.copy_(out.view_as(grad))
        self._synced = True


class AllgatherEF(AllgatherDriver):
    """Error feedback with any compressor (top_k, sign_blockwise, qsgd, compose, ...) over hvd.allgather.

        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ef = AllgatherEF(model.named_parameters(), "top_k:ratio=1/64", optimizer=opt)
        # train with opt as usual (no hvd.DistributedOptimizer); broadcast the initial state as usual

    Each parameter is one payload (per-tensor: sign_blockwise's default block is the tensor), packed
    with the flag into one uint8 buffer exactly as on DDP (``cser_hooks.exchange``).
    """

    def __init__(self, named_parameters, compressor="top_k:ratio=1/64", *, optimizer, seed: int = 0,
                 warmup_steps: int = 1, error_feedback: bool = True, check_finite: bool = True,
                 min_compress_numel: int = 0):
        super().__init__("AllgatherEF", named_parameters, ErrorFeedback, compressor, error_feedback=error_feedback,
                         seed=seed, warmup_steps=warmup_steps, optimizer=optimizer, check_finite=check_finite,
                         min_compress_numel=min_compress_numel)


class AllgatherCSER(AllgatherDriver):
    """CSER with any C1 (non-linear ones through hvd.allgather, r_i tracked explicitly; docs/algorithms.md
    §3); the reset (shared-mask C2) averages parameter blocks right after ``optimizer.step()``. Usage as
    :class:`AllgatherEF`."""

    def __init__(self, named_parameters, c1="top_k:ratio=1/64", c2="identity", period: int = 16, *, optimizer,
                 seed: int = 0, warmup_steps: int = 1, check_finite: bool = True,
                 min_compress_numel: int = 0):
        super().__init__("AllgatherCSER", named_parameters, CSER, c1, c2, period, seed=seed,
                         warmup_steps=warmup_steps, optimizer=optimizer, check_finite=check_finite,
                         min_compress_numel=min_compress_numel)
