"""Compute kernels of the compressors (docs/algorithms.md §1-2), dispatched by device.

CPU tensors run Numba ``njit(parallel=True, cache=True)`` kernels (``cpu_*.py``); CUDA tensors run
Numba CUDA kernels (``cuda_*.py``) on torch's current stream, reading and writing the tensors in
place through ``__cuda_array_interface__`` (no host copies). ``numba.cuda`` is imported only when a
CUDA tensor arrives. :func:`backend_for` tells which implementation a call would use.

Layout: this module only re-exports. ``_runtime.py`` (CPU lock and thread pool, device detection,
CUDA launch context; the CPU notes), ``_checks.py`` and ``_views.py`` (argument checks, dtype kinds,
bit views), ``_workspace.py`` (CPU scratch); one dispatch module per kernel family: ``_sign.py``,
``_qsgd.py``, ``_blocks.py``, ``_topk.py``, ``_bits.py`` (plus ``_warmup.py``), each calling the
family's ``cpu_*.py`` / ``cuda_*.py`` kernels.

Wire formats (exact, shared by both backends and by the plain-torch references in the tests):

* bit fields: element i -> byte i // 8, bit i % 8, LSB first (``numpy.packbits(bitorder="little")``),
  pad bits 0; L-bit codes: element i at bit i * L.
* ``sign_*``: segments ``[offsets[j], offsets[j+1])``; scale_j = mean |p| over the segment (fp32
  accumulation, 0 for an empty segment); bit 1 iff p >= 0 (0 and -0.0 give +1).
* ``qsgd_*``: blocks of ``block`` elements (last may be short), norm_j = ||p_B||_2 (fp32);
  r = s|p|/norm (0 if norm == 0), level = min(s, floor(r) + (u_i < r - floor(r))), L bits per level
  with L = :func:`qsgd_level_bits`; u_i the counter-based uniform of (seed, i), drawn in the kernel;
  decompress ((norm * level) / s) * (+1 | -1).
* ``block_*``: sorted block indices of size b; payload k*b elements, past-the-end zero-padded.
* ``topk_select``: the k largest |x| (ties to the lower index), indices ascending (int32).

Statistics (scales, norms) are float64 sums, rounded to fp32 once: their summation order differs
between backends, vector widths (AVX2, AVX-512) and torch, but the rounded statistic equals a float64
reference's except when the exact sum lies within ~n·2^-53 of an fp32 rounding boundary; given
the statistics, everything else is bit-exact. Inputs to the compress kernels may be float32,
float16 or bfloat16 (arithmetic in float32); decompressed outputs may also be float64. Outputs are
preallocated by the caller; the kernels allocate nothing else per call (CPU scratch comes from
``_workspace.py``, CUDA scratch from torch's caching allocator). ``residual_out`` may be the input
itself (in place) or a separate tensor.
"""
from __future__ import annotations

from ._bits import pack_bits, pack_codes, unpack_bits, unpack_codes
from ._blocks import block_gather, block_gather_zero, block_scatter, block_scatter_add
from ._qsgd import qsgd_compress, qsgd_decompress, qsgd_level_bits
from ._runtime import backend_for, backend_for_device
from ._sign import sign_compress, sign_compress_ef, sign_decompress
from ._topk import scatter_add_indices, topk_select
from ._warmup import warm_up

__all__ = [
    "backend_for", "backend_for_device", "sign_compress", "sign_compress_ef", "sign_decompress", "qsgd_level_bits",
    "qsgd_compress", "qsgd_decompress", "block_gather", "block_gather_zero", "block_scatter",
    "block_scatter_add", "topk_select", "scatter_add_indices", "pack_bits", "unpack_bits",
    "pack_codes", "unpack_codes", "warm_up",
]
