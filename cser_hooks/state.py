"""What every algorithm's state shares (docs/architecture.md: state.py).

Per-key tensors (key = DDP bucket index or Horovod tensor name), the step counter, warm-up, the
cross-rank configuration agreement check, the non-finite guard, counters for ``stats()`` and
``state_dict()`` / ``load_state_dict()``. The random masks and QSGD's rounding are pure functions
of (seed, step, key, salt[, rank]), so the step counter *is* the RNG position: a restored state
continues exactly.

An algorithm subclasses :class:`AlgorithmState` and implements ``encode`` (gradient -> what goes
on the wire), ``decode`` (what came back -> the gradient the optimizer applies) and, when it
changes the model, ``after_optimizer_step`` / ``before_bucket``.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .bucket_layout import BucketLayout
from .comm import Communicator, collective_failure
from .compressors import MaskKey
from .compressors.per_tensor import PerTensor
from .counters import StepCounters
from .exchange import Exchange, StepContext
from .gain import GainReport
from .knobs import check_checkpoint, check_common_knobs, check_world_size_policy, integer_knob, resolve_policy
from .nonfinite import StepGuard, nonfinite_error, poison


class ConfigMismatchError(ValueError):
    pass


class AlgorithmState:
    """Base of every algorithm's state. See the module docstring; subclasses document the knobs."""

    algorithm = "base"
    # per-key bookkeeping saved by state_dict(): (attribute, entry in the dict). A subclass declares its
    # own; they are collected along the MRO, so no class writes a state_dict override for them.
    persisted: tuple[tuple[str, str], ...] = (("_lr_of", "lr_of"),)
    __slots__ = ("comm", "seed", "warmup_steps", "check_finite", "step", "buffers", "optimizer",
                 "_agreed", "_loaded", "_pending_flag", "counters",
                 "_hook_handle", "param_names", "_per_tensor", "seg_cache", "_lr_of", "buckets", "on_nonfinite",
                 "guard", "_iteration", "on_world_size_change", "min_compress_numel", "gain", "_scratch",
                 "__weakref__")

    def __init__(self, comm: Communicator, *, seed: int = 0, warmup_steps: int = 1, optimizer=None,
                 check_finite: bool = True, named_parameters=None, on_nonfinite: str = "raise",
                 on_world_size_change: str = "raise", min_compress_numel: int = 0, log_gain=None):
        self.comm = comm
        self.seed = integer_knob(type(self).__name__, "seed", seed)
        self.warmup_steps = integer_knob(type(self).__name__, "warmup_steps", warmup_steps, 0)
        on_nonfinite = resolve_policy(on_nonfinite, check_finite)
        named_parameters = check_common_knobs(type(self).__name__, check_finite, on_nonfinite, optimizer,
                                              named_parameters)
        check_world_size_policy(type(self).__name__, on_world_size_change)
        self.min_compress_numel = integer_knob(type(self).__name__, "min_compress_numel", min_compress_numel, 0)
        if self.min_compress_numel and not self.dense_keys_allowed():
            raise ValueError(f"{type(self).__name__}: min_compress_numel needs an algorithm that averages gradients "
                             f"(EF, CSER without momentum, CompSkip): here a key sent dense would skip the "
                             f"algorithm's own step (momentum in the hook, local steps). Use 0.")
        self.on_world_size_change = on_world_size_change
        self.gain = None if log_gain is None else GainReport(type(self).__name__, log_gain, getattr(self, "period", 0))
        self.check_finite = bool(check_finite)
        self.on_nonfinite = on_nonfinite
        self.guard = StepGuard() if on_nonfinite == "skip" else None
        self._iteration = None
        self.step = 0
        self.buffers: dict[Any, dict[str, torch.Tensor]] = {}
        self._agreed = False
        self._loaded: dict[Any, dict[str, torch.Tensor]] = {}
        self._pending_flag = None
        self.counters = StepCounters()
        self._hook_handle = ()
        self._scratch: dict = {}  # (device, dtype) -> a reused work tensor (see scratch())
        # per-tensor mode: masks keyed by parameter name (docs/algorithms.md §3; DDP = Horovod's coordinates)
        self.param_names = None if named_parameters is None else {id(p): n for n, p in named_parameters}
        self._per_tensor = {}
        self.seg_cache: dict[Any, list] = {}  # key -> element offsets of its tensors (front end fills it)
        self._lr_of: dict[Any, float] = {}  # key -> lr of its last compressed step (saved: resume rescales right)
        self.buckets = BucketLayout()  # the DDP front end's canonical buckets (saved: resume is layout-independent)
        self.optimizer = None
        if optimizer is not None:
            self.attach_optimizer(optimizer)

    # -- configuration ---------------------------------------------------------------------
    def dense_keys_allowed(self) -> bool:
        """Whether a key may be sent as a plain average instead (``min_compress_numel``)."""
        return True

    def config(self) -> dict[str, Any]:
        """Every setting all ranks must agree on (checked at the first hook call)."""
        return {"algorithm": self.algorithm, "seed": self.seed, "warmup_steps": self.warmup_steps,
                "world_size": self.comm.world_size, "per_tensor": self.param_names is not None,
                **({"on_nonfinite": "skip"} if self.guard is not None else {}),
                **({"on_world_size_change": "reset"} if self.on_world_size_change == "reset" else {}),
                **({"min_compress_numel": self.min_compress_numel} if self.min_compress_numel else {})}

    def names_of(self, params) -> list | None:
        """Parameter names of a bucket's tensors in per-tensor mode (else None)."""
        if self.param_names is None:
            return None
        try:
            return [self.param_names[id(p)] for p in params]
        except KeyError:
            raise ValueError("cser_hooks: a parameter of this bucket is not in the named_parameters given to the "
                             "state; pass model.named_parameters() of the wrapped model") from None

    def compressor_for(self, comp, ctx: StepContext):
        """``comp`` itself, or in per-tensor mode its PerTensor wrapper for this key's tensors."""
        if ctx.names is None or not comp.linear or comp.elementwise:
            return comp  # non-linear compressors work on the whole bucket; casts are the same either way
        ck = (id(comp), ctx.key)
        hit = self._per_tensor.get(ck)
        if hit is None or hit.names != list(ctx.names):
            hit = self._per_tensor[ck] = PerTensor(comp, ctx.names)
        return hit

    def check_agreement(self) -> None:
        """One small collective: every rank's config() must be equal; name the first differing field."""
        mine = self.config()
        everyone = self.comm.all_gather_object(mine)
        self._agreed = True
        for r, other in enumerate(everyone):
            if other != mine:
                for k in sorted(set(mine) | set(other)):
                    if mine.get(k) != other.get(k):
                        raise ConfigMismatchError(
                            f"cser_hooks: ranks are configured differently: field {k!r} is {mine.get(k)!r} on "
                            f"rank {self.comm.rank} but {other.get(k)!r} on rank {r}. Construct the state with "
                            f"the same arguments on every rank.")

    @property
    def agreed(self) -> bool:
        """Whether :meth:`check_agreement` has run (since construction or the last load)."""
        return self._agreed

    def use_optimizer(self, optimizer) -> None:
        """The optimizer whose learning rate the state reads, without a step hook (for a front end that
        closes steps and calls ``after_optimizer_step`` itself: Horovod's)."""
        self.optimizer = optimizer

    def attach_optimizer(self, optimizer) -> None:
        """Run ``after_optimizer_step`` right after every ``optimizer.step()`` (a step post-hook)."""
        for handle in self._hook_handle:
            handle.remove()
        self.use_optimizer(optimizer)
        self._hook_handle = (optimizer.register_step_post_hook(lambda opt, args, kwargs: self._post_step()),)
        if self.guard is not None:
            self._hook_handle += (optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._pre_step()),)

    def _pre_step(self) -> None:
        """skip: a step called on a flagged gradient (no GradScaler) raises before the parameters change."""
        v = self.guard.verdict()
        if v is not None and (v.flagged or v.local):
            raise nonfinite_error(self.comm.rank, v.flagged or 1, v.step, None, type(self).__name__, applied=True)

    def _post_step(self) -> None:
        where = f"step {self.step - 1}, after optimizer.step() (model synchronization)"
        self.comm.label = where
        try:
            self.after_optimizer_step()
        except RuntimeError as e:
            if str(e).startswith("cser_hooks"):
                raise
            raise self.collective_failure(where, e) from e

    def collective_failure(self, where: str, err: BaseException) -> RuntimeError:
        return collective_failure(self.comm, type(self).__name__, where, err)

    def mask_key(self, ctx: StepContext, salt: str = "c1", step: int | None = None) -> MaskKey:
        return MaskKey(self.seed, ctx.step if step is None else step, ctx.key, salt, self.comm.rank)

    # -- per-key tensors -------------------------------------------------------------------
    def buffer(self, key, name: str, numel: int, device, dtype=torch.float32) -> torch.Tensor:
        """The per-key tensor ``name`` (zeros at first use, or the restored one)."""
        slot = self.buffers.setdefault(key, {})
        t = slot.get(name)
        if t is None:
            loaded = self._loaded.get(key, {}).pop(name, None)
            if loaded is not None:
                if loaded.numel() != numel:
                    raise ValueError(
                        f"cser_hooks: restored state {name!r} for key {key!r} has {loaded.numel()} elements but "
                        f"this bucket has {numel}. The checkpoint comes from a different model or bucketing "
                        f"(bucket_cap_mb); restore with the same model and DDP settings, or start fresh.")
                t = loaded.to(device=device, dtype=dtype)
            else:
                t = torch.zeros(numel, device=device, dtype=dtype)
            slot[name] = t
            if self.guard is not None:
                self.guard.created(key, name, loaded)
        elif t.numel() != numel:
            raise ValueError(f"cser_hooks: key {key!r} changed size from {t.numel()} to {numel} elements. "
                             f"Buckets must not change after warm-up; raise warmup_steps above 1 if DDP rebuilds "
                             f"its buckets later.")
        return t

    def scratch(self, numel: int, device, dtype=torch.float32) -> torch.Tensor:
        """A work tensor of ``numel`` elements, reused from step to step (one per device and dtype, grown
        when a larger one is asked for): for values that live only inside one hook call, so no step
        allocates what the last one freed. Not state: it is never saved, and its contents are garbage."""
        k = (torch.device(device), dtype)
        buf = self._scratch.get(k)
        if buf is None or buf.numel() < numel:
            buf = self._scratch[k] = torch.empty(numel, device=device, dtype=dtype)
        return buf[:numel]

    def rescale_on_lr_change(self, key, names) -> None:
        """e ← e · η_{t−1}/η_t for the per-key tensors ``names`` when the optimizer's lr changed since
        this key's last call (dist-EF-SGDM's correction, Zheng et al. 2019, Alg. 2 and §4).

        Residuals are kept in gradient units: the unsent part would have been applied with the old
        rate, so rescaling keeps η·e, the model-space error, unchanged. Called from ``encode`` (the
        hook call, never a Future callback), so the lr read is the one of the step being computed.
        Needs the optimizer; without it a constant lr is assumed. The last lr per key is saved by
        :meth:`state_dict`, so the first lr change after a resume is rescaled too.
        """
        if self.optimizer is None:
            return
        lr = float(self.optimizer.param_groups[0]["lr"])
        last = self._lr_of.get(key)
        self._lr_of[key] = lr
        if last is None or lr == last or lr == 0:
            return
        for n in names:
            t = self.buffers.get(key, {}).get(n)
            if t is not None:
                t.mul_(last / lr)

    # -- the algorithm ---------------------------------------------------------------------
    def encode(self, grad: torch.Tensor, ctx: StepContext) -> Exchange:
        raise NotImplementedError

    def decode(self, grad: torch.Tensor, received, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def before_bucket(self, ctx: StepContext, params: Sequence[torch.Tensor]) -> None:
        """Model-side work due at the start of a bucket's hook (e.g. a deferred CSER reset)."""

    def after_optimizer_step(self) -> None:
        """Model-side work right after optimizer.step() (needs attach_optimizer)."""

    # -- non-finite policy (cser_hooks/nonfinite.py), timing, step accounting -------------------
    def raise_if_nonfinite(self, flag_value: float, ctx: StepContext, local: bool = False) -> None:
        if flag_value != 0:
            raise nonfinite_error(self.comm.rank, flag_value, ctx.step, ctx.key, type(self).__name__, local=local)

    def begin_iteration(self, iteration: int) -> None:
        """The front end's first hook call of an iteration: settle the last step's verdict (skip
        policy: a flagged step is undone and its step number runs again), snapshot the dicts."""
        if self.guard is None or self._iteration == iteration:
            return
        if self.optimizer is None:
            raise ValueError(f"{type(self).__name__}: on_nonfinite='skip' needs the optimizer (optimizer=... or "
                             f"attach_optimizer): its step post-hook tells a skipped step from one that ran")
        self._iteration = iteration
        self.settle()
        self.guard.begin({attr: getattr(self, attr) for attr, _ in self._persisted()})

    def settle(self) -> None:
        """Read the pending verdict of the skip policy and undo a flagged step (one host read)."""
        v = self.guard.verdict() if self.guard is not None else None
        if v is not None and v.flagged:
            self.guard.restore(self)
            self.step = v.step

    def before_key(self, key) -> None:
        """Before a key's model-side work and encode: the skip policy's snapshot of its tensors."""
        if self.guard is not None:
            self.guard.snapshot(key, self.buffers.get(key, {}))

    def check_flag(self, flag: torch.Tensor, ctx: StepContext, grad: torch.Tensor | None = None,
                   local: bool = False) -> None:
        """The summed flag of a decoded key. raise: every rank raises when it is non-zero (deferred one
        bucket on CUDA: no sync); ``local``: this rank's own flag of a step that shares nothing, raised
        on this rank alone. skip: added to the step's verdict; ``grad`` gets a NaN when flagged."""
        if self.guard is not None:
            self.guard.add(flag)
            if grad is not None:
                poison(grad, flag)
            return
        if flag.device.type == "cpu":
            self.raise_if_nonfinite(float(flag), ctx, local)
        else:
            prev, self._pending_flag = self._pending_flag, (flag, ctx, local)
            if prev is not None:
                self.raise_if_nonfinite(float(prev[0]), prev[1], prev[2])

    def timed(self, t0: float) -> None:
        self.counters.timed(t0)

    def count_dense(self, grad: torch.Tensor) -> None:
        self.counters.count_dense(grad)

    def finish_step(self) -> None:
        """Advance the step counter (DDP: on bucket.is_last()) and close this step's counters."""
        if self.guard is not None and self.step >= self.warmup_steps:
            self.guard.launched(self.step)
        self.counters.close_step(self.comm)
        self.step += 1
        if self.gain is not None:
            self.gain.observe(self)

    def stats(self) -> dict[str, Any]:
        """Counters since construction: bytes handed to collectives by this rank, the number of
        collectives (the agreement check excluded), and time shares.

        ``compress_seconds`` is host time spent in encode/decode (on CUDA: launch time, kernels are
        asynchronous); ``comm_seconds`` is launch-to-completion time of the collectives.
        """
        return {
            "algorithm": self.algorithm, "step": self.step, **self.counters.stats(),
            "state_bytes": sum(t.numel() * t.element_size() for v in self.buffers.values() for t in v.values()),
            "shadow_bytes": self.guard.nbytes() if self.guard is not None else 0,
            "skipped_steps": self.guard.skipped_steps if self.guard is not None else 0,
        }

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Per-rank state: config, step (= RNG position), per-key tensors (on CPU)."""
        self.settle()
        bufs = {k: {n: t.detach().cpu().clone() for n, t in v.items()} for k, v in self.buffers.items()}
        for k, v in self._loaded.items():  # restored but not used yet: keep them
            for n, t in v.items():
                bufs.setdefault(k, {}).setdefault(n, t)
        sd = {"format": 2, "config": self.config(), "rank": self.comm.rank, "step": self.step,
              "buffers": bufs, "layout": self.buckets.state_dict()}
        for attr, entry in self._persisted():
            sd[entry] = dict(getattr(self, attr))
        return sd

    @classmethod
    def _persisted(cls) -> list[tuple[str, str]]:
        seen: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            for attr, entry in klass.__dict__.get("persisted", ()):
                seen[attr] = entry
        return list(seen.items())

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output of the same rank; sizes are checked at first use.

        DDP: call it after ``DDP(model)`` and after loading the model's state_dict, before the first
        step (README "Checkpoint and resume"); the first step checks each parameter against its
        fingerprint at save time and fails on every rank if the model is not the one saved."""
        changed = check_checkpoint(sd, self.config(), self.comm.rank, self.on_world_size_change)
        layout = sd.get("layout")
        if changed:  # on_world_size_change="reset": the schedule continues, the per-rank state starts at zero
            warnings.warn(f"cser_hooks: {type(self).__name__}: the checkpoint's world size is "
                          f"{sd['config'].get('world_size')}, this job's {self.comm.world_size}: its per-rank "
                          f"tensors ({sum(len(v) for v in sd['buffers'].values())}) are dropped and start from "
                          f"zero; step {sd['step']} and the schedule continue (on_world_size_change='reset').",
                          RuntimeWarning, stacklevel=2)
            layout = layout and {**layout, "fingerprints": {}}  # the rank's own model is not the one saved
        self.buckets.load_state_dict(layout)
        self.step = int(sd["step"])
        for attr, entry in self._persisted():
            setattr(self, attr, dict(sd.get(entry, {})))
        self.buffers = {}
        self._loaded = {} if changed else {k: dict(v) for k, v in sd["buffers"].items()}
        self._agreed = False
