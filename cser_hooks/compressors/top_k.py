"""top_k(ratio): keep the k = ceil(ratio * numel) largest |x| (docs/algorithms.md §1, non-linear family).

Payload: (values in x's dtype [k], int32 indices [k], sorted ascending). Exact top-k (ties between
equal magnitudes broken toward the lower index). Contractive with delta = k / numel: the kept
coordinates carry at least a k/numel share of ||x||^2. Averaging needs an allgather of payloads.
The bitmap variant (cheaper than int32 indices when ratio > 1/32) is not implemented: above
ratio 1/32 use random_block, whose shared mask sends no index at all.
"""
from __future__ import annotations

import math

import torch

from .. import kernels
from .base import Compressor, check_input, is_real


def reference_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain reference: stable sort by -|x| (ties -> lower index first), take k, sort by index."""
    order = torch.sort(-x.abs().double(), stable=True).indices[:k]
    idx = order.sort().values
    return x[idx], idx.to(torch.int32)


class TopK(Compressor):
    name = "top_k"
    linear = False
    unbiased = False
    #: CPU tensors this large or larger take the Numba radix select (measured crossover ~50 K elements)
    KERNEL_MIN = 1 << 16

    def __init__(self, ratio: float):
        if not (is_real(ratio) and 0 < ratio <= 1):
            raise ValueError(f"top_k: ratio must be in (0, 1], got {ratio!r}")
        self.ratio = float(ratio)

    def spec(self):
        return f"top_k:ratio={self.ratio!r}"

    def k(self, numel: int) -> int:
        return min(numel, max(1, math.ceil(self.ratio * numel)))

    def delta(self, numel):
        return self.k(numel) / numel if numel else 1.0

    def compress(self, x, mk, segments=None):
        check_input(x, self.name)
        k = self.k(x.numel())
        # FAST PATH (kernels.topk_select): exact radix select on the bits of |x| (NaN ranks first), ties to
        # the lower index, indices ascending; Numba CUDA, and Numba CPU from KERNEL_MIN elements (10x
        # torch.topk at 64 MB; below, its 8 kernel launches cost more than torch's selection below)
        if x.dtype != torch.float64 and (x.is_cuda or x.numel() >= self.KERNEL_MIN):
            return kernels.topk_select(x, k)
        a = x.abs().nan_to_num_(nan=float("inf"))  # NaN ranks first, as in torch.topk
        if k == 0:
            idx = torch.zeros(0, dtype=torch.int64, device=x.device)
        else:
            thr = torch.topk(a, k, sorted=False).values.min()  # the k-th largest magnitude
            above = torch.nonzero(a > thr).view(-1)
            ties = torch.nonzero(a == thr).view(-1)[: k - above.numel()]  # lowest indices first
            idx = torch.cat([above, ties]).sort().values
        return x[idx], idx.to(torch.int32)

    nonfinite_in_payload = True

    def nonfinite_witness(self, payload):
        return payload[0]  # the k >= 1 selected values (NaN and Inf rank first); empty only for an empty x

    def compress_ef(self, p, mk, segments=None):
        values, idx = self.compress(p, mk, segments)
        p.index_fill_(0, idx.long(), 0)
        return values, idx

    def decompress(self, payload, numel, dtype, mk, segments=None, out=None):
        values, idx = payload
        if out is None:
            out = torch.zeros(numel, dtype=dtype, device=values.device)
        else:
            out.zero_()
        out.index_copy_(0, idx.long(), values.to(dtype))
        return out

    def decompress_add(self, payload, out, alpha, mk, segments=None):
        values, idx = payload
        scaled = values.to(out.dtype) * alpha  # k elements: the scatter's one small temporary
        if out.dim() == 1 and out.is_contiguous():
            # FAST PATH (kernels.scatter_add_indices): the indices are distinct, no int64 copy of them
            # (8x torch's index_add_ for 4 payloads of 1/64 of 5.4 M on one CPU thread)
            kernels.scatter_add_indices(scaled, idx, out)
            return out
        return out.index_add_(0, idx.long(), scaled)

    def wire_bytes(self, numel, dtype=torch.float32, segments=None):
        return self.k(numel) * (torch.empty((), dtype=dtype).element_size() + 4)
