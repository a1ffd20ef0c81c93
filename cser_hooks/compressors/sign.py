"""sign_blockwise: blockwise 1-bit sign with an L1 scale (ALGORITHMS.md §1; seed 003).

    C(v)_B = (||v_B||_1 / |B|) * sign(v_B)      for every block B

Blocks: by default one block per parameter tensor (the caller passes ``segments``: the element
offsets of the tensors inside the flat bucket); with ``block=b`` fixed blocks of b elements; with
neither, the whole tensor is one block. Ties: sign(0) = sign(-0.0) = +1. NaN gets bit 0 (-1) and
poisons its block's scale, which the finite check of the algorithms reports.

Wire: 1 bit per element, packed LSB-first (``bits.py``), + one fp32 scale per block:
``ceil(numel/8) + 4 * nblocks`` bytes. Contractive: ||v - C(v)||^2 = ||v||^2 - Σ_B ||v_B||_1^2/|B|
<= (1 - 1/d_max) ||v||^2 with d_max the largest block (Zheng et al., Lemma 1), the delta claimed.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Compressor, check_input
from .bits import pack_codes, packed_nbytes, unpack_codes


def block_offsets(numel: int, block: int | None, segments: Sequence[int] | None) -> list[int]:
    """Block boundaries [0, ..., numel] from a fixed size or from parameter offsets."""
    if block is not None:
        return list(range(0, numel, block)) + [numel] if numel else [0]
    if segments is None:
        return [0, numel]
    offs = list(segments)
    if offs[0] != 0 or offs[-1] != numel or any(b <= a for a, b in zip(offs, offs[1:])):
        raise ValueError(f"sign_blockwise: segments must increase strictly from 0 to numel={numel}; "
                         f"got {offs[:4]}...{offs[-2:]}")
    return offs


def reference_compress(p: torch.Tensor, offsets: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    scales = torch.stack([p[a:b].float().abs().sum() / (b - a) for a, b in zip(offsets, offsets[1:])])
    bits = pack_codes((p >= 0).to(torch.int32), 1)
    return bits, scales


def reference_decompress(bits, scales, offsets, numel, dtype) -> torch.Tensor:
    sgn = unpack_codes(bits, 1, numel).float() * 2 - 1
    lengths = torch.tensor([b - a for a, b in zip(offsets, offsets[1:])], device=bits.device)
    return (sgn * torch.repeat_interleave(scales, lengths)).to(dtype)


class SignBlockwise(Compressor):
    name = "sign_blockwise"
    linear = False
    unbiased = False

    def __init__(self, block: int | None = None):
        if block is not None and block < 1:
            raise ValueError(f"sign_blockwise: block must be >= 1 or None, got {block}")
        self.block = block
        self._offs_cache: dict = {}

    def spec(self):
        return "sign_blockwise" + (f":block={self.block}" if self.block else "")

    def offsets(self, numel, segments, device) -> tuple[list[int], torch.Tensor]:
        key = (numel, tuple(segments) if segments is not None and self.block is None else None, device)
        hit = self._offs_cache.get(key)
        if hit is None:
            offs = block_offsets(numel, self.block, segments)
            lengths = torch.tensor([b - a for a, b in zip(offs, offs[1:])], dtype=torch.int64, device=device)
            hit = self._offs_cache[key] = (offs, lengths)
        return hit

    def delta(self, numel):
        d_max = self.block if self.block else numel
        return 1.0 / min(d_max, numel) if numel else 1.0

    def compress(self, x, mk, segments=None):
        check_input(x, self.name)
        offs, lengths = self.offsets(x.numel(), segments, x.device)
        # FAST PATH (kernels.sign_compress)
        if self.block is not None and x.numel() % self.block == 0:
            scales = x.view(-1, self.block).abs().sum(1, dtype=torch.float32).div_(self.block)
        else:
            # an empty block (numel == 0) gets scale 0, not 0/0 (as kernels/__init__.py specifies)
            scales = torch.segment_reduce(x.abs().float(), "sum", lengths=lengths).div_(lengths.clamp(min=1))
        bits = pack_codes((x >= 0).to(torch.int32), 1)
        return bits, scales

    def decompress(self, payload, numel, dtype, mk, segments=None, out=None):
        bits, scales = payload
        offs, lengths = self.offsets(numel, segments, bits.device)
        # FAST PATH (kernels.sign_decompress)
        sgn = unpack_codes(bits, 1, numel).to(torch.float32).mul_(2).sub_(1)
        res = sgn.mul_(torch.repeat_interleave(scales, lengths, output_size=numel))
        if out is None:
            return res.to(dtype)
        return out.copy_(res)

    def wire_bytes(self, numel, dtype=torch.float32, segments=None):
        return packed_nbytes(numel, 1) + 4 * (len(block_offsets(numel, self.block, segments)) - 1)
