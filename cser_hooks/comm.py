"""The one place that issues collectives (docs/architecture.md: communicator).

Algorithms talk to a :class:`Communicator`; the DDP front end gives them a
:class:`TorchDistCommunicator` over a ``torch.distributed`` process group, the Horovod front end a
Horovod one. Every tensor handed to a collective is counted here (``bytes_sent``), so the byte
accounting is the payload actually given to the network layer, not an estimate.

Ordering rule (docs/algorithms.md §8): collectives are *launched* only from the hook call itself (or a
post-optimizer-step callback), never from a Future callback, so every rank issues them in the same
order whatever the completion order of earlier work. Callbacks only do local math.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from .progress import ProgressWatch

Future = torch.futures.Future


def completed(value) -> Future:
    fut: Future = torch.futures.Future()
    fut.set_result(value)
    return fut


class Communicator:
    """Interface. ``*_async`` return a Future whose value is the result; others block."""

    rank: int = 0
    world_size: int = 1
    label: str = ""   # what the next collectives are for ("step 5, bucket 0"), set by the front ends

    def __init__(self) -> None:
        self.bytes_sent = 0          # bytes handed to collectives since the last reset_counters()
        self.comm_seconds = 0.0      # wall time from launch to completion callback, summed
        self.collectives = 0

    def reset_counters(self) -> None:
        self.bytes_sent, self.comm_seconds, self.collectives = 0, 0.0, 0

    def _count(self, tensors: Sequence[torch.Tensor]) -> float:
        self.bytes_sent += sum(t.numel() * t.element_size() for t in tensors)
        self.collectives += 1
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
        (own chunk included: the bytes handed to the collective)."""
        raise NotImplementedError

    def allgather_v_async(self, t: torch.Tensor, numels: Sequence[int]) -> Future:
        """Allgather where rank r contributes ``numels[r]`` elements (sizes known on every rank, e.g.
        0 for a rank with nothing to send). Future of the list by rank. Counts ``t`` once, as
        :meth:`allgather_async` does."""
        raise NotImplementedError

    def sendrecv(self, sends: Sequence[tuple], recvs: Sequence[tuple]) -> list:
        """Point-to-point: ``sends`` = [(tensor, peer rank)], ``recvs`` = [(numel, dtype, peer rank)];
        all started together, then waited for (blocking). Returns the received tensors in ``recvs``
        order. Counts every sent tensor. Peers must post the matching calls (e.g. ring neighbours)."""
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

    def _count(self, tensors):
        t0 = super()._count(tensors)
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
        t0 = self._count([t])
        fut = dist.all_reduce(t, group=self.group, async_op=True).get_future()
        return self._timed(fut, t0, lambda _: t)

    def allgather_async(self, t):
        if self.world_size == 1:
            self._end(self._count([t]))
            return completed([t])
        t0 = self._count([t])
        outs: list[torch.Tensor] = [torch.empty_like(t) for _ in range(self.world_size)]
        fut = dist.all_gather(outs, t, group=self.group, async_op=True).get_future()
        return self._timed(fut, t0, lambda _: outs)

    def allreduce_max(self, t):
        if self.world_size == 1:
            return t
        t0 = self._count([t])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        self._end(t0)
        return t

    def all_gather_object(self, obj):
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        t0 = self._count([])
        dist.all_gather_object(out, obj, group=self.group)
        self._end(t0)
        self.collectives -= 1  # the agreement check: not one of the algorithm's collectives
        return out

    def all_to_all_async(self, inputs, out_numels):
        if len(inputs) != self.world_size or len(out_numels) != self.world_size:
            raise ValueError(f"all_to_all needs one input and one output size per rank ({self.world_size})")
        t0 = self._count(inputs)
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
        t0 = self._count([t])
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
        t0 = self._count([t for t, _ in sends])
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

