"""Dispatch of the random_block / random_k gather and scatter kernels (``cpu_blocks.py`` /
``cuda_blocks.py``): sorted block indices of size b, payload k*b elements, past-the-end zero-padded."""
from __future__ import annotations

import torch

from ._checks import _check_blocks
from ._runtime import _cpu_run, _Cuda, _mod, _np, backend_for
from ._views import OUT_DTYPES, bit_view, kind_of, raw_view


def _gather(who, x, blocks, b, out, zero):
    _check_blocks(who, x, blocks, b, out, "out")
    if out.numel() == 0:
        return
    n = x.numel()
    if backend_for(x) == "cpu":
        with _cpu_run(out.numel()):
            _mod("cpu_blocks").gather(_np(raw_view(x)), _np(blocks), b, n, _np(raw_view(out)), zero)
        return
    with _Cuda(x.device) as c:
        _mod("cuda_blocks").gather(c.arr(raw_view(x)), c.arr(blocks), b, n, c.arr(raw_view(out)), zero,
                                   stream=c.stream)


def block_gather(x: torch.Tensor, blocks: torch.Tensor, b: int, out: torch.Tensor) -> None:
    """out[j*b + t] = x[blocks[j]*b + t] (0 past numel); ``out`` has k*b elements, x's dtype."""
    _gather("block_gather", x, blocks, b, out, False)


def block_gather_zero(x: torch.Tensor, blocks: torch.Tensor, b: int, out: torch.Tensor) -> None:
    """block_gather, and zero the gathered elements of ``x`` (EF residual in the same pass)."""
    _gather("block_gather_zero", x, blocks, b, out, True)


def _scatter(who, values, blocks, b, out, add):
    _check_blocks(who, out, blocks, b, values, "values")
    if values.numel() == 0:
        return
    n = out.numel()
    if add:
        kind = kind_of(out, who, OUT_DTYPES)
        v, o = bit_view(values), bit_view(out)
    else:
        kind = 0
        v, o = raw_view(values), raw_view(out)
    if backend_for(out) == "cpu":
        cb = _mod("cpu_blocks")
        with _cpu_run(values.numel()):
            if add:
                cb.scatter_add(_np(v), _np(blocks), b, n, _np(o), kind)
            else:
                cb.scatter(_np(v), _np(blocks), b, n, _np(o))
        return
    with _Cuda(out.device) as c:
        _mod("cuda_blocks").scatter(c.arr(v), c.arr(blocks), b, n, c.arr(o), add, kind, stream=c.stream)


def block_scatter(values: torch.Tensor, blocks: torch.Tensor, b: int, out: torch.Tensor) -> None:
    """out[blocks[j]*b + t] = values[j*b + t] where that index < numel; other elements untouched."""
    _scatter("block_scatter", values, blocks, b, out, False)


def block_scatter_add(values: torch.Tensor, blocks: torch.Tensor, b: int, out: torch.Tensor) -> None:
    """out[blocks[j]*b + t] += values[j*b + t] (16-bit dtypes add in float32, then round)."""
    _scatter("block_scatter_add", values, blocks, b, out, True)
