"""Dispatch of the QSGD kernels (``cpu_qsgd.py`` / ``cuda_qsgd.py``): packed sign and level bits with
per-block norms, and decompression into any float dtype (docs/algorithms.md §1)."""
from __future__ import annotations

import numpy as np
import torch

from ._checks import _check_block, _res_mode
from ._runtime import _cpu_run, _Cuda, _dummy_cuda_f32, _mod, _np, backend_for
from ._views import COMPRESS_DTYPES, OUT_DTYPES, bit_view, check_flat, kind_of
from ._workspace import _dummy_f32, _ntiles_partial, _thread_scratch, _thread_tables, _thread_uniforms


def qsgd_level_bits(s: int) -> int:
    """L: the smallest of 1, 2, 4, 8 with 2**L >= s + 1 (bits per packed level)."""
    if not isinstance(s, int) or not 1 <= s <= 255:
        raise ValueError(f"qsgd: s must be an int in [1, 255], got {s!r}")
    for nbits in (1, 2, 4, 8):
        if (1 << nbits) >= s + 1:
            return nbits
    raise AssertionError("unreachable")


def seed_words(seed: int, who: str = "qsgd_compress") -> tuple[np.int64, np.int64]:
    """(s_lo, s_hi): the low 32 and next 31 bits of a 63-bit rounding seed, as the kernels take them."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < (1 << 63):
        raise ValueError(f"{who}: seed must be an int in [0, 2**63), got {seed!r}")
    seed = int(seed)
    return np.int64(seed & 0xFFFFFFFF), np.int64(seed >> 32)


def qsgd_compress(p: torch.Tensor, seed: int, s: int, block: int, signs_out: torch.Tensor,
                  levels_out: torch.Tensor, norms_out: torch.Tensor,
                  residual_out: torch.Tensor | None = None) -> None:
    """QSGD(s) compress of flat ``p`` into
    ``signs_out`` (uint8[ceil(n/8)]), ``levels_out`` (uint8[ceil(n*L/8)]), ``norms_out``
    (f32[ceil(n/block)]); optional fused ``residual_out = p - C(p)`` (f32[n], may be ``p``).

    ``seed`` (an int in [0, 2^63), the rank's rounding seed) gives element i its uniform
    ``rounding_uniform(seed, i)`` (docs/algorithms.md §1), drawn inside the kernel: no uniforms array is
    allocated, written or read, and every device rounds alike."""
    who = "qsgd_compress"
    n = p.numel()
    gkind = kind_of(p, who, COMPRESS_DTYPES)
    check_flat(p, who, "p")
    nbits = qsgd_level_bits(s)
    _check_block(block, who)
    dev = p.device
    slo, shi = seed_words(seed, who)
    check_flat(signs_out, who, "signs_out", numel=(n + 7) // 8, dtype=torch.uint8, device=dev)
    check_flat(levels_out, who, "levels_out", numel=(n * nbits + 7) // 8, dtype=torch.uint8, device=dev)
    check_flat(norms_out, who, "norms_out", numel=(n + block - 1) // block, dtype=torch.float32, device=dev)
    if residual_out is not None:
        check_flat(residual_out, who, "residual_out", numel=n, dtype=torch.float32, device=dev)
    if n == 0:
        return
    has_res = residual_out is not None
    if backend_for(p) == "cpu":
        tile = _mod("cpu_segments").TILE
        dummy = _dummy_f32()
        res_mode = _res_mode(who, p, None, residual_out)
        with _cpu_run(n):
            _mod("cpu_qsgd").qsgd_compress(
                _np(bit_view(p)), gkind, dummy, False, slo, shi, block, n, s, nbits, _np(signs_out),
                _np(levels_out), _np(norms_out), _ntiles_partial(n, tile), _thread_scratch(tile),
                _thread_uniforms(tile),
                _np(residual_out) if has_res else dummy, res_mode, tile)
        return
    with _Cuda(dev) as c:
        dummy = _dummy_cuda_f32(c)
        _mod("cuda_qsgd").qsgd_compress(
            c.arr(bit_view(p)), gkind, dummy, False, slo, shi, block, n, s, nbits, c.arr(signs_out),
            c.arr(levels_out), c.arr(norms_out), c.arr(residual_out) if has_res else dummy, has_res, c.alloc,
            stream=c.stream)


def qsgd_decompress(signs: torch.Tensor, levels: torch.Tensor, norms: torch.Tensor, s: int, block: int,
                    out: torch.Tensor, alpha: float | None = None) -> None:
    """out_i = ((norm_j * level_i) / s) * (+1 | -1); ``out`` of any float dtype.

    ``alpha`` (fp32 ``out`` only): accumulate instead, out_i += alpha * that value, in the same pass (no
    temporary: the allgather average of n payloads is n of these). The product alpha * value is
    rounded once, as ``out.add_(value, alpha=alpha)`` rounds it on the CPU; the CUDA kernel may fuse
    the add into an FMA (one rounding fewer)."""
    who = "qsgd_decompress"
    n = out.numel()
    okind = kind_of(out, who, OUT_DTYPES)
    check_flat(out, who, "out")
    if alpha is not None and out.dtype != torch.float32:
        raise ValueError(f"{who}: accumulating (alpha) needs a float32 out, got {out.dtype}")
    nbits = qsgd_level_bits(s)
    _check_block(block, who)
    dev = out.device
    check_flat(signs, who, "signs", numel=(n + 7) // 8, dtype=torch.uint8, device=dev)
    check_flat(levels, who, "levels", numel=(n * nbits + 7) // 8, dtype=torch.uint8, device=dev)
    check_flat(norms, who, "norms", numel=(n + block - 1) // block, dtype=torch.float32, device=dev)
    if n == 0:
        return
    acc, a = alpha is not None, np.float32(0.0 if alpha is None else alpha)
    if backend_for(out) == "cpu":
        with _cpu_run(n):
            _mod("cpu_qsgd").qsgd_decompress(_np(signs), _np(levels), _np(norms), np.float32(s), nbits, block, n,
                                             _mod("cpu_segments").TILE, _thread_tables(), _np(bit_view(out)), okind,
                                             acc, a)
        return
    with _Cuda(dev) as c:
        _mod("cuda_qsgd").qsgd_decompress(c.arr(signs), c.arr(levels), c.arr(norms), s, nbits, block, n,
                                          c.arr(bit_view(out)), okind, acc, a, stream=c.stream)
