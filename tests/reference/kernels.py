"""Plain-torch references of the kernels' wire formats (docs/algorithms.md §1-2).

Written from the wire-format definitions only: nothing here imports ``cser_hooks``, so a test comparing
a kernel with these functions compares two separate implementations. Used by tests/test_kernels_cpu.py
(the CPU kernels) and tests/test_kernels_cudasim.py (the CUDA kernels in Numba's simulator).
"""
from __future__ import annotations

import numpy as np
import torch


def ref_pack(codes: torch.Tensor, nbits: int = 1) -> np.ndarray:
    """LSB-first packing: bit t of code i goes to global bit i*nbits + t."""
    c = codes.to(torch.int64).numpy()
    bits = ((c[:, None] >> np.arange(nbits)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(bits, bitorder="little")


def ref_segment_ids(offsets: torch.Tensor) -> torch.Tensor:
    lens = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(lens.numel()), lens)


def ref_sign_stats(p: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """float64 mean |p| per segment (0 for empty segments)."""
    lens = offsets[1:] - offsets[:-1]
    sums = torch.zeros(lens.numel(), dtype=torch.float64).index_add_(0, ref_segment_ids(offsets),
                                                                      p.double().abs())
    return torch.where(lens > 0, sums / lens.clamp(min=1).double(), torch.zeros_like(sums))


def ref_sign_dense(p: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """C(p) in float32 given the scales: scale_j * (+1 if p >= 0 else -1)."""
    sc = scales[ref_segment_ids(offsets)]
    return torch.where(p.float() >= 0, sc, -sc)


def ref_qsgd_norms(p: torch.Tensor, block: int) -> torch.Tensor:
    n = p.numel()
    ids = torch.arange(n) // block
    sq = torch.zeros((n + block - 1) // block, dtype=torch.float64).index_add_(0, ids, p.double() ** 2)
    return sq.sqrt()


def ref_qsgd_levels(p: torch.Tensor, u: torch.Tensor, s: int, block: int, norms: torch.Tensor) -> torch.Tensor:
    """Levels given the (kernel's) fp32 norms, with the definition's fp32 operations."""
    nrm = norms[torch.arange(p.numel()) // block]
    sf = torch.tensor(float(s), dtype=torch.float32)
    r = torch.where(nrm > 0, p.float().abs() * (sf / nrm), torch.zeros_like(nrm))
    fl = torch.floor(r)
    lvl = fl + (u < r - fl).float()
    return torch.minimum(lvl, sf)


def ref_qsgd_dense(p_sign_src: torch.Tensor, levels: torch.Tensor, s: int, block: int,
                   norms: torch.Tensor) -> torch.Tensor:
    nrm = norms[torch.arange(levels.numel()) // block]
    val = (nrm * levels) / torch.tensor(float(s), dtype=torch.float32)
    return torch.where(p_sign_src >= 0, val, -val)


def ref_nbits(s: int) -> int:
    return next(b for b in (1, 2, 4, 8) if 2**b >= s + 1)


def ref_gather(x: torch.Tensor, blocks: torch.Tensor, b: int) -> torch.Tensor:
    n = x.numel()
    pad = torch.zeros(((n + b - 1) // b) * b, dtype=x.dtype)
    pad[:n] = x
    return pad.view(-1, b)[blocks].reshape(-1)


def ref_block_index(blocks: torch.Tensor, b: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions in the tensor, positions in the payload) of the payload elements < n."""
    pos = (blocks[:, None] * b + torch.arange(b)).reshape(-1)
    keep = pos < n
    return pos[keep], torch.arange(pos.numel())[keep]


def ref_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k largest |x|, ties to the lower index, indices ascending (stable sort, descending)."""
    order = torch.sort(x.float().abs(), descending=True, stable=True).indices[:k]
    idx = torch.sort(order).values
    return x[idx], idx.to(torch.int32)


def random_blocks(n: int, b: int, ratio: float, seed: int) -> torch.Tensor:
    """The shared-mask draw of the team brief (random_block), from a plain generator."""
    nblocks = (n + b - 1) // b
    k = min(nblocks, -(-int(ratio * n) // b) if ratio * n >= 1 else 1)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(nblocks, generator=g)[:k].sort().values
