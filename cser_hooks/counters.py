"""What ``stats()`` reports of a state's traffic and time: counters closed once per step.

Two byte counts per collective, both taken from the communicator (cser_hooks/comm.py):

* *handed* bytes (``bytes_sent_*``): what this rank hands to collectives, the payload;
* *wire* bytes (``wire_bytes_*``): what this rank puts on the network for them under the ring /
  pairwise model of cser_hooks/wire.py: 2(W−1)/W · n for an allreduce of n bytes, (W−1) · n for an
  allgather, Σ_{j≠r} n_j for an all_to_all or an unequal allgather_v, n per point-to-point send.

"Dense" bytes are what DDP's own allreduce would have handed over for the same buckets, and
"dense wire" bytes what that dense ring allreduce puts on the wire, 2(W−1)/W · dense. The handed
ratio (``compression_ratio``) counts an allgather's payload once although it travels to W−1 ranks,
so it flatters allgather methods by about W/2 against allreduce ones; ``wire_compression_ratio``
compares like with like. The one-time configuration agreement (``all_gather_object``) is excluded
from both and reported as ``agreement_bytes``.
"""
from __future__ import annotations

import time

import torch

from . import wire


def _add(total: dict, step: dict) -> None:
    for k, v in step.items():
        total[k] = total.get(k, 0) + v


class StepCounters:
    """Byte, collective and time counters of one state (the agreement check excluded)."""

    __slots__ = ("bytes_total", "bytes_last", "dense_last", "dense_acc", "dense_total", "steps",
                 "coll_last", "coll_total", "compress_seconds", "comm_seconds",
                 "wire_total", "wire_last", "dense_wire_last", "dense_wire_total", "wire_by", "handed_by",
                 "agreement_bytes", "agreement_wire", "agreement_collectives", "uncompressed_keys",
                 "uncompressed_bytes")

    def __init__(self):
        self.bytes_total = self.bytes_last = self.dense_last = self.dense_acc = self.dense_total = 0
        self.steps = self.coll_last = self.coll_total = 0
        self.compress_seconds = self.comm_seconds = 0.0
        self.wire_total = self.wire_last = self.dense_wire_last = self.dense_wire_total = 0
        self.wire_by: dict[str, int] = {}
        self.handed_by: dict[str, int] = {}
        self.agreement_bytes = self.agreement_wire = self.agreement_collectives = 0
        self.uncompressed_keys: set = set()
        self.uncompressed_bytes = 0

    def timed(self, t0: float) -> None:
        self.compress_seconds += time.perf_counter() - t0

    def count_dense(self, grad: torch.Tensor) -> None:
        self.dense_acc += grad.numel() * grad.element_size()

    def count_uncompressed(self, key, grad: torch.Tensor) -> None:
        """A key sent dense because it is smaller than ``min_compress_numel``."""
        self.uncompressed_keys.add(key)
        self.uncompressed_bytes += grad.numel() * grad.element_size()

    def close_step(self, comm) -> None:
        """Take this step's figures from the communicator (and reset its counters).

        Dense wire bytes of the step: :func:`cser_hooks.wire.dense_allreduce_bytes` of the step's
        dense bytes, ⌊2(W−1)/W · dense⌋ (W = ``comm.world_size``)."""
        self.bytes_last, self.coll_last = comm.bytes_sent, comm.collectives
        self.wire_last = comm.wire_bytes
        _add(self.wire_by, comm.wire_by)
        _add(self.handed_by, comm.handed_by)
        self.agreement_bytes, self.agreement_wire = comm.agreement_bytes, comm.agreement_wire_bytes
        self.agreement_collectives = comm.agreement_collectives
        self.coll_total += self.coll_last
        self.comm_seconds += comm.comm_seconds
        comm.reset_counters()
        self.bytes_total += self.bytes_last
        self.wire_total += self.wire_last
        self.dense_last, self.dense_acc = self.dense_acc, 0
        self.dense_total += self.dense_last
        self.dense_wire_last = wire.dense_allreduce_bytes(self.dense_last, comm.world_size)
        self.dense_wire_total += self.dense_wire_last
        self.steps += 1

    def stats(self) -> dict:
        """Handed bytes (``bytes_sent_*``, ``compression_ratio`` = handed / dense) as before, and:

        * ``wire_bytes_total`` / ``_last_step`` / ``_mean_per_step``: this rank's bytes on the wire
          (ring model, cser_hooks/wire.py);
        * ``wire_bytes_by_collective`` / ``bytes_sent_by_collective``: kind -> wire / handed bytes,
          since construction (kinds: allreduce, allgather, allgather_v, all_to_all, sendrecv);
        * ``dense_wire_bytes_total`` / ``_last_step``: DDP's dense ring allreduce of the same buckets,
          2(W−1)/W · dense bytes;
        * ``wire_compression_ratio``: wire / dense wire (None until a step with dense traffic at W > 1);
        * ``uncompressed_keys`` / ``uncompressed_bytes_total``: keys (buckets, tensors) sent dense because
          they are smaller than ``min_compress_numel``, and the bytes they handed (in the totals above);
        * ``agreement_bytes`` (wire, (W−1)·(8 + pickle)), ``agreement_bytes_handed``,
          ``agreement_collectives``: the configuration agreement and load-order checks
          (``all_gather_object``), cumulative, in none of the totals and ratios above.
        """
        n = max(self.steps, 1)
        return {
            "bytes_sent_total": self.bytes_total, "bytes_sent_last_step": self.bytes_last,
            "uncompressed_keys": len(self.uncompressed_keys), "uncompressed_bytes_total": self.uncompressed_bytes,
            "bytes_sent_mean_per_step": self.bytes_total / n,
            "dense_bytes_last_step": self.dense_last, "dense_bytes_total": self.dense_total,
            "compression_ratio": (self.bytes_total / self.dense_total) if self.dense_total else None,
            "collectives_last_step": self.coll_last, "collectives_total": self.coll_total,
            "compress_seconds": self.compress_seconds, "comm_seconds": self.comm_seconds,
            "wire_bytes_total": self.wire_total, "wire_bytes_last_step": self.wire_last,
            "wire_bytes_mean_per_step": self.wire_total / n,
            "wire_bytes_by_collective": dict(self.wire_by), "bytes_sent_by_collective": dict(self.handed_by),
            "dense_wire_bytes_total": self.dense_wire_total, "dense_wire_bytes_last_step": self.dense_wire_last,
            "wire_compression_ratio": (self.wire_total / self.dense_wire_total) if self.dense_wire_total else None,
            "agreement_bytes": self.agreement_wire, "agreement_bytes_handed": self.agreement_bytes,
            "agreement_collectives": self.agreement_collectives,
        }
