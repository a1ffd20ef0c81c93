"""Dispatch of the sign_blockwise kernels (``cpu_sign.py`` / ``cuda_sign.py``): compress, fused error
feedback, decompress (docs/algorithms.md §1, §2)."""
from __future__ import annotations

import numpy as np
import torch

from ._checks import _check_offsets, _res_mode
from ._runtime import _cpu_run, _Cuda, _dummy_cuda_f32, _mod, _np, backend_for
from ._views import COMPRESS_DTYPES, OUT_DTYPES, bit_view, check_flat, kind_of
from ._workspace import _dummy_f32, _ntiles_partial, _thread_scratch


def _sign_impl(who, g, e, offsets, bits_out, scales_out, res):
    n = g.numel()
    gkind = kind_of(g, who, COMPRESS_DTYPES)
    check_flat(g, who, "input")
    dev = g.device
    nseg = _check_offsets(offsets, n, dev, who)
    check_flat(bits_out, who, "bits_out", numel=(n + 7) // 8, dtype=torch.uint8, device=dev)
    check_flat(scales_out, who, "scales_out", numel=nseg, dtype=torch.float32, device=dev)
    if e is not None:
        check_flat(e, who, "e", numel=n, dtype=torch.float32, device=dev)
    if res is not None:
        check_flat(res, who, "residual_out", numel=n, dtype=torch.float32, device=dev)
    if n == 0:
        scales_out.zero_()
        return
    if backend_for(g) == "cpu":
        cs = _mod("cpu_sign")
        tile = _mod("cpu_segments").TILE
        dummy = _dummy_f32()
        res_mode = _res_mode(who, g, e, res)
        with _cpu_run(n):
            cs.sign_compress(_np(bit_view(g)), gkind, dummy if e is None else _np(e), e is not None,
                             _np(offsets), n, nseg, _np(bits_out), _np(scales_out), _ntiles_partial(n, tile),
                             _thread_scratch(tile), dummy if res is None else _np(res), res_mode, tile)
        return
    with _Cuda(dev) as c:
        dummy = None if (e is not None and res is not None) else _dummy_cuda_f32(c)
        _mod("cuda_sign").sign_compress(
            c.arr(bit_view(g)), gkind, dummy if e is None else c.arr(e), e is not None, c.arr(offsets), n, nseg,
            c.arr(bits_out), c.arr(scales_out), dummy if res is None else c.arr(res), res is not None, c.alloc,
            stream=c.stream)


def sign_compress(p: torch.Tensor, offsets: torch.Tensor, bits_out: torch.Tensor, scales_out: torch.Tensor,
                  residual_out: torch.Tensor | None = None) -> None:
    """sign_blockwise compress of flat ``p`` (f32/f16/bf16) into ``bits_out`` (uint8[ceil(n/8)]) and
    ``scales_out`` (f32[nblocks]); if ``residual_out`` (f32[n], may be ``p`` itself when p is f32)
    is given, also write ``p - C(p)`` there in the same passes (docs/algorithms.md §1, §2)."""
    _sign_impl("sign_compress", p, None, offsets, bits_out, scales_out, residual_out)


def sign_compress_ef(g: torch.Tensor, e: torch.Tensor, offsets: torch.Tensor, bits_out: torch.Tensor,
                     scales_out: torch.Tensor) -> None:
    """Fused error feedback (docs/algorithms.md §2): p = g + e; compress p; e <- p - C(p) in place."""
    _sign_impl("sign_compress_ef", g, e, offsets, bits_out, scales_out, e)


def sign_decompress(bits: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor,
                    alpha: float | None = None) -> None:
    """out_i = scale_j * (+1 if bit i else -1) for i in segment j; ``out`` of any float dtype.

    ``alpha`` (fp32 ``out`` only): accumulate instead, out_i += (alpha * scale_j) * (+1 | -1), in the same
    pass (no decompressed temporary)."""
    who = "sign_decompress"
    n = out.numel()
    okind = kind_of(out, who, OUT_DTYPES)
    check_flat(out, who, "out")
    if alpha is not None and out.dtype != torch.float32:
        raise ValueError(f"{who}: accumulating (alpha) needs a float32 out, got {out.dtype}")
    dev = out.device
    nseg = _check_offsets(offsets, n, dev, who)
    check_flat(bits, who, "bits", numel=(n + 7) // 8, dtype=torch.uint8, device=dev)
    check_flat(scales, who, "scales", numel=nseg, dtype=torch.float32, device=dev)
    if n == 0:
        return
    acc, a = alpha is not None, np.float32(0.0 if alpha is None else alpha)
    if backend_for(out) == "cpu":
        with _cpu_run(n):
            _mod("cpu_sign").sign_decompress(_np(bits), _np(scales), _np(offsets), n, nseg,
                                             _mod("cpu_segments").TILE, _np(bit_view(out)), okind, acc, a)
        return
    with _Cuda(dev) as c:
        _mod("cuda_sign").sign_decompress(c.arr(bits), c.arr(scales), c.arr(offsets), n, nseg,
                                          c.arr(bit_view(out)), okind, acc, a, stream=c.stream)
