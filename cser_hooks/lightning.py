"""PyTorch Lightning: adopt a comm hook with one callback, ``CommHook``.

    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp",
                      callbacks=[CommHook("cser", c1="random_block:ratio=1/64", period=16)])

Why a callback and not ``DDPStrategy(ddp_comm_state=..., ddp_comm_hook=...)``: Lightning 2.6 registers
that hook only when the root device is CUDA (``DDPStrategy._register_ddp_hooks``), the states here
need ``torch.distributed`` initialized when they are built (Lightning initializes it inside
``fit``), the optimizer that CSER's reset follows does not exist when the strategy is built, and
Lightning saves its checkpoint from rank 0 only. The callback builds the state at fit start from
``trainer.optimizers[0]``, registers it on the strategy's ``DistributedDataParallel`` (CPU/gloo and
CUDA/NCCL alike) and checkpoints every rank's state (:class:`cser_hooks.checkpoint.RankLocalCheckpoint`).

When each thing happens (lightning 2.6, ``Trainer._run``): ``setup`` checks the strategy; a
``ckpt_path`` is read in ``load_state_dict`` (before DDP wraps the model: the entry is only kept);
``on_fit_start`` (DDP built, optimizers set up) builds and registers the state; ``on_train_start``
(after Lightning restored rank 0's optimizer and loop state) restores this rank's model, optimizer
and state, before the first step. ``accumulate_grad_batches`` needs nothing: Lightning skips the
gradient sync with DDP's ``no_sync()``, the hook runs once per optimizer step on the accumulated
gradient and the state's step counter follows ``trainer.global_step``.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

from . import ddp
from .checkpoint import RankLocalCheckpoint, rank_entry

__all__ = ["CommHook", "ALGORITHMS"]

# name -> (state class, hook)
ALGORITHMS: dict[str, tuple[type, Callable]] = {
    "ef": (ddp.EFState, ddp.ef_hook),
    "cser": (ddp.CSERState, ddp.cser_hook),
    "compskip": (ddp.CompSkipState, ddp.compskip_hook),
    "dist_ef_sgdm": (ddp.DistEFSGDMState, ddp.dist_ef_sgdm_hook),
    "qsparse_local_sgd": (ddp.QsparseLocalSGDState, ddp.qsparse_local_sgd_hook),
    "qprsgd": (ddp.QPRSGDState, ddp.qprsgd_hook),
}


def _hook_for(state) -> Callable:
    for cls, hook in ALGORITHMS.values():
        if isinstance(state, cls):
            return hook
    raise TypeError(f"cser_hooks: CommHook: make_state returned {type(state).__name__}; it must return one of the "
                    f"DDP states of cser_hooks.ddp ({', '.join(c.__name__ for c, _ in ALGORITHMS.values())})")


class CommHook(pl.Callback):
    """Register a cser_hooks comm hook on Lightning's DDP model, and checkpoint every rank's state.

    Knobs:
      algorithm: a name, ``"cser"``, ``"ef"``, ``"compskip"``, ``"dist_ef_sgdm"``,
          ``"qsparse_local_sgd"`` or ``"qprsgd"`` (the README table of cser_hooks.ddp), built as
          ``State(process_group, optimizer=trainer.optimizers[0], **knobs)``; or a callable
          ``make_state(optimizer) -> state`` for full control (``named_parameters=``, a state
          built some other way): it must pass the optimizer on itself if the state should use it.
      process_group: the group to compress over (default: the whole world, as DDP).
      **knobs: the state's own knobs (``c1``, ``c2``, ``period``, ``compressor``, ``seed``,
          ``warmup_steps``, ``progress_timeout``, ...), validated when the state is built, at fit
          start, on every rank alike. Not ``optimizer``: the callback passes Lightning's. With a
          GradScaler in the precision plugin (``precision="16-mixed"``) ``on_nonfinite`` defaults to
          ``"auto"`` (skip the overflowing steps, README "Mixed precision").

    ``callback.state`` is the state of the running (or last) fit: ``callback.state.stats()``.

    Checkpoints: ``state_dict()`` gathers each rank's entry (the state, and the module and
    optimizer of the ranks whose copy differs from rank 0's) into the one file Lightning writes from
    rank 0; a resume with ``ckpt_path=`` gives each rank its own back, and continues bitwise like the
    uninterrupted run (resume from an epoch-end checkpoint, or make the dataloader resumable, as
    Lightning itself requires). A checkpoint of another world size is refused. Saving is a
    collective: call ``trainer.save_checkpoint`` on every rank (as Lightning requires anyway), never
    under ``if trainer.is_global_zero``.
    """

    def __init__(self, algorithm: str | Callable = "cser", *, process_group=None, **knobs):
        if isinstance(algorithm, str):
            if algorithm not in ALGORITHMS:
                raise ValueError(f"cser_hooks: CommHook: unknown algorithm {algorithm!r}; one of "
                                 f"{sorted(ALGORITHMS)}, or a callable make_state(optimizer) -> state")
            if "optimizer" in knobs:
                raise ValueError("cser_hooks: CommHook passes trainer.optimizers[0] to the state itself; drop "
                                 "optimizer=... (or give a callable make_state(optimizer) instead of a name)")
        elif not callable(algorithm):
            raise TypeError(f"cser_hooks: CommHook: algorithm must be a name or a callable make_state(optimizer), "
                            f"got {type(algorithm).__name__}")
        elif knobs or process_group is not None:
            raise ValueError("cser_hooks: CommHook(make_state): pass the knobs to the state inside make_state, "
                             "not to the callback")
        self.algorithm, self.process_group, self.knobs = algorithm, process_group, knobs
        self.state = None
        self._checkpoint: RankLocalCheckpoint | None = None
        self._pending: dict[str, Any] | None = None  # this rank's entry of a ckpt_path, until on_train_start

    @property
    def state_key(self) -> str:
        # one key whatever the algorithm: a checkpoint of another algorithm then fails in the state's
        # load_state_dict, naming both, instead of being skipped by Lightning as another callback's
        return "CommHook"

    # -- checks ------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        if not isinstance(strategy, DDPStrategy):
            raise ValueError(
                f"cser_hooks: CommHook needs Lightning's DDP strategy (Trainer(strategy='ddp', devices=N) or "
                f"DDPStrategy(...)), got {type(strategy).__name__}. With one device there is nothing to "
                f"communicate: drop the callback; FSDP and DeepSpeed do not take DDP comm hooks.")
        if getattr(strategy, "_ddp_comm_hook", None) is not None:
            raise ValueError("cser_hooks: CommHook and DDPStrategy(ddp_comm_hook=...) would both register a comm "
                             "hook (DDP allows one): use only the callback")

    # -- fit start: build and register -----------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = trainer.strategy.model
        if not isinstance(model, DistributedDataParallel):
            raise RuntimeError(f"cser_hooks: CommHook: trainer.strategy.model is {type(model).__name__}, not "
                               f"DistributedDataParallel; use Trainer(strategy='ddp')")
        if len(trainer.optimizers) != 1:
            raise ValueError(f"cser_hooks: CommHook: the state follows one optimizer (CSER resets right after its "
                             f"step), configure_optimizers returned {len(trainer.optimizers)}; return one "
                             f"optimizer (several parameter groups are fine)")
        optimizer = trainer.optimizers[0]
        if isinstance(self.algorithm, str):
            cls, hook = ALGORITHMS[self.algorithm]
            knobs = dict(self.knobs)
            if getattr(trainer.precision_plugin, "scaler", None) is not None:
                knobs.setdefault("on_nonfinite", "auto")  # a GradScaler overflows while it calibrates
            self.state = cls(self.process_group, optimizer=optimizer, **knobs)
            if self.state.on_nonfinite == "raise" and knobs.get("on_nonfinite") == "auto":
                warnings.warn("cser_hooks: CommHook: check_finite=False with a GradScaler: the state cannot tell "
                              "an overflow, which then enters its residuals; keep check_finite=True (the default) "
                              "or use precision='bf16-mixed', which needs no scaler.", RuntimeWarning, stacklevel=2)
        else:
            self.state = self.algorithm(optimizer)
            hook = _hook_for(self.state)
        model.register_comm_hook(self.state, hook)
        self._checkpoint = RankLocalCheckpoint(self.state, pl_module, optimizer, what="CommHook")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:
            entry, self._pending = self._pending, None
            self._checkpoint.apply(entry)

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every rank's entry (a collective: Lightning calls it on every rank when it saves)."""
        if self._checkpoint is None:
            return {}
        return self._checkpoint.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep this rank's entry (checked now: world size) until ``on_train_start`` restores it."""
        self._pending = rank_entry(state_dict, "CommHook")
