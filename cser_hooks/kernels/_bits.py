"""Dispatch of the bit-field kernels (``cpu_bits.py`` / ``cuda_bits.py``): element i -> byte i // 8,
bit i % 8, LSB first; L-bit codes: element i at bit i * L."""
from __future__ import annotations

import torch

from ._checks import _check_nbits
from ._runtime import _cpu_run, _Cuda, _mod, _np, backend_for
from ._views import check_flat, raw_view


def _codes(who, fn_cpu, fn_cuda, src, nbits, n, dst):
    if n == 0:
        return
    if backend_for(src, dst) == "cpu":
        with _cpu_run(n):
            getattr(_mod("cpu_bits"), fn_cpu)(_np(src), nbits, n, _np(dst))
        return
    with _Cuda(dst.device) as c:
        getattr(_mod("cuda_bits"), fn_cuda)(c.arr(src), nbits, n, c.arr(dst), stream=c.stream)


def pack_codes(codes: torch.Tensor, nbits: int, out: torch.Tensor) -> None:
    """Pack uint8 codes (low ``nbits`` bits each) into ``out`` (uint8[ceil(n*nbits/8)])."""
    who = "pack_codes"
    _check_nbits(nbits, who)
    check_flat(codes, who, "codes", dtype=torch.uint8)
    n = codes.numel()
    check_flat(out, who, "out", numel=(n * nbits + 7) // 8, dtype=torch.uint8, device=codes.device)
    _codes(who, "pack_codes", "pack_codes", codes, nbits, n, out)


def unpack_codes(packed: torch.Tensor, nbits: int, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The n codes of ``nbits`` bits packed in ``packed``, as uint8."""
    who = "unpack_codes"
    _check_nbits(nbits, who)
    check_flat(packed, who, "packed", numel=(n * nbits + 7) // 8, dtype=torch.uint8)
    if out is None:
        out = torch.empty(n, dtype=torch.uint8, device=packed.device)
    check_flat(out, who, "out", numel=n, dtype=torch.uint8, device=packed.device)
    _codes(who, "unpack_codes", "unpack_codes", packed, nbits, n, out)
    return out


def pack_bits(flags: torch.Tensor, out: torch.Tensor) -> None:
    """Pack bool flags (or uint8 0/1) into ``out`` (uint8[ceil(n/8)]), LSB first."""
    who = "pack_bits"
    if flags.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"{who}: flags must be bool or uint8, got {flags.dtype}")
    check_flat(flags, who, "flags")
    n = flags.numel()
    check_flat(out, who, "out", numel=(n + 7) // 8, dtype=torch.uint8, device=flags.device)
    _codes(who, "pack_codes", "pack_codes", raw_view(flags), 1, n, out)


def unpack_bits(bits: torch.Tensor, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The n flags packed in ``bits`` as a bool tensor."""
    who = "unpack_bits"
    check_flat(bits, who, "bits", numel=(n + 7) // 8, dtype=torch.uint8)
    if out is None:
        out = torch.empty(n, dtype=torch.bool, device=bits.device)
    check_flat(out, who, "out", numel=n, device=bits.device)
    if out.dtype != torch.bool:
        raise TypeError(f"{who}: out must be bool, got {out.dtype}")
    _codes(who, "unpack_codes", "unpack_codes", bits, 1, n, raw_view(out))
    return out
