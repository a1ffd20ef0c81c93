"""Checkpoints of the per-rank states beyond ``torch.save`` (README "Checkpoint and resume").

Two tools, both for the same fact: a state's ``state_dict()`` is per rank, while DCP and the trainers
save one copy.

**1. torch.distributed.checkpoint.**

A state's ``state_dict()`` is per rank (residuals, momenta and reserves differ between ranks), but
DCP treats equal keys on different ranks as one replicated value and writes a single copy. So
:class:`DCPState` puts rank r's state under the key ``rank<r>``, serialized as one bytes object
(``torch.save`` of the plain state_dict: tensors on the CPU), and ``dcp.save`` writes every rank's;
``dcp.load`` hands each rank its own back::

    import torch.distributed.checkpoint as dcp
    from cser_hooks.checkpoint import DCPState

    dcp.save({"model": model_sd, "optim": optim_sd, "cser": DCPState(state)}, checkpoint_id=path)
    ...
    dcp.load({"model": model_sd, "optim": optim_sd, "cser": DCPState(state)}, checkpoint_id=path)

DCP calls ``state_dict()`` on save (what to write) and on load (which keys to read), then
``load_state_dict()`` with what it read; the state's own ``load_state_dict`` checks settings, rank
and sizes as for a ``torch.save`` checkpoint (which keeps working: ``torch.save(state.state_dict())``).

Replicas. DCP keeps one copy of the *model* too. With EF, CompSkip and dist-EF-SGDM every replica is
the same; CSER (between full resets), Qsparse and QPRSGD (between syncs) keep replicas that differ,
so save their DCP checkpoint right after a full synchronization (a step where a CSER reset with
``c2="identity"`` or a local-SGD sync ran), or save each rank's model with ``torch.save``. Otherwise
the first step after ``dcp.load`` fails on every rank with the load-order error (the state's
parameter fingerprints see rank 0's replica), never trains on it.

``from_rank`` (load only): which saved rank's entry to read, default this rank. After a world-size
change (``on_world_size_change="reset"``, torchrun elastic) a rank the saved job did not have passes
``from_rank=0``: any saved rank's entry carries the step and the schedule, and its per-rank tensors
are dropped anyway.

**2. Trainers that save from one rank (Hugging Face Accelerate, Lightning).**

CSER, QPRSGD and Qsparse-local-SGD keep the ranks' models apart between synchronizations, every
state keeps per-rank residuals, and an optimizer with momentum or Adam moments then holds per-rank
buffers too. ``accelerator.save_state`` writes the model, the optimizer and every object given to
``register_for_checkpointing`` from the main process only (accelerate 1.16, ``checkpointing.py``:
``save(obj.state_dict(), ...)`` on the main process), so a plain ``register_for_checkpointing(state)``
would store rank 0's state for every rank and a resumed job would diverge. :class:`RankLocalCheckpoint`
is the object to register instead::

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = CSERState(c1="random_block:ratio=1/64", period=16, optimizer=optimizer.optimizer)
    model.register_comm_hook(state, cser_hook)
    accelerator.register_for_checkpointing(RankLocalCheckpoint(state, model, optimizer))

Its ``state_dict()`` runs on every rank (Accelerate calls it on all of them before the main process
writes) and gathers each rank's entry with one ``all_gather_object``: the comm-hook state's
``state_dict()``, and the model's and the optimizer's state_dict *only for the ranks whose copy
differs bitwise from rank 0's* (rank 0's is in the trainer's own files; after a full CSER reset or
with a gradient-averaging algorithm nothing extra is stored). ``load_state_dict()`` (Accelerate
calls it after restoring the model and optimizer) puts back this rank's own model, optimizer and
state, so the job continues bitwise like an uninterrupted one. A checkpoint of another world size
is refused: per-rank residuals and models cannot be split or merged.

It imports neither Accelerate nor Lightning (only ``torch.distributed``); :mod:`cser_hooks.lightning`
uses the same class from its callback.
"""
from __future__ import annotations

import hashlib
import io
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DCPState", "RankLocalCheckpoint", "rank_entry"]



class DCPState:
    """A DCP ``Stateful`` over a cser_hooks state (see the module docstring)."""

    def __init__(self, state, from_rank: int | None = None):
        if not (hasattr(state, "state_dict") and hasattr(state, "load_state_dict") and hasattr(state, "comm")):
            raise TypeError(f"DCPState wraps a cser_hooks state (EFState, CSERState, ...), got {type(state).__name__}")
        if from_rank is not None and (isinstance(from_rank, bool) or not isinstance(from_rank, int) or from_rank < 0):
            raise ValueError(f"DCPState: from_rank must be a rank number >= 0 or None, got {from_rank!r}")
        self.state = state
        self.from_rank = from_rank

    @property
    def key(self) -> str:
        return f"rank{self.state.comm.rank if self.from_rank is None else self.from_rank}"

    def state_dict(self) -> dict[str, Any]:
        buf = io.BytesIO()
        torch.save(self.state.state_dict(), buf)
        return {self.key: buf.getvalue()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        blob = sd.get(self.key)
        if not isinstance(blob, bytes | bytearray) or not blob:
            raise ValueError(f"DCPState: the checkpoint has no entry {self.key!r} (saved by another world size? pass "
                             f"from_rank=0 with on_world_size_change='reset')")
        self.state.load_state_dict(torch.load(io.BytesIO(blob), weights_only=False))


# --------------------------------------------------------------------------------------------------
# trainers that save from one rank

FORMAT = 1


def _cpu(obj):
    """``obj`` with every tensor detached, cloned and on the CPU (all_gather_object pickles it)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _digest(obj, h=None) -> str:
    """SHA-256 of a nested state_dict: keys, structure, and each tensor's dtype, shape and bytes."""
    h = hashlib.sha256() if h is None else h
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _digest(obj[k], h)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _digest(v, h)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())
    return h.hexdigest()


def _world() -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("cser_hooks: RankLocalCheckpoint needs torch.distributed initialized (it gathers every "
                           "rank's state); create it after accelerator.prepare(...) / inside Trainer.fit")
    return dist.get_rank(), dist.get_world_size()


def rank_entry(sd: dict[str, Any], what: str = "RankLocalCheckpoint") -> dict[str, Any]:
    """This rank's entry of a :meth:`RankLocalCheckpoint.state_dict`, or a ValueError naming the fix
    (not such a dict; saved by a job of another world size)."""
    rank, world = _world()
    if not isinstance(sd, dict) or sd.get("format") != FORMAT or "ranks" not in sd:
        raise ValueError(f"cser_hooks: {what}: this checkpoint entry was not written by {what} "
                         f"(expected the dict its state_dict() returns)")
    if sd["world_size"] != world:
        raise ValueError(
            f"cser_hooks: {what}: the checkpoint holds the comm-hook state of {sd['world_size']} ranks, "
            f"this job has {world}. Each rank's residuals, masks' position and (CSER, QPRSGD, Qsparse) model "
            f"are its own and cannot be split or merged: resume with {sd['world_size']} processes (devices x "
            f"nodes), or start a fresh run from the model weights alone without restoring the trainer state.")
    return sd["ranks"][rank]


class RankLocalCheckpoint:
    """Every rank's comm-hook state (and the model and optimizer where a rank's differ) in one checkpoint.

    Knobs:
      state: the comm-hook state registered on the DDP model (``CSERState``, ``EFState``, ...).
      model: the module whose parameters each rank keeps apart (the prepared DDP model, or the
          Lightning module); ``None`` stores no model (only for algorithms that keep the replicas
          identical: EF, CompSkip, dist-EF-SGDM).
      optimizer: the optimizer (Accelerate's wrapper or a ``torch.optim`` one); its momentum / Adam
          buffers follow the rank's gradient and differ per rank. ``None`` stores none.
      what: name used in error messages (the class that saves the checkpoint).
    """

    def __init__(self, state, model=None, optimizer=None, what: str = "RankLocalCheckpoint"):
        if not hasattr(state, "state_dict") or not hasattr(state, "load_state_dict"):
            raise TypeError(f"cser_hooks: {what} needs a comm-hook state (CSERState, EFState, ...), got "
                            f"{type(state).__name__}")
        self.state, self.model, self.optimizer, self.what = state, model, optimizer, what

    def _parts(self) -> dict[str, Any]:
        parts = {}
        if self.model is not None:
            parts["model"] = self.model.state_dict()
        if self.optimizer is not None:
            parts["optimizer"] = self.optimizer.state_dict()
        return parts

    def state_dict(self) -> dict[str, Any]:
        """Collective: call it on every rank. Returns the same dict on every rank."""
        rank, world = _world()
        parts = self._parts()
        digests = [None] * world
        dist.all_gather_object(digests, {k: _digest(v) for k, v in parts.items()})
        mine = {"state": self.state.state_dict()}
        for k, v in parts.items():  # rank 0's copy is in the trainer's own files
            mine[k] = _cpu(v) if rank != 0 and digests[rank][k] != digests[0][k] else None
        entries = [None] * world
        dist.all_gather_object(entries, mine)
        return {"format": FORMAT, "world_size": world, "ranks": entries}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore this rank's entry: model and optimizer (where saved for this rank), then the state.

        Call it after the trainer restored rank 0's model and optimizer (Accelerate's ``load_state``
        does, custom objects come last) and after ``DDP(model)`` (its constructor broadcasts rank 0's
        parameters)."""
        self.apply(rank_entry(sd, self.what))

    def apply(self, entry: dict[str, Any]) -> None:
        """Restore one entry of :func:`rank_entry` (this rank's)."""
        if entry.get("model") is not None:
            if self.model is None:
                raise ValueError(f"cser_hooks: {self.what}: the checkpoint holds this rank's own model but no model "
                                 f"was given to restore it into")
            self.model.load_state_dict(entry["model"])
        if entry.get("optimizer") is not None:
            if self.optimizer is None:
                raise ValueError(f"cser_hooks: {self.what}: the checkpoint holds this rank's optimizer state but "
                                 f"no optimizer was given to restore it into")
            self.optimizer.load_state_dict(entry["optimizer"])
        self.state.load_state_dict(entry["state"])
