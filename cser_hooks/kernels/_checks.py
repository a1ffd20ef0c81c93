"""Argument checks of the kernel families beyond :func:`check_flat` (``_views.py``): segment offsets,
block sizes, residual placement and bit widths. Each raises ``ValueError`` / ``TypeError`` naming
the call and the fix."""
from __future__ import annotations

import torch

from ._runtime import _mod, _np
from ._views import check_flat


def _check_offsets(offsets: torch.Tensor, n: int, device, who: str) -> int:
    check_flat(offsets, who, "offsets", dtype=torch.int64, device=device)
    if offsets.numel() < 2:
        raise ValueError(f"{who}: offsets needs nblocks + 1 >= 2 entries [0, ..., numel], got {offsets.numel()}")
    if offsets.device.type == "cpu":
        if _mod("cpu_checks").offsets_bad(_np(offsets), n):
            raise ValueError(f"{who}: offsets must be non-decreasing with offsets[0] == 0 and "
                             f"offsets[-1] == numel == {n}")
    return offsets.numel() - 1


def _res_mode(who: str, p: torch.Tensor, e: torch.Tensor | None, res: torch.Tensor | None) -> int:
    """Where the CPU kernels write the residual (see ``cpu_sign.RES_*``); rejects partial overlaps."""
    if res is None:
        return 0
    if e is not None and res is e:
        return 2
    lo, hi = res.data_ptr(), res.data_ptr() + res.numel() * res.element_size()
    plo, phi = p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()
    if (lo, hi) == (plo, phi) and res.dtype == p.dtype:
        return 3
    if lo < phi and plo < hi:
        raise ValueError(f"{who}: residual_out overlaps the input without being it; pass the input itself "
                         f"(in-place) or a separate tensor")
    return 1


def _check_block(block: int, who: str) -> None:
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"{who}: block must be a positive int, got {block!r}")


def _check_blocks(who, data, blocks, b, payload, payload_name):
    check_flat(data, who, "tensor")
    if not isinstance(b, int) or b < 1:
        raise ValueError(f"{who}: block size b must be a positive int, got {b!r}")
    check_flat(blocks, who, "blocks", dtype=torch.int64, device=data.device)
    check_flat(payload, who, payload_name, numel=blocks.numel() * b, device=data.device)
    if payload.dtype != data.dtype:
        raise TypeError(f"{who}: {payload_name} dtype {payload.dtype} differs from the tensor's {data.dtype}; "
                        f"allocate it with dtype={data.dtype}")


def _check_nbits(nbits, who):
    if nbits not in (1, 2, 4, 8):
        raise ValueError(f"{who}: nbits must be 1, 2, 4 or 8, got {nbits!r}")
