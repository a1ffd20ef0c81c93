"""sign_blockwise: blockwise 1-bit sign with an L1 scale (docs/algorithms.md §1; Zheng et al., NeurIPS 2019).

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

from .. import kernels
from .base import Compressor, check_input, int_option
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
    # float64 sum and division, one rounding to fp32: the kernels do the same, so the scale does not
    # depend on the summation order (the host's vector width)
    scales = torch.stack([(p[a:b].double().abs().sum() / (b - a)).float() for a, b in zip(offsets, offsets[1:])])
    bits = pack_codes((p >= 0).to(torch.int32), 1)
    return bits, scales


def reference_decompress(bits, scales, offsets, numel, dtype) -> torch.Tensor:
    sgn = unpack_codes(bits, 1, numel).float() * 2 - 1
    lengths = torch.tensor([b - a for a, b in zip(offsets, offsets[1:])], device=bits.device)
    return (sgn * torch.repeat_interleave(scales, lengths)).to(dtype)


class SignBlockwise(Compressor):
    name = "sign_blockwise"
    linear = False
    quantizer = True
    unbiased = False

    def __init__(self, block: int | None = None):
        self.block = None if block is None else int_option("sign_blockwise", "block", block, 1)
        self._offs_cache: dict = {}

    def spec(self):
        return "sign_blockwise" + (f":block={self.block}" if self.block else "")

    def offsets(self, numel, segments, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(block boundaries [0, ..., numel], block lengths) as int64 tensors on ``device``, cached
        per (numel, segments, device) so the hot path allocates nothing for them."""
        key = (numel, tuple(segments) if segments is not None and self.block is None else None, device)
        hit = self._offs_cache.get(key)
        if hit is None:
            offs = block_offsets(numel, self.block, segments)
            bounds = torch.tensor(offs, dtype=torch.int64, device=device)
            hit = self._offs_cache[key] = (bounds, bounds.diff())
        return hit

    def delta(self, numel):
        d_max = self.block if self.block else numel
        return 1.0 / min(d_max, numel) if numel else 1.0

    nonfinite_in_payload = True

    def nonfinite_witness(self, payload):
        return payload[1]  # a block's scale (mean |p| in float64) is NaN/Inf when one of its elements is

    def compress(self, x, mk, segments=None):
        check_input(x, self.name)
        bounds, lengths = self.offsets(x.numel(), segments, x.device)
        if x.numel() == 0:
            return torch.zeros(0, dtype=torch.uint8, device=x.device), torch.zeros(lengths.numel(), device=x.device)
        # FAST PATH (kernels.sign_compress, Numba CPU / CUDA): one pass for the scales, one for the bits.
        # float64 goes in as float32 (the kernels accumulate the statistics in float64 either way).
        bits, scales = self._outputs(x.numel(), lengths.numel(), x.device)
        kernels.sign_compress(x.float() if x.dtype == torch.float64 else x, bounds, bits, scales)
        return bits, scales

    def compress_ef(self, p, mk, segments=None):
        """Fused error feedback (docs/algorithms.md §2): payload of p and p <- p - C(p) in the same kernel
        passes (fp32 p; other dtypes take the two-step default)."""
        check_input(p, self.name)
        if p.dtype != torch.float32 or p.numel() == 0 or not p.is_contiguous():
            return super().compress_ef(p, mk, segments)
        bounds, lengths = self.offsets(p.numel(), segments, p.device)
        bits, scales = self._outputs(p.numel(), lengths.numel(), p.device)
        kernels.sign_compress(p, bounds, bits, scales, residual_out=p)
        return bits, scales

    @staticmethod
    def _outputs(numel, nblocks, device):
        # fresh tensors: the payload is handed to an asynchronous collective that may still hold the last one
        return (torch.empty(packed_nbytes(numel, 1), dtype=torch.uint8, device=device),
                torch.empty(nblocks, dtype=torch.float32, device=device))

    def decompress(self, payload, numel, dtype, mk, segments=None, out=None):
        bits, scales = payload
        bounds, lengths = self.offsets(numel, segments, bits.device)
        if out is not None and not (out.dim() == 1 and out.is_contiguous() and out.numel() == numel):
            raise ValueError(f"{self.name}: out must be a contiguous 1-D tensor of {numel} elements")
        target = torch.empty(numel, dtype=dtype, device=bits.device) if out is None else out
        if numel:
            # FAST PATH (kernels.sign_decompress): writes any float dtype directly (round to nearest even)
            kernels.sign_decompress(bits, scales, bounds, target)
        return target

    def decompress_add(self, payload, out, alpha, mk, segments=None):
        """out += alpha * C in the decompress kernel's pass (no decompressed temporary); a non-fp32 or
        strided out takes the base class's decompress, then add."""
        if not (out.dtype == torch.float32 and out.dim() == 1 and out.is_contiguous()):
            return super().decompress_add(payload, out, alpha, mk, segments)
        bits, scales = payload
        if out.numel():
            kernels.sign_decompress(bits, scales, self.offsets(out.numel(), segments, bits.device)[0], out,
                                    alpha=alpha)
        return out

    def wire_bytes(self, numel, dtype=torch.float32, segments=None):
        return packed_nbytes(numel, 1) + 4 * (len(block_offsets(numel, self.block, segments)) - 1)
