"""``torch.distributed.checkpoint`` (DCP) for every state: each rank's state as an entry of its own.

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
"""
from __future__ import annotations

import io
from typing import Any

import torch


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
