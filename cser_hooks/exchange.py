"""Turning a compressor payload into one collective and back (used by every algorithm).

* shared-mask (linear) compressors: the values and the 1-element non-finite flag are sent in *one*
  allreduce (mean); the average is decompressed straight into the gradient buffer.
* other compressors: the payload tensors and the flag are packed into *one* uint8 buffer per rank
  and allgathered (payload sizes are a function of numel only, so every rank's buffer has the
  same size); each rank's payload is decompressed and averaged. Inside the buffer the flag comes
  first and the parts follow by decreasing element size, so every part stays aligned for its
  dtype without padding bytes: the buffer is exactly flag + wire_bytes long.
One collective per bucket keeps the order trivially identical on every rank.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from .comm import Communicator, Future, completed
from .compressors import Compressor, MaskKey


class Kind(Enum):
    """How an :class:`Exchange` travels."""

    NONE = "none"            # nothing to send (local steps, skipped steps)
    ALLREDUCE = "allreduce"  # tensors[0] is averaged over ranks: a shared-mask payload
    ALLGATHER = "allgather"  # every rank's packed payload is gathered (exchange.pack / unpack)


@dataclass
class Exchange:
    """What ``encode`` asks the front end to communicate.

    kind: a :class:`Kind`; tensors: what the collective carries.
    ``flag``: a 1-element float tensor, 1 where this rank's input was non-finite; it travels with
    the payload so all ranks learn about it and fail together (no hang, no silent divergence).
    ``layout``: for ALLGATHER, the payload parts' (index, dtype, numel) in packing order
    (``exchange.unpack`` reads every rank's buffer with it). ``carry``: what the algorithm's own
    ``encode`` hands to its ``decode`` (CSER's local residual r_i, dist-EF-SGDM's chunk plan).
    """

    kind: Kind
    tensors: tuple = ()
    flag: torch.Tensor | None = None
    layout: list | None = None
    carry: Any = None

    def __post_init__(self):
        if not isinstance(self.kind, Kind):
            raise TypeError(f"Exchange.kind must be a Kind (Kind.NONE/ALLREDUCE/ALLGATHER), got {self.kind!r}")


@dataclass
class StepContext:
    """Captured at the hook call, used by the (possibly later) decode: the step may advance meanwhile."""

    key: Any
    step: int
    numel: int
    segments: Sequence[int] | None = None
    names: Sequence[str] | None = None   # parameter names of the segments (per-tensor mode only)
    exchange: Exchange | None = None     # what ``encode`` returned (the front end sets it for ``decode``)


def exchange_for(compressor: Compressor, payload: tuple, flag: torch.Tensor | None) -> Exchange:
    if compressor.linear:
        (values,) = payload
        if flag is not None:
            values = torch.cat([values.reshape(-1), flag.to(device=values.device, dtype=values.dtype)])
        return Exchange(Kind.ALLREDUCE, (values,), flag)
    return Exchange(Kind.ALLGATHER, (pack(payload, flag),), flag, layout=_layout(payload))


def pack(payload, flag: torch.Tensor | None) -> torch.Tensor:
    """[4-byte flag,] payload parts by decreasing element size, as one uint8 buffer (see the module
    docstring; :func:`unpack` inverts it). The one packing of every allgathered payload."""
    parts = [flag.reshape(-1).view(torch.uint8)] if flag is not None else []
    parts += [payload[i].reshape(-1).view(torch.uint8) for i in _packing_order(payload)]
    return torch.cat(parts)


def _packing_order(payload) -> list[int]:
    return sorted(range(len(payload)), key=lambda i: -payload[i].element_size())


def launch(comm: Communicator, ex: Exchange) -> Future:
    """Start the collective of ``ex`` (from the hook call itself, never from a callback)."""
    if ex.kind is Kind.NONE:
        return completed(None)
    if ex.kind is Kind.ALLREDUCE:
        return comm.allreduce_mean_async(ex.tensors[0])
    if ex.kind is Kind.ALLGATHER:
        return comm.allgather_async(ex.tensors[0])
    raise ValueError(f"unknown exchange kind {ex.kind!r}")


def _layout(payload: Sequence[torch.Tensor]) -> list[tuple[int, torch.dtype, int]]:
    return [(i, payload[i].dtype, payload[i].numel()) for i in _packing_order(payload)]


def unpack(buf: torch.Tensor, layout, has_flag: bool) -> tuple[tuple, torch.Tensor | None]:
    """Inverse of the allgather packing of :func:`exchange_for` (views, no copies)."""
    o = 4 if has_flag else 0
    flag = buf[:4].view(torch.float32) if has_flag else None
    out = [None] * len(layout)
    for i, dtype, n in layout:
        nb = n * torch.empty((), dtype=dtype).element_size()
        out[i] = buf[o:o + nb].view(dtype)
        o += nb
    return tuple(out), flag


def average_into(compressor: Compressor, ex: Exchange, received, out: torch.Tensor, mk: MaskKey,
                 segments, world_size: int) -> torch.Tensor | None:
    """Write avg_j C(p_j) into ``out``; return the summed non-finite flag (a tensor) or None."""
    has_flag = ex.flag is not None
    if ex.kind is Kind.ALLREDUCE:
        values = received
        flag = None
        if has_flag:
            flag, values = values[-1:].float() * world_size, values[:-1]
        compressor.decompress((values,), out.numel(), out.dtype, mk, segments, out=out)
        return flag
    # allgather: a list of uint8 buffers, one per rank
    acc = out if out.dtype == torch.float32 else torch.zeros(out.numel(), device=out.device)
    acc.zero_()
    flags = []
    for buf in received:
        payload, f = unpack(buf, ex.layout, has_flag)
        if f is not None:
            flags.append(f)
        compressor.decompress_add(payload, acc, 1.0 / world_size, mk, segments)
    if acc is not out:
        out.copy_(acc)
    return torch.stack(flags).sum().view(1) if flags else None


def layout_of(payload) -> list:
    return _layout(payload)
