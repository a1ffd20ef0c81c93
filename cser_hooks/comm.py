"""The one place that issues collectives (docs/architecture.md: communicator).

Algorithms talk to a :class:`Communicator`; the DDP front end gives them a
:class:`TorchDistCommunicator` over a ``torch.distributed`` process group, the Horovod front end a
Horovod one. Every tensor handed to a collective is counted here, twice, per collective kind
(``allreduce``, ``allgather``, ``allgather_v``, ``all_to_all``, ``sendrecv``: cser_hooks/wire.py):

* ``bytes_sent`` / ``handed_by``: the payload actually given to the network layer (exact);
* ``wire_bytes`` / ``wire_by``: what this rank then puts on the wire under the ring / pairwise model
  of :mod:`cser_hooks.wire` (2(W−1)/W · n for an allreduce, (W−1) · n for an allgather, the pieces
  for other ranks for an all_to_all, the sends for point-to-point; 0 at W = 1).

Both are integer sums per collective from the tensors' sizes (no host sync, no tensor read).
The configuration agreement (``all_gather_object``) is not one of the algorithm's collectives: it
is counted apart, cumulatively, in ``agreement_bytes`` (handed: the pickle and its size) and
``agreement_wire_bytes``; :class:`~cser_hooks.counters.StepCounters` reports it beside the rest.

Ordering rule (docs/algorithms.md §8): collectives are *launched* only from the hook call itself (or a
post-optimizer-step callback), never from a Future callback, so every rank issues them in the same
order whatever the completion order of earlier work. Callbacks only do local math.
"""
from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from . import wire
from .progress import ProgressWatch

Future = torch.futures.Future


def completed(value) -> Future:
    fut: Future = torch.futures.Future()
    fut.set_result(value)
    return fut


# ring model of the collectives whose wire bytes follow from this rank's handed bytes alone
RING: dict[str, Callable[[int, int], int]] = {wire.ALLREDUCE: wire.allreduce_bytes,
                                              wire.ALLGATHER: wire.allgather_bytes}


class Communicator:
    """Interface. ``*_async`` return a Future whose value is the result; others block."""

    rank: int = 0
    world_size: int = 1
    label: str = ""   # what the next collectives are for ("step 5, bucket 0"), set by the front ends

    def __init__(self) -> None:
        self.bytes_sent = 0          # bytes handed to collectives since the last reset_counters()
        self.wire_bytes = 0          # bytes this rank puts on the wire for them (cser_hooks/wire.py)
        self.handed_by: dict[str, int] = {}   # collective kind -> bytes handed, since the last reset
        self.wire_by: dict[str, int] = {}     # collective kind -> wire bytes, since the last reset
        self.comm_seconds = 0.0      # wall time from launch to completion callback, summed
        self.collectives = 0
        # the configuration agreement (all_gather_object): cumulative, never reset, not in the above
        self.agreement_bytes = self.agreement_wire_bytes = self.agreement_collectives = 0

    def reset_counters(self) -> None:
        self.bytes_sent, self.wire_bytes, self.comm_seconds, self.collectives = 0, 0, 0.0, 0
        self.handed_by, self.wire_by = {}, {}

    def _count(self, tensors: Sequence[torch.Tensor], kind: str | None = None,
               wire_bytes: int | None = None) -> float:
        """Count one collective of ``kind`` over ``tensors`` (the bytes handed to it) and its wire
        bytes: ``wire_bytes`` when the caller knows them (all_to_all, allgather_v, sendrecv), else the
        ring model of ``kind`` (:data:`RING`). A communicator that names no kind (``kind=None``) has
        its bytes reported under ``"unclassified"``, on the wire as handed (no model applied)."""
        handed = sum(t.numel() * t.element_size() for t in tensors)
        if kind is None:
            kind = "unclassified"
            sent = handed if wire_bytes is None else wire_bytes
        else:
            sent = RING[kind](handed, self.world_size) if wire_bytes is None else wire_bytes
        self.bytes_sent += handed
        self.wire_bytes += sent
        self.handed_by[kind] = self.handed_by.get(kind, 0) + handed
        self.wire_by[kind] = self.wire_by.get(kind, 0) + sent
        self.collectives += 1
        return time.perf_counter()

    def _count_agreement(self, obj) -> float:
        """Count an ``all_gather_object`` (the agreement and load-order checks) apart from the algorithm's
        collectives: the pickle torch sends and its int64 size, (W−1)·(8 + n) on the wire
        (:func:`cser_hooks.wire.object_allgather_bytes`). Pickles ``obj`` once: these run once per job."""
        n = len(pickle.dumps(obj))
        self.agreement_bytes += 8 + n
        self.agreement_wire_bytes += wire.object_allgather_bytes(n, self.world_size)
        self.agreement_collectives += 1
        return time.perf_counter()

    def _timed(self, fut: Future, t0: float, fn: Callable[[Any], Any]) -> Future:
        def done(f):
            self.comm_seconds += time.perf_counter() - t0
            return fn(f.value())
        return fut.then(done)

    # -- to implement ----------------------------------------------------------------------
    def allreduce_sum_async(self, t: torch.Tensor) -> Future:
        raise NotImplementedError

    def allgather_async(self, t: torch.Tensor) -> Future:
        """Future of a list (by rank) of tensors of t's shape."""
        raise NotImplementedError

    def all_gather_object(self, obj) -> list:
        raise NotImplementedError

    def all_to_all_async(self, inputs: Sequence[torch.Tensor], out_numels: Sequence[int]) -> Future:
        """Send ``inputs[r]`` to rank r; Future of the list (by source rank) of received tensors,
        ``out_numels[j]`` elements from rank j, dtype of ``inputs[0]``. Counts every input tensor
        (own chunk included: the bytes handed to the collective); on the wire only the pieces for
        the other ranks, Σ_{j≠rank} (:func:`cser_hooks.wire.all_to_all_bytes`)."""
        raise NotImplementedError

    def allgather_v_async(self, t: torch.Tensor, numels: Sequence[int]) -> Future:
        """Allgather where rank r contributes ``numels[r]`` elements (sizes known on every rank, e.g.
        0 for a rank with nothing to send). Future of the list by rank. Counts ``t`` once, as
        :meth:`allgather_async` does; on the wire (W−1)·|t| (:func:`cser_hooks.wire.allgather_v_bytes`)."""
        raise NotImplementedError

    def sendrecv(self, sends: Sequence[tuple], recvs: Sequence[tuple]) -> list:
        """Point-to-point: ``sends`` = [(tensor, peer rank)], ``recvs`` = [(numel, dtype, peer rank)];
        all started together, then waited for (blocking). Returns the received tensors in ``recvs``
        order. Counts every sent tensor, on the wire too (:func:`cser_hooks.wire.p2p_bytes`). Peers must
        post the matching calls (e.g. ring neighbours)."""
        raise NotImplementedError

    # -- built on the above ----------------------------------------------------------------
    def allreduce_mean_async(self, t: torch.Tensor) -> Future:
        """Average ``t`` over ranks in place. Divides *before* the sum so fp16 cannot overflow."""
        if self.world_size == 1:
            return completed(t)
        t.div_(self.world_size)
        return self.allreduce_sum_async(t)

    def allreduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.allreduce_mean_async(t).wait()

    def allreduce_max(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TorchDistCommunicator(Communicator):
    """Collectives over a torch.distributed process group (gloo, NCCL, ...).

    ``progress_timeout``: seconds a collective may stay in flight before the process reports it and
    exits (cser_hooks/progress.py); None (default) leaves it to the process group's timeout.
    ``label`` names what the next collectives are for (set by the front end: step and bucket), for
    that report and for the errors of a failed collective."""

    def __init__(self, process_group=None, progress_timeout: float | None = None):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call dist.init_process_group(...) "
                               "before creating the hook state")
        self.group = process_group if process_group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.backend = dist.get_backend(self.group)
        self.label = "the first step"
        self.watch = None if progress_timeout is None else ProgressWatch(progress_timeout, self.rank)
        self._tokens: dict[float, int] = {}

    def _count(self, tensors, kind=None, wire_bytes=None):
        return self._watched(super()._count(tensors, kind, wire_bytes))

    def _watched(self, t0: float) -> float:
        if self.watch is not None:
            self._tokens[t0] = self.watch.begin(self.label)
        return t0

    def _end(self, t0: float) -> None:
        self.comm_seconds += time.perf_counter() - t0
        if self.watch is not None:
            self.watch.end(self._tokens.pop(t0, -1))

    def _timed(self, fut, t0, fn):
        def done(f):
            self._end(t0)
            return fn(f.value())
        return fut.then(done)

    def allreduce_sum_async(self, t):
        t0 = self._count([t], wire.ALLREDUCE)
        fut = dist.all_reduce(t, group=self.group, async_op=True).get_future()
        return self._timed(fut, t0, lambda _: t)

    def allgather_async(self, t):
        if self.world_size == 1:
            self._end(self._count([t], wire.ALLGATHER))
            return completed([t])
        t0 = self._count([t], wire.ALLGATHER)
        outs: list[torch.Tensor] = [torch.empty_like(t) for _ in range(self.world_size)]
        fut = dist.all_gather(outs, t, group=self.group, async_op=True).get_future()
        return self._timed(fut, t0, lambda _: outs)

    def allreduce_max(self, t):
        if self.world_size == 1:
            return t
        t0 = self._count([t], wire.ALLREDUCE)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        self._end(t0)
        return t

    def all_gather_object(self, obj):
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        t0 = self._watched(self._count_agreement(obj))  # not one of the algorithm's collectives
        dist.all_gather_object(out, obj, group=self.group)
        self._end(t0)
        return out

    def all_to_all_async(self, inputs, out_numels):
        if len(inputs) != self.world_size or len(out_numels) != self.world_size:
            raise ValueError(f"all_to_all needs one input and one output size per rank ({self.world_size})")
        t0 = self._count(inputs, wire.ALL_TO_ALL,
                         wire.all_to_all_bytes([t.numel() * t.element_size() for t in inputs], self.rank))
        if self.world_size == 1:
            self._end(t0)
            return completed([inputs[0]])
        flat = torch.cat([t.reshape(-1) for t in inputs])
        return self._alltoallv(flat, [t.numel() for t in inputs], out_numels, t0)

    def allgather_v_async(self, t, numels):
        if len(numels) != self.world_size or int(numels[self.rank]) != t.numel():
            raise ValueError(f"allgather_v: numels must list every rank's size, this rank's = {t.numel()}")
        if len(set(int(n) for n in numels)) == 1:
            return self.allgather_async(t)
        es = t.element_size()
        t0 = self._count([t], wire.ALLGATHER_V, wire.allgather_v_bytes([int(n) * es for n in numels], self.rank))
        # an all_to_all that sends the same tensor to every rank: unequal sizes, one collective
        flat = t.reshape(-1).repeat(self.world_size)
        return self._alltoallv(flat, [t.numel()] * self.world_size, numels, t0)

    def _alltoallv(self, flat, in_numels, out_numels, t0) -> Future:
        """gloo's list all_to_all needs equal sizes; all_to_all_single takes split sizes. The received
        pieces are views of one buffer (a piece may start at an odd byte: clone before .view(dtype))."""
        out_numels = [int(n) for n in out_numels]
        out = torch.empty(sum(out_numels), dtype=flat.dtype, device=flat.device)
        fut = dist.all_to_all_single(out, flat, output_split_sizes=out_numels, input_split_sizes=list(in_numels),
                                     group=self.group, async_op=True).get_future()
        return self._timed(fut, t0, lambda _: list(out.split(out_numels)))

    def _global(self, r: int) -> int:
        return r if self.group is dist.group.WORLD else dist.get_global_rank(self.group, r)

    def sendrecv(self, sends, recvs):
        t0 = self._count([t for t, _ in sends], wire.SENDRECV,
                         wire.p2p_bytes([(t.numel() * t.element_size(), r) for t, r in sends], self.rank))
        outs = [torch.empty(int(n), dtype=dt, device=(sends[0][0].device if sends else "cpu"))
                for n, dt, _ in recvs]
        # one batch (sends first, then receives): NCCL runs a batch as one group call, so no ordering of
        # the peers' posts can deadlock; gloo posts them one by one, which is deadlock-free too
        ops = [dist.P2POp(dist.isend, t.reshape(-1), self._global(r), self.group) for t, r in sends]
        ops += [dist.P2POp(dist.irecv, o, self._global(r), self.group) for o, (_, _, r) in zip(outs, recvs)]
        for w in (dist.batch_isend_irecv(ops) if ops else []):
            w.wait()
        self._end(t0)
        return outs


def collective_failure(comm: Communicator, who: str, where: str, err: BaseException) -> RuntimeError:
    """The error a user sees when a collective fails: who, when, the likely cause, then the backend's text."""
    if str(err).startswith("cser_hooks"):
        return err if isinstance(err, RuntimeError) else RuntimeError(str(err))
    backend = " ".join(str(err).replace("Got the following error when running the callback: ", "").split())[:400]
    return RuntimeError(
        f"cser_hooks: rank {comm.rank} of {comm.world_size}, {where} ({who}): a collective failed. Most likely "
        f"another rank exited (crashed, killed, out of memory) or lost its connection: the first error is in "
        f"that rank's log. Backend said: {backend}")
