"""Byte and time counters for the baselines, shaped like ``state.stats()`` of cser_hooks' states.

cser_hooks' own states count what they hand to collectives. For torch's built-in hooks and for DDP
without a hook the bench counts the payload itself:

* :class:`NoHookMeter` (dense allreduce, DDP's C++ reducer): every step allreduces every gradient,
  ``sum(numel * element_size)`` bytes; the reducer cannot be timed from Python, so the time fields
  are ``None`` (the table prints "n/a").
* :class:`HookMeter` wraps a torch hook. Bytes per bucket come from a payload function (fp16: 2 bytes
  an element; PowerSGD: the uncompressed tensors plus P and Q, following ``powerSGD_hook``'s own
  choice of which tensors to compress). ``compress_seconds`` is the time spent inside the hook call
  (compression and launching), ``comm_seconds`` the time from its return until the result is ready
  (collectives and their callbacks) -- an approximation for hooks that compress inside callbacks.

Every baseline's collective is an allreduce, so its wire bytes (what the rank puts on the network)
follow from the same ring model as the states' (:mod:`cser_hooks.wire`): 2(W−1)/W x the payload
per bucket, and the dense reference 2(W−1)/W x the dense bytes per step.

Steps are closed by an optimizer step post-hook, so the meters need the optimizer.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from cser_hooks import wire


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class Meter:
    def __init__(self, optimizer, world: int | None = None):
        self.step = 0
        self.world = _world() if world is None else int(world)
        self.bytes_total = self.bytes_last = self._bytes_acc = 0
        self.dense_total = self.dense_last = self._dense_acc = 0
        self.wire_total = self.wire_last = self._wire_acc = 0
        self.dense_wire_total = self.dense_wire_last = 0
        self.compress_seconds: float | None = 0.0
        self.comm_seconds: float | None = 0.0
        self.buckets = 0
        self._handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: self._close_step())

    def _close_step(self) -> None:
        self.bytes_last, self._bytes_acc = self._bytes_acc, 0
        self.dense_last, self._dense_acc = self._dense_acc, 0
        self.wire_last, self._wire_acc = self._wire_acc, 0
        self.bytes_total += self.bytes_last
        self.dense_total += self.dense_last
        self.wire_total += self.wire_last
        self.dense_wire_last = wire.dense_allreduce_bytes(self.dense_last, self.world)
        self.dense_wire_total += self.dense_wire_last
        self.step += 1

    def stats(self) -> dict[str, Any]:
        return {"algorithm": type(self).__name__, "step": self.step, "bytes_sent_total": self.bytes_total,
                "bytes_sent_last_step": self.bytes_last, "dense_bytes_last_step": self.dense_last,
                "dense_bytes_total": self.dense_total, "compress_seconds": self.compress_seconds,
                "comm_seconds": self.comm_seconds, "buckets": self.buckets,
                "wire_bytes_total": self.wire_total, "wire_bytes_last_step": self.wire_last,
                "wire_bytes_by_collective": {wire.ALLREDUCE: self.wire_total},
                "dense_wire_bytes_total": self.dense_wire_total, "dense_wire_bytes_last_step": self.dense_wire_last,
                "wire_compression_ratio": (self.wire_total / self.dense_wire_total) if self.dense_wire_total
                else None}


class NoHookMeter(Meter):
    """DDP's built-in allreduce: all gradients, every step."""

    def __init__(self, optimizer, world: int | None = None):
        super().__init__(optimizer, world)
        self.compress_seconds = self.comm_seconds = None
        self._per_step = sum(p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"]
                             if p.requires_grad)

    def _close_step(self) -> None:
        self._bytes_acc = self._dense_acc = self._per_step
        self._wire_acc = wire.allreduce_bytes(self._per_step, self.world)
        super()._close_step()


class HookMeter(Meter):
    """Wraps ``hook(inner_state, bucket)``; ``payload(inner_state, bucket) -> bytes`` is evaluated first."""

    def __init__(self, optimizer, inner_state, inner_hook: Callable, payload: Callable[[Any, Any], int],
                 world: int | None = None):
        super().__init__(optimizer, world)
        self.inner_state = inner_state
        self.inner_hook = inner_hook
        self.payload = payload

    def __call__(self, bucket):
        t0 = time.perf_counter()
        buf = bucket.buffer()
        self._dense_acc += buf.numel() * buf.element_size()
        payload = int(self.payload(self.inner_state, bucket))
        self._bytes_acc += payload
        self._wire_acc += wire.allreduce_bytes(payload, self.world)
        self.buckets = max(self.buckets, bucket.index() + 1)
        fut = self.inner_hook(self.inner_state, bucket)
        t1 = time.perf_counter()
        self.compress_seconds += t1 - t0

        def done(f):
            self.comm_seconds += time.perf_counter() - t1
            return f.value()

        return fut.then(done)


def metered_hook(meter: HookMeter, bucket):
    """The comm hook to register with a :class:`HookMeter` as its state."""
    return meter(bucket)


# -- payload sizes -----------------------------------------------------------------------------

def dense_payload(_state, bucket) -> int:
    buf = bucket.buffer()
    return buf.numel() * buf.element_size()


def fp16_payload(_state, bucket) -> int:
    return bucket.buffer().numel() * 2


def powersgd_payload(state, bucket) -> int:
    """Bytes ``powerSGD_hook`` allreduces for ``bucket`` (its own compress/skip rule, re-derived).

    Before ``start_powerSGD_iter`` it allreduces the whole bucket. Afterwards: tensors whose
    ``(n + m) * r * min_compression_rate < n * m`` (matrix view ``n x m``, r = min(n, m, rank)) send
    P (n x r) and Q (m x r); all the others are allreduced uncompressed.
    """
    buf = bucket.buffer()
    size = buf.element_size()
    if state.iter < state.start_powerSGD_iter:
        return buf.numel() * size
    elems = 0
    for t in bucket.gradients():
        n = t.shape[0]
        m = t.numel() // n if n else 0
        r = min(n, m, state.matrix_approximation_rank)
        if (n + m) * r * state.min_compression_rate < n * m:
            elems += (n + m) * r
        else:
            elems += t.numel()
    return elems * size
