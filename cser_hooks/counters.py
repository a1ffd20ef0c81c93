"""What ``stats()`` reports of a state's traffic and time: counters closed once per step.

Bytes are those this rank hands to collectives (the communicator counts them per collective);
"dense" bytes are what DDP's own allreduce would have handed over for the same buckets.
"""
from __future__ import annotations

import time

import torch


class StepCounters:
    """Byte, collective and time counters of one state (the agreement check excluded)."""

    __slots__ = ("bytes_total", "bytes_last", "dense_last", "dense_acc", "dense_total", "steps",
                 "coll_last", "coll_total", "compress_seconds", "comm_seconds")

    def __init__(self):
        self.bytes_total = self.bytes_last = self.dense_last = self.dense_acc = self.dense_total = 0
        self.steps = self.coll_last = self.coll_total = 0
        self.compress_seconds = self.comm_seconds = 0.0

    def timed(self, t0: float) -> None:
        self.compress_seconds += time.perf_counter() - t0

    def count_dense(self, grad: torch.Tensor) -> None:
        self.dense_acc += grad.numel() * grad.element_size()

    def close_step(self, comm) -> None:
        """Take this step's figures from the communicator (and reset its counters)."""
        self.bytes_last, self.coll_last = comm.bytes_sent, comm.collectives
        self.coll_total += self.coll_last
        self.comm_seconds += comm.comm_seconds
        comm.reset_counters()
        self.bytes_total += self.bytes_last
        self.dense_last, self.dense_acc = self.dense_acc, 0
        self.dense_total += self.dense_last
        self.steps += 1

    def stats(self) -> dict:
        n = max(self.steps, 1)
        return {
            "bytes_sent_total": self.bytes_total, "bytes_sent_last_step": self.bytes_last,
            "bytes_sent_mean_per_step": self.bytes_total / n,
            "dense_bytes_last_step": self.dense_last, "dense_bytes_total": self.dense_total,
            "compression_ratio": (self.bytes_total / self.dense_total) if self.dense_total else None,
            "collectives_last_step": self.coll_last, "collectives_total": self.coll_total,
            "compress_seconds": self.compress_seconds, "comm_seconds": self.comm_seconds,
        }
