"""Bit packing in the project's wire order: element i -> byte i//8, bit i%8 (LSB first).

Plain-torch references; the fast paths live in ``cser_hooks.kernels``.
"""
from __future__ import annotations

import torch

_WEIGHTS = {}


def _weights(nbits: int, device) -> torch.Tensor:
    key = (nbits, device)
    if key not in _WEIGHTS:
        per = 8 // nbits
        _WEIGHTS[key] = (2 ** (torch.arange(per, device=device) * nbits)).to(torch.int32)
    return _WEIGHTS[key]


def pack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**nbits) (nbits in 1,2,4,8) into uint8, LSB first."""
    assert nbits in (1, 2, 4, 8)
    n = codes.numel()
    per = 8 // nbits
    nbytes = (n * nbits + 7) // 8
    padded = torch.zeros(nbytes * per, dtype=torch.int32, device=codes.device)
    padded[:n] = codes.to(torch.int32)
    return (padded.view(nbytes, per) * _weights(nbits, codes.device)).sum(1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, nbits: int, n: int) -> torch.Tensor:
    """Inverse of pack_codes: int32 codes of the first n elements."""
    per = 8 // nbits
    mask = (1 << nbits) - 1
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * nbits
    codes = (packed.to(torch.int32).unsqueeze(1) >> shifts) & mask
    return codes.reshape(-1)[:n]


def packed_nbytes(n: int, nbits: int) -> int:
    return (n * nbits + 7) // 8
