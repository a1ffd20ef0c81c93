"""What a state does with a non-finite gradient: ``on_nonfinite="raise"`` or ``"skip"``.

Every compressed exchange carries a 1-element flag (1 where a rank's input held a NaN/Inf), summed
over ranks by the collective itself, so every rank learns the same verdict without another message.

``"raise"`` (the default): every rank raises :class:`FloatingPointError` together, naming the step
and bucket. On CUDA the flag is read one bucket later (no sync of the bucket being reduced).

``"skip"`` (for fp16 autocast with ``torch.amp.GradScaler``, which overflows by design while it
calibrates its scale): a flagged bucket returns a gradient holding a NaN on *every* rank, so every
rank's GradScaler skips ``optimizer.step()`` and lowers its scale identically, and the state commits
nothing of that step: before a key's first use in a step its per-key tensors are copied into
shadow buffers (allocated once), and the per-key dicts (``persisted``) are copied; when the step's
verdict is "non-finite" they are copied back and the step counter (= RNG position) is rewound, so
the next iteration runs the same step again on the next batch. Model-side work due at the skipped
step (a CSER reset) therefore happens after the next optimizer step that runs. Cost: one copy of
the state per step and 1x its memory (shadows), reported by ``stats()["state_bytes"]``.

The verdict costs at most one device→host read per step (:attr:`StepGuard.host_reads` counts
them): the flags of a step are summed on the device; when the step's last bucket is decoded
the sum is copied into a pinned host buffer (non-blocking, with a CUDA event); it is read at the
next iteration's first hook call, after the optimizer step (by then the copy is long done),
or in the optimizer's step *pre*-hook, where a step about to run on a flagged gradient (no
GradScaler skipped it) raises the clear error before the parameters change.

Steps that share no gradient (local SGD: Qsparse, QPRSGD, CSER with ``c1="zero"``) share the flag
only when a model synchronization follows (:func:`local_step_exchange`): an overflow there skips the
step and its synchronization everywhere; on a purely local step it is one rank's own (its
GradScaler skips its local update; the state is untouched and keeps the ranks' step counters aligned).

``"auto"`` resolves, when the state is built, to ``"skip"`` with ``check_finite=True`` and to
``"raise"`` without; ``cser_hooks.lightning.CommHook`` passes it when the trainer's precision plugin
holds a GradScaler (``precision="16-mixed"``).
"""
from __future__ import annotations

import threading
from typing import Any, NamedTuple

import torch

from .exchange import Exchange, Kind, StepContext

POLICIES = ("raise", "skip")


def nonfinite_flag(p: torch.Tensor) -> torch.Tensor:
    """1.0 if p holds a NaN/Inf, else 0.0, without a host sync (one reduction over p)."""
    s = p.sum(dtype=torch.float32)
    return (~torch.isfinite(s)).to(torch.float32).view(1)


def nonfinite_error(rank: int, nranks: float, step: int, key, who: str, applied: bool = False,
                    local: bool = False) -> FloatingPointError:
    if local:
        return FloatingPointError(
            f"cser_hooks: rank {rank}: non-finite gradient (NaN/Inf) at step {step}, bucket {key!r} ({who}), a local "
            f"step (nothing is shared): this rank raises alone, and the others stop at the next synchronization "
            f"with a collective failure. Lower the learning rate or clip the gradients; with fp16 autocast and a "
            f"torch.amp.GradScaler construct the state with on_nonfinite='skip'.")
    if applied:
        return FloatingPointError(
            f"cser_hooks: rank {rank}: non-finite gradient (NaN/Inf) on {int(nranks)} rank(s) at step {step} "
            f"({who}, on_nonfinite='skip'), and optimizer.step() was called on it: nothing skipped the step "
            f"(raised before the step: the parameters are unchanged). "
            f"on_nonfinite='skip' is for a torch.amp.GradScaler (scaler.step(optimizer) skips such steps); "
            f"without one use on_nonfinite='raise', lower the learning rate or clip the gradients.")
    return FloatingPointError(
        f"cser_hooks: rank {rank}: non-finite gradient (NaN/Inf) on {int(nranks)} rank(s) at step {step}, bucket "
        f"{key!r} ({who}); every rank raises this together. Lower the learning rate or clip the gradients; with "
        f"fp16 autocast and a torch.amp.GradScaler construct the state with on_nonfinite='skip'.")


def poison(grad: torch.Tensor, flag: torch.Tensor) -> None:
    """grad[0] ← NaN where the summed flag is non-zero (device op, no host sync): the optimizer step
    that follows is skipped by a GradScaler on every rank alike."""
    head = grad[:1]
    head.copy_(torch.where(flag.to(device=grad.device) > 0, torch.full_like(head, float("nan")), head))


class Verdict(NamedTuple):
    """A finished step's flags: ``flagged`` = flagged ranks summed over the keys whose exchange carried
    the flag (the same on every rank: the step is skipped when non-zero); ``local`` = this rank's own
    flags of keys that exchanged none (local-SGD steps: its GradScaler alone skips)."""
    step: int
    flagged: float
    local: float = 0.0


class StepGuard:
    """The ``"skip"`` policy's bookkeeping for one state (see the module docstring)."""

    __slots__ = ("shadows", "_fresh", "_dicts", "_snapped", "_sums", "_pinned", "_events", "_iter",
                 "_expected", "_count", "_done", "_lock", "_pending", "host_reads", "skipped_steps")

    def __init__(self):
        self.shadows: dict[Any, dict[str, torch.Tensor]] = {}  # key -> name -> copy before this step
        self._fresh: dict = {}            # (key, name) created during this step -> the restored tensor or None
        self._dicts: dict[str, dict] = {}
        self._snapped: set = set()        # keys copied this step
        self._sums: dict = {}             # device -> 2 x [shared, local] sums, alternating by iteration parity
        self._pinned: dict = {}
        self._events: dict = {}
        self._iter = 0
        self._expected: int | None = None
        self._count = self._done = 0
        self._lock = threading.Lock()
        self._pending: tuple | None = None   # (step, devices) whose verdict is not read yet
        self.host_reads = 0                   # device→host reads of a verdict (the test seam)
        self.skipped_steps = 0

    # -- snapshots -------------------------------------------------------------------------
    def begin(self, persisted: dict[str, dict]) -> None:
        """First hook call of an iteration: copy the per-key dicts (small), forget the last snapshots."""
        self._dicts = {k: dict(v) for k, v in persisted.items()}
        self._snapped.clear()
        self._fresh.clear()
        self._iter += 1
        self._expected, self._count, self._done = None, 0, 0
        for pair in self._sums.values():
            pair[self._iter % 2].zero_()   # stream-ordered on CUDA: no sync

    def snapshot(self, key, tensors: dict[str, torch.Tensor]) -> None:
        """Before a key's first use in a step: its tensors into the (reused) shadow buffers."""
        if key in self._snapped:
            return
        self._snapped.add(key)
        slot = self.shadows.setdefault(key, {})
        for name, t in tensors.items():
            s = slot.get(name)
            if s is None or s.shape != t.shape or s.device != t.device or s.dtype != t.dtype:
                s = slot[name] = torch.empty_like(t)
            s.copy_(t)

    def created(self, key, name: str, restored: torch.Tensor | None) -> None:
        """A per-key tensor created during this step (zeros, or ``restored`` from a checkpoint)."""
        self._fresh[(key, name)] = restored

    # -- the step's verdict ------------------------------------------------------------------
    def add(self, flag: torch.Tensor, local: bool = False) -> None:
        """A decoded key's summed flag (from a Future callback: device ops only); ``local``: a flag only
        this rank knows (a local-SGD step exchanges none), which decides no skip but makes an optimizer
        step called on it raise (:attr:`Verdict.local`)."""
        with self._lock:
            pair = self._sums.get(flag.device)
            if pair is None:
                pair = self._sums[flag.device] = [torch.zeros(2, device=flag.device) for _ in range(2)]
                if flag.device.type == "cuda":
                    self._pinned[flag.device] = torch.zeros(2, pin_memory=True)
                    self._events[flag.device] = torch.cuda.Event()
            i = int(local)
            pair[self._iter % 2][i:i + 1].add_(flag.reshape(1).to(torch.float32))
            self._done += 1
            self._maybe_copy()

    def expect(self) -> None:
        """A key whose exchange carries a flag was launched (its decode will call :meth:`add`)."""
        with self._lock:
            self._count += 1

    def launched(self, step: int) -> None:
        """The step's last hook call: every flagged key of step ``step`` is launched."""
        with self._lock:
            self._expected = self._count
            self._pending = (step, self._iter)
            self._maybe_copy()

    def _maybe_copy(self) -> None:
        if self._expected is None or self._done < self._expected:
            return
        for d, pair in self._sums.items():
            if d.type == "cuda":
                self._pinned[d].copy_(pair[self._iter % 2], non_blocking=True)
                self._events[d].record()

    def verdict(self) -> Verdict | None:
        """The last finished step's :class:`Verdict`, read once; None when nothing is pending."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return None
        step, it = pending
        shared = local = 0.0
        for d, pair in self._sums.items():
            self.host_reads += 1
            if d.type == "cuda":
                self._events[d].synchronize()
                a, b = self._pinned[d].tolist()
            else:
                a, b = pair[it % 2].tolist()
            shared, local = shared + a, local + b
        return Verdict(step, shared, local)

    def restore(self, state) -> None:
        """Put back what the skipped step changed: per-key tensors, per-key dicts."""
        buffers = state.buffers
        for key in self._snapped:
            for name, s in self.shadows.get(key, {}).items():
                if (key, name) not in self._fresh and name in buffers.get(key, {}):
                    buffers[key][name].copy_(s)
        for (key, name), restored in self._fresh.items():
            buffers.get(key, {}).pop(name, None)     # created again at next use: zeros or the restored one
            if restored is not None:
                state._loaded.setdefault(key, {})[name] = restored
        for attr, value in self._dicts.items():
            setattr(state, attr, dict(value))
        self.skipped_steps += 1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for v in self.shadows.values() for t in v.values())


def local_step_exchange(state, flag: torch.Tensor | None, ctx: StepContext, sync_follows: bool) -> Exchange:
    """The exchange of a step that shares no gradient (local SGD, CSER-PL), for the non-finite check.

    When a model synchronization follows this step's optimizer step, the 1-element flag is averaged
    over the ranks (:func:`local_step_verdict` reads it), with either policy: it is decided in the hook,
    before any optimizer step, so every rank takes the same way into the synchronization (a round's own
    flag would come too late: a GradScaler may already have skipped one rank's step, and with it that
    rank's synchronization). raise: every rank raises together; on a purely local step the check is
    this rank's own (it raises alone and says so; the others stop at the next synchronization with a
    collective failure). skip: an overflow on
    any rank skips the step and its synchronization on every rank, and the step runs again; on a
    purely local step an overflow is this rank's alone: its GradScaler skips its own local update,
    the state is untouched, and the ranks' step counters stay aligned (a ``local`` flag: an
    optimizer step called on it still raises)."""
    if flag is None:
        return Exchange(Kind.NONE)
    if state.guard is None and not sync_follows:
        state.check_flag(flag, ctx, local=True)
        return Exchange(Kind.NONE)
    if not sync_follows:
        state.guard.expect()
        state.guard.add(flag, local=True)
        return Exchange(Kind.NONE)
    return Exchange(Kind.ALLREDUCE, (flag,), flag)


def local_step_verdict(state, grad: torch.Tensor, received, ctx: StepContext) -> torch.Tensor:
    """Decode of :func:`local_step_exchange`: the summed flag of a synchronizing step (grad gets a NaN
    on every rank when any rank overflowed)."""
    if ctx.exchange.kind is Kind.ALLREDUCE:
        state.check_flag(received.reshape(1) * state.comm.world_size, ctx, grad)
    return grad
