"""Load every CPU kernel the compressors use before the first training step."""
from __future__ import annotations

import torch

from ._qsgd import qsgd_compress, qsgd_decompress, qsgd_level_bits
from ._sign import sign_compress, sign_decompress
from ._topk import scatter_add_indices, topk_select


def warm_up() -> None:
    """Load every CPU kernel the compressors use (from Numba's on-disk cache, or compile it) on a tiny
    input, so the first training step does not pay it (about 1 s per process here). Optional: the
    first call of each kernel does the same."""
    n, s, block = 64, 15, 16
    x = torch.linspace(-1.0, 1.0, n)
    bounds = torch.tensor([0, 7, n])
    bits = torch.empty((n + 7) // 8, dtype=torch.uint8)
    scales = torch.empty(2)
    out = torch.empty(n)
    sign_compress(x, bounds, bits, scales)
    sign_compress(x.clone(), bounds, bits, scales, residual_out=out)
    sign_decompress(bits, scales, bounds, out)
    levels = torch.empty((n * qsgd_level_bits(s) + 7) // 8, dtype=torch.uint8)
    norms = torch.empty(n // block)
    qsgd_compress(x, 0, s, block, bits, levels, norms)
    qsgd_decompress(bits, levels, norms, s, block, out)
    values, idx = topk_select(x, 5)
    scatter_add_indices(values, idx, out)
