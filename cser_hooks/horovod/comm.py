"""Collectives over Horovod (docs/architecture.md: the Horovod backend of ``cser_hooks/comm.py``).

:class:`HorovodCommunicator` is the :class:`~cser_hooks.comm.Communicator` the Horovod front end
(``cser_hooks.horovod``) gives the algorithms. It serves what the algorithms launch themselves
(CSER's model-block averaging, the allgather path of the non-linear compressors, the configuration
agreement); the gradient allreduce of the ``compression=`` classes is issued by Horovod's
``DistributedOptimizer`` and only counted here (:meth:`count_handed`).

Horovod matches collectives across ranks by *name*, not by call order. Every collective gets the
name ``cser_hooks.<scope>.<op><n>``: ``scope`` is set by the front end around a piece of work
(:meth:`named`, e.g. the parameter name) and ``n`` counts the collectives issued inside it, so the
names are equal on every rank as long as each rank does the same work (docs/algorithms.md §8) and they
repeat from step to step (Horovod's response cache can reuse them).

Horovod handles are wrapped in :class:`HorovodFuture`, a lazy stand-in for ``torch.futures.Future``
(``wait``/``value``/``then``): the collective runs in Horovod's background thread as soon as it is
launched, and ``wait`` synchronizes it.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

from .. import wire
from ..comm import Communicator


def _hvd():
    try:
        import horovod.torch as hvd
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError("cser_hooks.horovod needs Horovod with PyTorch support: HOROVOD_WITH_PYTORCH=1 "
                          "pip install horovod (see scripts/install_horovod.sh)") from e
    return hvd


class HorovodFuture:
    """A launched Horovod collective (or a value): ``wait()`` synchronizes once and returns the result."""

    __slots__ = ("_wait", "_done", "_value")

    def __init__(self, wait: Callable[[], Any]):
        self._wait, self._done, self._value = wait, False, None

    @classmethod
    def of(cls, value) -> HorovodFuture:
        f = cls(lambda: value)
        f.wait()
        return f

    def wait(self):
        if not self._done:
            self._value = self._wait()
            self._done, self._wait = True, None
        return self._value

    value = wait

    def done(self) -> bool:
        return self._done

    def then(self, fn: Callable[[HorovodFuture], Any]) -> HorovodFuture:
        """Like ``torch.futures.Future.then``: ``fn`` receives this (completed) future; runs at ``wait``."""
        def chained():
            self.wait()
            return fn(self)
        return HorovodFuture(chained)


class HorovodCommunicator(Communicator):
    """Collectives over Horovod's global process set (``hvd.init()`` must have run)."""

    def __init__(self):
        super().__init__()
        hvd = _hvd()
        if not hvd.is_initialized():
            raise RuntimeError("Horovod is not initialized: call hvd.init() before creating the compression "
                               "object")
        self.hvd = hvd
        self.rank = hvd.rank()
        self.world_size = hvd.size()
        self.backend = "horovod"
        self._scope = "main"
        self._seq = 0

    # -- naming ------------------------------------------------------------------------------
    @contextmanager
    def named(self, scope: str):
        """Name the collectives issued inside the block ``cser_hooks.<scope>.<op><n>``."""
        saved = self._scope, self._seq
        self._scope, self._seq = str(scope), 0
        try:
            yield self
        finally:
            self._scope, self._seq = saved

    def _name(self, op: str) -> str:
        n = self._seq
        self._seq += 1
        return f"cser_hooks.{self._scope}.{op}{n}"

    def reset_counters(self) -> None:
        super().reset_counters()
        if self._scope == "main":
            self._seq = 0

    def count_handed(self, t: torch.Tensor) -> None:
        """Count a tensor handed to Horovod by DistributedOptimizer (the ``compression=`` path: an allreduce)."""
        self._count([t], wire.ALLREDUCE)

    # -- the interface -----------------------------------------------------------------------
    def allreduce_sum_async(self, t: torch.Tensor) -> HorovodFuture:
        t0 = self._count([t], wire.ALLREDUCE)
        handle = self.hvd.allreduce_async_(t, name=self._name("allreduce"), op=self.hvd.Sum)
        return self._timed(HorovodFuture(lambda: self.hvd.synchronize(handle)), t0, lambda out: t)

    def allgather_async(self, t: torch.Tensor) -> HorovodFuture:
        """Future of a list (by rank) of tensors of t's shape (``t`` is flat and the same size everywhere)."""
        t0 = self._count([t], wire.ALLGATHER)
        if self.world_size == 1:
            return HorovodFuture.of([t])
        n = t.numel()
        handle = self.hvd.allgather_async(t.reshape(-1), name=self._name("allgather"))

        def split(out: torch.Tensor) -> list[torch.Tensor]:
            if out.numel() != n * self.world_size:
                raise RuntimeError(f"cser_hooks: allgather returned {out.numel()} elements, expected "
                                   f"{self.world_size} x {n}: the ranks handed payloads of different sizes")
            parts = out.view(self.world_size, n).unbind(0)
            if (n * out.element_size()) % 8:  # rank r's part would start unaligned for the payload views
                parts = [p.clone() for p in parts]
            return list(parts)
        return self._timed(HorovodFuture(lambda: self.hvd.synchronize(handle)), t0, split)

    def all_to_all_async(self, inputs, out_numels) -> HorovodFuture:
        """``inputs[r]`` goes to rank r; Future of the pieces received, by source rank (hvd.alltoall)."""
        if len(inputs) != self.world_size or len(out_numels) != self.world_size:
            raise ValueError(f"all_to_all needs one input and one output size per rank ({self.world_size})")
        t0 = self._count(inputs, wire.ALL_TO_ALL,
                         wire.all_to_all_bytes([x.numel() * x.element_size() for x in inputs], self.rank))
        if self.world_size == 1:
            return HorovodFuture.of([inputs[0]])
        flat = torch.cat([t.reshape(-1) for t in inputs])
        splits = torch.tensor([t.numel() for t in inputs], dtype=torch.int32)
        handle = self.hvd.alltoall_async(flat, splits=splits, name=self._name("alltoall"))
        return self._timed(HorovodFuture(lambda: self.hvd.synchronize(handle)), t0,
                           lambda out: self._split(out[0] if isinstance(out, tuple) else out, out_numels))

    def allgather_v_async(self, t: torch.Tensor, numels) -> HorovodFuture:
        """Allgather where rank r contributes ``numels[r]`` elements (Horovod's allgather takes unequal
        sizes)."""
        if len(numels) != self.world_size or int(numels[self.rank]) != t.numel():
            raise ValueError(f"allgather_v: numels must list every rank's size, this rank's = {t.numel()}")
        t0 = self._count([t], wire.ALLGATHER_V,
                         wire.allgather_v_bytes([int(n) * t.element_size() for n in numels], self.rank))
        if self.world_size == 1:
            return HorovodFuture.of([t])
        handle = self.hvd.allgather_async(t.reshape(-1), name=self._name("allgather_v"))
        return self._timed(HorovodFuture(lambda: self.hvd.synchronize(handle)), t0,
                           lambda out: self._split(out, numels))

    @staticmethod
    def _split(out: torch.Tensor, numels) -> list[torch.Tensor]:
        numels = [int(n) for n in numels]
        if out.numel() != sum(numels):
            raise RuntimeError(f"cser_hooks: received {out.numel()} elements, expected {sum(numels)} "
                               f"({numels}); the ranks disagree on the sizes")
        return list(out.split(numels))

    def sendrecv(self, sends, recvs) -> list:
        raise NotImplementedError("Horovod has no point-to-point send/recv: the gossip mode needs the DDP "
                                  "front end (torch.distributed); on Horovod use the all-reduce mode")

    def allreduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return t
        t0 = self._count([t], wire.ALLREDUCE)
        self.hvd.allreduce_(t, name=self._name("allreduce_max"), op=self.hvd.Max)
        self.comm_seconds += time.perf_counter() - t0
        return t

    def all_gather_object(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        self._count_agreement(obj)  # cloudpickle + an int32 size in Horovod: the model is a few bytes off
        return self.hvd.allgather_object(obj, name=self._name("object"))

    def broadcast_object(self, obj, root_rank: int = 0):
        if self.world_size == 1:
            return obj
        return self.hvd.broadcast_object(obj, root_rank=root_rank, name=self._name("broadcast_object"))
