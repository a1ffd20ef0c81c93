"""Horovod front end: compression objects for ``hvd.DistributedOptimizer`` and an allgather path.

One line to adopt (the compression object needs the parameter *names*: Horovod hands ``compress``
a bare tensor, horovod#3312)::

    cser = CSER(model.named_parameters(), c1="random_block:ratio=1/64", c2="random_block:ratio=1/4",
                period=16, optimizer=opt)
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), compression=cser)

Classes for ``compression=`` (shared-mask or cast compressors: Horovod *averages* what ``compress``
returns, which is only correct when every rank's payload holds the same coordinates,
docs/algorithms.md §1):

* :class:`FP16`, :class:`BF16` casts (stateless; fp16 clipped to ±65504 and pre-divided by the
  world size so the sum cannot overflow).
* :class:`RandomBlock`, :class:`RandomK`: avg_j C(g_j) with a shared-seed mask; only the selected
  values travel, indices never do.
* :class:`EF`: error feedback (docs/algorithms.md §2) over a shared-mask compressor.
* :class:`CSER`: partial gradient sync through the compressed allreduce + error reset as model-block
  averaging after ``optimizer.step()`` (docs/algorithms.md §3).

Non-linear compressors (top_k, sign_blockwise, qsgd, compose) cannot be averaged by an allreduce:
:class:`AllgatherEF` / :class:`AllgatherCSER` run the same algorithms through ``hvd.allgather``
with the DDP path's payload packing (``cser_hooks.exchange``); they replace
``hvd.DistributedOptimizer`` (use the plain optimizer; they synchronize the gradients in an
optimizer step pre-hook).

How ``compress`` maps onto the algorithms (each is written once, in ``cser_hooks.algorithms``):
``compress = encode`` (returns the shared-mask payload: the selected values and a 1-element
non-finite flag), Horovod averages it (replacing the algorithm's allreduce), ``decompress = decode``
(scatters the average back into the gradient). Keys are parameter names (per-tensor mode), so
``EFState``/``CSERState(..., named_parameters=model.named_parameters())`` on DDP select the same
coordinates and train to the same parameters.

Steps. Horovod has no "last bucket" signal. The mask of a tensor at its k-th ``compress`` uses step
k (per-key counter: every rank compresses every parameter once per optimizer step, whatever
``backward_passes_per_step``, ``groups=`` or hook order). The step is closed (``finish_step``:
counters, CSER's reset) by an optimizer step post-hook when the optimizer is attached, else when a
parameter comes back for its next step. The post-hook is registered globally and matches the
optimizer by its param groups, so passing either the inner optimizer or the
``hvd.DistributedOptimizer`` works (Horovod's wrapped ``step`` runs post-hooks twice; the second
call is ignored).

Gradient tensor -> name: the ``id`` of each parameter's current ``.grad`` is cached and verified
(``param.grad is tensor``) on every call; a miss is resolved among the parameters of that shape.
This survives ``zero_grad(set_to_none=True)`` (new tensors every step) and ``sparse_as_dense``.
Limits (clear errors): ``op=hvd.Adasum``; tensors that are not gradients of the named parameters
(``hvd.allreduce(t, compression=...)``: use FP16/BF16 there); Horovod elastic (refused); ``op``
must be ``hvd.Average`` (the default) and the process set the global one.
"""
from __future__ import annotations

import os
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .algorithms.compressed_average import decode_average
from .algorithms.cser import CSER as _CSERAlgorithm
from .algorithms.ef import ErrorFeedback
from .comm_horovod import HorovodCommunicator, _hvd
from .compressors import get_compressor
from .compressors.cast import FP16_MAX
from .exchange import exchange_for, launch
from .state import AlgorithmState, Exchange, Kind, StepContext, nonfinite_flag

__all__ = ["FP16", "BF16", "RandomBlock", "RandomK", "EF", "CSER", "AllgatherEF", "AllgatherCSER",
           "HorovodCommunicator"]

# compressors whose average is an allreduce of their payload (no data-dependent indices)
_NOT_ALLREDUCE_HINT = (
    "{who}: compressor {spec!r} is not a shared-mask compressor: its payload (indices, signs, levels) "
    "differs per rank, and Horovod's compression= path can only *average* the tensor compress() returns. "
    "Use cser_hooks.horovod.{alt}(model.named_parameters(), ..., optimizer=opt) with the plain optimizer "
    "(no hvd.DistributedOptimizer): it exchanges the payloads with hvd.allgather. Or pick a shared-mask "
    "compressor (random_block, random_k) for compression=.")


def _require_allreducible(comp, who: str, alt: str) -> None:
    if not comp.linear:
        raise ValueError(_NOT_ALLREDUCE_HINT.format(who=who, spec=comp.spec(), alt=alt))


def _refuse_elastic(who: str) -> None:
    if os.environ.get("HOROVOD_ELASTIC", "0") not in ("", "0"):
        raise RuntimeError(
            f"{who}: Horovod elastic is not supported: the residuals and step counters (the shared-mask RNG "
            f"position) are per rank and would disagree after workers join or leave. Run without elastic "
            f"(fixed -np), or use FP16() which keeps no state.")


# --------------------------------------------------------------------------------------------------
# stateless casts


class _CastCompression:
    """Horovod compression: clip, divide by the world size, cast; Horovod averages; upcast, multiply back.

    fp16: dividing before the cast keeps the fp16 sum of n ranks within ±65504 (docs/algorithms.md §1, the fp16
    overflow policy of ``compressors.cast``). Horovod then divides the sum by n again, so averages
    smaller than about n·6e-5 in magnitude fall into fp16's subnormal range and lose relative
    precision (gradients scaled by AMP's loss scale are far above it). bf16 has fp32's range and is
    cast only. Non-floating tensors pass
    unchanged. Works on any tensor (no names, no state); counts the bytes handed to Horovod.
    """

    wire_dtype = torch.float16

    def __init__(self):
        self.bytes_sent_total = 0
        self.dense_bytes_total = 0
        self._hvd = _hvd()

    def __repr__(self):
        return f"{type(self).__name__}()"

    def compress(self, tensor: torch.Tensor):
        if not tensor.dtype.is_floating_point:
            return tensor, None
        n = 1
        x = tensor.detach().reshape(-1)
        if self.wire_dtype == torch.float16:
            n = self._hvd.size()
            x = x.float().clamp(-FP16_MAX, FP16_MAX)
            if n > 1:
                x = x / n
        out = x.to(self.wire_dtype)
        self.bytes_sent_total += out.numel() * out.element_size()
        self.dense_bytes_total += tensor.numel() * tensor.element_size()
        return out, (tensor.dtype, tensor.shape, n)

    def decompress(self, tensor: torch.Tensor, ctx):
        if ctx is None:
            return tensor
        dtype, shape, n = ctx
        out = tensor.float()
        if n > 1:
            out.mul_(n)
        return out.to(dtype).view(shape)

    def stats(self) -> dict[str, Any]:
        return {"bytes_sent_total": self.bytes_sent_total, "dense_bytes_total": self.dense_bytes_total}


class FP16(_CastCompression):
    """``compression=FP16()``: fp16 on the wire, clipped to ±65504 and overflow-safe (see the base class)."""

    wire_dtype = torch.float16


class BF16(_CastCompression):
    """``compression=BF16()``: bfloat16 on the wire (fp32's range: no clipping).

    Horovod 0.28's PyTorch ops have no bfloat16 (``Tensor type torch.BFloat16Tensor is not supported``);
    construction fails there with that reason instead of at the first allreduce.
    """

    wire_dtype = torch.bfloat16

    def __init__(self):
        super().__init__()
        from horovod.torch import mpi_ops

        if not hasattr(mpi_ops.mpi_lib, "horovod_torch_allreduce_async_torch_BFloat16Tensor"):
            raise NotImplementedError(
                f"BF16: this Horovod ({_horovod_version()}) cannot allreduce bfloat16 "
                f"tensors from PyTorch (torch.BFloat16Tensor is not supported by its ops). Use "
                f"compression=FP16() (same 2 bytes per element, clipped to ±65504), or the DDP front "
                f"end's 'bf16' compressor.")


def _horovod_version() -> str:
    import horovod

    return getattr(horovod, "__version__", "?")


# --------------------------------------------------------------------------------------------------
# gradient tensor -> parameter name


class _NamedParameters:
    """The parameters by name, and the name of a gradient tensor handed to ``compress``."""

    def __init__(self, named_parameters, who: str):
        if named_parameters is None:
            raise ValueError(f"{who} needs named_parameters=model.named_parameters(): Horovod passes no "
                             f"tensor name to compress() (horovod#3312), and each tensor's shared mask and "
                             f"residual are keyed by its parameter name.")
        items = list(named_parameters)
        if not items or any(not (isinstance(i, tuple) and len(i) == 2 and isinstance(i[1], torch.Tensor))
                            for i in items):
            raise ValueError(f"{who}: named_parameters must be (name, parameter) pairs, e.g. "
                             f"model.named_parameters() (a fresh call: Horovod's optimizer consumes its "
                             f"own).")
        names = [n for n, _ in items]
        if len(set(names)) != len(names):
            raise ValueError(f"{who}: parameter names must be unique")
        self.items = items
        self.params: dict[str, torch.Tensor] = dict(items)
        self.by_shape: dict[tuple, list[str]] = {}
        for n, p in items:
            self.by_shape.setdefault(tuple(p.shape), []).append(n)
        self._name_of_id: dict[int, str] = {}
        self._id_of_name: dict[str, int] = {}
        self.who = who

    def _remember(self, t: torch.Tensor, name: str) -> str:
        old = self._id_of_name.get(name)
        if old is not None and self._name_of_id.get(old) == name:
            del self._name_of_id[old]
        self._name_of_id[id(t)] = name
        self._id_of_name[name] = id(t)
        return name

    def name_of(self, t: torch.Tensor) -> str:
        name = self._name_of_id.get(id(t))
        if name is not None and self.params[name].grad is t:
            return name
        same_shape = self.by_shape.get(tuple(t.shape), ())
        for n in same_shape:
            if self.params[n].grad is t:
                return self._remember(t, n)
        sparse = [n for n in same_shape if self.params[n].grad is not None and self.params[n].grad.is_sparse]
        if len(sparse) == 1:  # sparse_as_dense=True hands a dense copy of a sparse gradient
            return sparse[0]
        if any(p is t for p in self.params.values()):
            raise ValueError(f"{self.who}: compress() received a parameter, not its gradient: op=hvd.Adasum "
                             f"compresses model deltas, which this compression does not support. Use "
                             f"op=hvd.Average.")
        why = " (several sparse gradients share its shape: sparse_as_dense is ambiguous)" if sparse else ""
        raise ValueError(
            f"{self.who}: compress() received a tensor of shape {tuple(t.shape)} that is not the .grad of "
            f"any parameter given in named_parameters{why}. Use it only as hvd.DistributedOptimizer(..., "
            f"compression=...) over the same model.named_parameters(); for hvd.allreduce of other tensors "
            f"use FP16().")


# --------------------------------------------------------------------------------------------------
# driving an algorithm state from Horovod's compress/decompress


@dataclass
class _Pending:
    """Horovod's ``ctx`` between compress and decompress."""

    flat: torch.Tensor
    shape: torch.Size
    ctx: StepContext | None  # None: dense warm-up step
    scale: float = 1.0       # payload pre-divided by this (fp16 payloads), multiplied back after


class _HorovodFrontEnd:
    """Mixin over an :class:`AlgorithmState`: the Horovod compression contract (see the module docstring)."""

    persisted = (("_key_step", "key_steps"),)

    def _init_front_end(self, named_parameters, who: str):
        _refuse_elastic(who)
        self._named = _NamedParameters(named_parameters, who)
        self._who = who
        self._key_step: dict[str, int] = {}
        self._active = 0
        self._warned = False
        return self._named.items

    # -- Horovod's contract ----------------------------------------------------------------------
    def compress(self, tensor: torch.Tensor):
        name = self._named.name_of(tensor)
        self._check_world()
        step = self._key_step.get(name, 0)
        if step > self.step:  # this parameter is back for its next step and no post-hook closed the last one
            if self.optimizer is not None and not self._warned:
                self._warned = True
                warnings.warn(f"{self._who}: step {self.step} ended without a step of the attached optimizer "
                              f"(skipped by GradScaler, or another optimizer steps); it is closed now and "
                              f"its after-step work (CSER's reset) did not run.", RuntimeWarning,
                              stacklevel=2)
            self.finish_step()
        self._key_step[name] = step + 1
        self._active += 1
        if not self._agreed:
            with self.comm.named("agree"):
                self.check_agreement()
        flat = tensor.view(-1) if tensor.is_contiguous() else tensor.reshape(-1)
        ctx = StepContext(name, step, flat.numel(), [0, flat.numel()], None)
        with self.comm.named(f"p.{name}"):
            self.before_bucket(ctx, [self._named.params[name]])
        self.count_dense(flat)
        if step < self.warmup_steps:  # dense: Horovod averages the gradient itself
            self.comm.count_handed(tensor)
            return tensor, _Pending(flat, tensor.shape, None)
        ex = self.encode(flat, ctx)
        ctx.exchange = ex
        if ex.kind is Kind.ALLGATHER:  # guarded at construction; kept for compressors added later
            raise ValueError(_NOT_ALLREDUCE_HINT.format(who=self._who, spec="?", alt="AllgatherEF"))
        payload = ex.tensors[0] if ex.kind is Kind.ALLREDUCE else flat.new_empty(0)
        scale = 1.0
        if payload.dtype == torch.float16 and self.comm.world_size > 1:
            scale = float(self.comm.world_size)  # Horovod sums in fp16 before averaging: keep the sum finite
            payload = payload / scale
        self.comm.count_handed(payload)
        return payload, _Pending(flat, tensor.shape, ctx, scale)

    def decompress(self, tensor: torch.Tensor, pending: _Pending) -> torch.Tensor:
        if pending.ctx is None:
            return tensor
        received = tensor
        if pending.scale != 1.0:
            received = tensor.float().mul_(pending.scale)
        out = self.decode(pending.flat, received, pending.ctx)
        return out.view(pending.shape)

    # -- steps -------------------------------------------------------------------------------------
    def _check_world(self) -> None:
        hvd = self.comm.hvd
        if hvd.size() != self.comm.world_size or hvd.rank() != self.comm.rank:
            raise RuntimeError(f"{self._who}: the Horovod world changed (rank {self.comm.rank} of "
                               f"{self.comm.world_size} -> {hvd.rank()} of {hvd.size()}); the state cannot "
                               f"follow (elastic is not supported). Create a new object after hvd.init().")

    def finish_step(self) -> None:
        self._active = 0
        super().finish_step()

    def _after_step(self, opt=None) -> None:
        """Optimizer step post-hook: close the step, then the model-side work (CSER's reset)."""
        if self._active == 0:  # nothing compressed since the last close: a repeated post-hook call
            return
        self.finish_step()
        with self.comm.named("after_step"):
            self.after_optimizer_step()

    def attach_optimizer(self, optimizer):
        """Close each step right after ``optimizer.step()`` (the inner or the hvd.DistributedOptimizer).

        Returns the optimizer, so ``opt = cser.attach_optimizer(hvd.DistributedOptimizer(...))`` works.
        """
        if self._hook_handle is not None:
            self._hook_handle.remove()
        if not getattr(optimizer, "param_groups", None):
            raise TypeError(f"{self._who}: attach_optimizer needs a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        self._hook_handle = _register_matching_hook(self, optimizer, "post", type(self)._after_step)
        return optimizer

    # -- checkpointing -------------------------------------------------------------------------------
    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)  # restores _key_step too (``persisted``)
        self._active = 0


def _register_matching_hook(state, optimizer, kind: str, method):
    """A global optimizer step hook that fires for ``optimizer`` and for any optimizer sharing its param
    groups (``hvd.DistributedOptimizer`` re-uses the inner optimizer's group dicts). Holds the state
    weakly."""
    group0 = optimizer.param_groups[0]
    ref = weakref.ref(state)

    def hook(opt, args, kwargs):
        s = ref()
        if s is not None and opt.param_groups and opt.param_groups[0] is group0:
            method(s, opt)
    register = register_optimizer_step_post_hook if kind == "post" else register_optimizer_step_pre_hook
    return register(hook)


# --------------------------------------------------------------------------------------------------
# compressed average without state: RandomBlock / RandomK


class _SharedMaskAverage(AlgorithmState):
    """ĝ = avg_j C(g_j) for a shared-mask C, no residual (docs/algorithms.md §1: one allreduce of the selected
    values; plain compressed SGD). Built from ``exchange`` and ``decode_average`` like EF."""

    algorithm = "compressed_average"
    __slots__ = ("compressor",)

    def __init__(self, comm, compressor, **kw):
        self.compressor = get_compressor(compressor)
        super().__init__(comm, **kw)

    def config(self):
        return {**super().config(), "compressor": self.compressor.spec()}

    def encode(self, grad, ctx: StepContext) -> Exchange:
        t0 = time.perf_counter()
        flag = nonfinite_flag(grad) if self.check_finite else None
        comp = self.compressor_for(self.compressor, ctx)
        payload = comp.compress(grad, self.mask_key(ctx, "c1"), ctx.segments)
        ex = exchange_for(comp, payload, flag)
        self.timed(t0)
        return ex

    def decode(self, grad, received, ctx):
        return decode_average(self, self.compressor_for(self.compressor, ctx), grad, received,
                              ctx.exchange, ctx)


class RandomBlock(_HorovodFrontEnd, _SharedMaskAverage):
    """``compression=RandomBlock(1/64, 256, named_parameters=model.named_parameters())``.

    Each gradient tensor is cut into blocks of ``block`` elements and ⌈ratio·numel/block⌉ blocks are
    chosen from a seed shared by all ranks (seed, step, parameter name): Horovod allreduces only those
    values. Without error feedback the rest of the gradient is dropped (plain compressed SGD); use
    :class:`EF` or :class:`CSER` to keep it. ``scaled=True`` makes C unbiased (values × numel/sent).
    """

    def __init__(self, ratio: float, block: int = 256, *, named_parameters=None, seed: int = 0,
                 warmup_steps: int = 0, scaled: bool = False, check_finite: bool = True):
        items = self._init_front_end(named_parameters, type(self).__name__)
        spec = f"random_block:ratio={float(ratio)!r},block={int(block)}" + (",scaled=1" if scaled else "")
        super().__init__(HorovodCommunicator(), spec, seed=seed, warmup_steps=warmup_steps,
                         check_finite=check_finite, named_parameters=items)


class RandomK(RandomBlock):
    """``compression=RandomK(1/64, named_parameters=...)``: :class:`RandomBlock` with 1-element blocks."""

    def __init__(self, ratio: float, *, named_parameters=None, seed: int = 0, warmup_steps: int = 0,
                 scaled: bool = False, check_finite: bool = True):
        super().__init__(ratio, 1, named_parameters=named_parameters, seed=seed, warmup_steps=warmup_steps,
                         scaled=scaled, check_finite=check_finite)


# --------------------------------------------------------------------------------------------------
# EF and CSER through compression=


class EF(_HorovodFrontEnd, ErrorFeedback):
    """Error feedback (docs/algorithms.md §2) as a Horovod compression; see
    :class:`~cser_hooks.algorithms.ef.ErrorFeedback` for the knobs.

    ``compressor`` must be shared-mask (random_block, random_k; identity/fp16 also work); for top_k,
    sign_blockwise, qsgd or compose use :class:`AllgatherEF`. Pass ``optimizer=`` to rescale the
    residual when the learning rate changes and to close each step right after ``optimizer.step()``.
    """

    def __init__(self, named_parameters, compressor="random_block:ratio=1/32", *, seed: int = 0,
                 warmup_steps: int = 1, optimizer=None, error_feedback: bool = True,
                 check_finite: bool = True):
        items = self._init_front_end(named_parameters, "EF")
        _require_allreducible(get_compressor(compressor), "EF", "AllgatherEF")
        super().__init__(HorovodCommunicator(), compressor, error_feedback=error_feedback, seed=seed,
                         warmup_steps=warmup_steps, optimizer=optimizer, check_finite=check_finite,
                         named_parameters=items)


class CSER(_HorovodFrontEnd, _CSERAlgorithm):
    """CSER (docs/algorithms.md §3) as a Horovod compression; see :class:`~cser_hooks.algorithms.cser.CSER`.

    The gradient part goes through Horovod's allreduce of the C1-selected values; the error reset
    averages the C2-selected blocks of the parameters with Horovod allreduces, right after
    ``optimizer.step()`` when the optimizer is attached (``optimizer=`` or :meth:`attach_optimizer`,
    the inner optimizer or the ``hvd.DistributedOptimizer``), else at the next step's ``compress`` of
    each parameter (one-step shift, as the DDP hook without optimizer). ``c1`` must be shared-mask
    (or ``zero`` for CSER-PL); for non-linear C1 use :class:`AllgatherCSER`.
    """

    def __init__(self, named_parameters, c1="random_block:ratio=1/64", c2="identity", period: int = 16, *,
                 seed: int = 0, warmup_steps: int = 1, optimizer=None, check_finite: bool = True):
        items = self._init_front_end(named_parameters, "CSER")
        _require_allreducible(get_compressor(c1), "CSER", "AllgatherCSER")
        super().__init__(HorovodCommunicator(), c1, c2, period, seed=seed, warmup_steps=warmup_steps,
                         optimizer=optimizer, check_finite=check_finite, named_parameters=items)


# --------------------------------------------------------------------------------------------------
# allgather path (any compressor): replaces hvd.DistributedOptimizer


class _AllgatherFrontEnd(_HorovodFrontEnd):
    """Runs the algorithm with its own Horovod collectives from optimizer step hooks.

    Before ``optimizer.step()``: every parameter's gradient (in name order; Horovod matches by name) is
    encoded and its collective launched (allgather of the packed payload for non-linear compressors,
    allreduce for shared-mask ones), then all are awaited and decoded into ``.grad``. After the step:
    ``finish_step`` and the model-side work (CSER's reset). Call :meth:`synchronize` yourself to edit
    the averaged gradients before the step (e.g. clipping); the pre-hook then does nothing.
    """

    def _init_allgather(self, named_parameters, who, optimizer):
        if optimizer is None:
            raise ValueError(f"{who} needs optimizer= (the plain torch optimizer, not "
                             f"hvd.DistributedOptimizer): it exchanges the gradients in that optimizer's "
                             f"step pre-hook.")
        if _is_horovod_optimizer(optimizer):
            raise ValueError(_WRAPPED_MSG.format(who=who))
        items = self._init_front_end(named_parameters, who)
        self._synced = False
        self._pre_handle = None
        return items

    def compress(self, tensor):
        raise TypeError(f"{self._who} is not a compression= object: it exchanges the gradients itself with "
                        f"hvd.allgather. Pass the plain optimizer to it (optimizer=...) and do not wrap that "
                        f"optimizer in hvd.DistributedOptimizer.")

    decompress = compress

    def attach_optimizer(self, optimizer):
        super().attach_optimizer(optimizer)
        if self._pre_handle is not None:
            self._pre_handle.remove()
        self._pre_handle = _register_matching_hook(self, optimizer, "pre", type(self)._before_step)
        return optimizer

    def _before_step(self, opt=None) -> None:
        if opt is not None and _is_horovod_optimizer(opt):
            raise RuntimeError(_WRAPPED_MSG.format(who=self._who))
        if not self._synced:
            self.synchronize()

    def _after_step(self, opt=None) -> None:
        if not self._synced:
            return
        self._synced = False
        self.finish_step()
        with self.comm.named("after_step"):
            self.after_optimizer_step()

    def synchronize(self) -> None:
        """Average the gradients of this step over the ranks (idempotent until the next optimizer step)."""
        if self._synced:
            return
        self._check_world()
        if not self._agreed:
            with self.comm.named("agree"):
                self.check_agreement()
        step = self.step
        launched = []
        for name, p in self._named.items:
            if not p.requires_grad:
                continue
            if p.grad is None:  # another rank may have a gradient here: every rank must send
                p.grad = torch.zeros_like(p)
            grad = p.grad
            flat = grad.view(-1) if grad.is_contiguous() else grad.reshape(-1)
            ctx = StepContext(name, step, flat.numel(), [0, flat.numel()], None)
            self._key_step[name] = step + 1
            with self.comm.named(f"p.{name}"):
                self.before_bucket(ctx, [p])
                self.count_dense(flat)
                if step < self.warmup_steps:
                    fut = self.comm.allreduce_mean_async(flat)
                    ctx = None
                else:
                    ex = self.encode(flat, ctx)
                    ctx.exchange = ex
                    fut = launch(self.comm, ex)
            launched.append((p, grad, flat, ctx, fut))
        for _p, grad, flat, ctx, fut in launched:
            received = fut.wait()
            out = received if ctx is None else self.decode(flat, received, ctx)
            if out.data_ptr() != grad.data_ptr():
                grad.copy_(out.view_as(grad))
        self._synced = True


def _is_horovod_optimizer(opt) -> bool:
    return hasattr(opt, "_compression") and hasattr(opt, "synchronize") and hasattr(opt, "_allreduce_delay")


_WRAPPED_MSG = ("{who}: the optimizer is an hvd.DistributedOptimizer, which would allreduce the dense "
                "gradients again. Give {who} the plain torch optimizer and step that one.")


class AllgatherEF(_AllgatherFrontEnd, ErrorFeedback):
    """Error feedback with any compressor (top_k, sign_blockwise, qsgd, compose, ...) over hvd.allgather.

        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ef = AllgatherEF(model.named_parameters(), "top_k:ratio=1/64", optimizer=opt)
        # train with opt as usual (no hvd.DistributedOptimizer); broadcast the initial state as usual

    Each parameter is one payload (per-tensor: sign_blockwise's default block is the tensor), packed
    with the flag into one uint8 buffer exactly as on DDP (``cser_hooks.exchange``).
    """

    def __init__(self, named_parameters, compressor="top_k:ratio=1/64", *, optimizer, seed: int = 0,
                 warmup_steps: int = 1, error_feedback: bool = True, check_finite: bool = True):
        items = self._init_allgather(named_parameters, "AllgatherEF", optimizer)
        super().__init__(HorovodCommunicator(), compressor, error_feedback=error_feedback, seed=seed,
                         warmup_steps=warmup_steps, optimizer=optimizer, check_finite=check_finite,
                         named_parameters=items)


class AllgatherCSER(_AllgatherFrontEnd, _CSERAlgorithm):
    """CSER with any C1 (non-linear ones through hvd.allgather, r_i tracked explicitly; docs/algorithms.md §3);
    the reset (shared-mask C2) averages parameter blocks right after ``optimizer.step()``. Usage as
    :class:`AllgatherEF`."""

    def __init__(self, named_parameters, c1="top_k:ratio=1/64", c2="identity", period: int = 16, *, optimizer,
                 seed: int = 0, warmup_steps: int = 1, check_finite: bool = True):
        items = self._init_allgather(named_parameters, "AllgatherCSER", optimizer)
        super().__init__(HorovodCommunicator(), c1, c2, period, seed=seed, warmup_steps=warmup_steps,
                         optimizer=optimizer, check_finite=check_finite, named_parameters=items)

