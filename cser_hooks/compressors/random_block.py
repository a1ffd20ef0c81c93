"""Shared-mask random block / random-k sparsifiers (docs/algorithms.md §1; RBS/GRBS of CSER, §3).

The flat tensor is split into blocks of ``block`` elements (the last may be short);
``k = min(nblocks, ceil(ratio * numel / block))`` blocks are chosen uniformly without replacement
as a pure function of the :class:`MaskKey` alone (global seed, step, bucket key, salt), so every
rank selects the same blocks and ``avg_j C(x_j)`` is an allreduce of the selected values; no index
travels. The draw (docs/algorithms.md §1): with s = ``mk.generator_seed()`` (blake2b, 63 bits), block
b gets the score ``(h(b) >> 1)·2^32 + b`` where ``h(b) = mix(mix(b ^ s_lo) ^ s_hi)``, ``mix`` a 32-bit
integer finalizer, s_lo/s_hi the low 32 / next 31 bits of s; the k blocks of smallest score are
selected. Scores are distinct, and integer arithmetic is exact everywhere, so the selection is
computed **on the tensor's device** (an ``arange``, a few integer ops and one ``topk`` over the
nblocks scores: no host→device copy, no sync, no permutation of the whole bucket for random_k) and
is the same on CPU and GPU. A small cache keeps the masks of the last few (numel, key) pairs, so the
decode of a bucket finds its mask while other buckets of the step are in flight.

The payload holds the selected blocks in ascending block order, ``block`` values each; a selected
short tail block is zero-padded, so the payload always has ``k * block`` elements and
``wire_bytes`` is exact.

``random_k(ratio)`` is ``random_block(ratio, block=1)``. Contiguous blocks make the gather and
scatter memory-friendly (one strided copy instead of a random gather per element).
Unbiasedness: C is the *unscaled* mask (biased, contractive with delta = k*block/numel in
expectation); ``scaled=True`` multiplies by numel/(k*block) to make it unbiased.
"""
from __future__ import annotations

import math

import torch

from .. import kernels
from .base import Compressor, MaskKey, check_input, int_option, is_real
from .counter_hash import M32, hash_counters


def block_scores(nblocks: int, mk: MaskKey, device) -> torch.Tensor:
    """The distinct int64 score of every block (see the module docstring), computed on ``device``."""
    b = torch.arange(nblocks, dtype=torch.int64, device=device)
    return hash_counters(b, mk.generator_seed()).bitwise_right_shift_(1).bitwise_left_shift_(32).bitwise_or_(b)


def select_blocks(numel: int, ratio: float, block: int, mk: MaskKey, device="cpu") -> torch.Tensor:
    """The selected block indices (int64, ascending) on ``device``: the k blocks of smallest score."""
    nblocks = math.ceil(numel / block)
    k = min(nblocks, math.ceil(ratio * numel / block))
    if k >= nblocks:
        return torch.arange(nblocks, dtype=torch.int64, device=device)
    return torch.topk(block_scores(nblocks, mk, device), k, largest=False, sorted=False).indices.sort().values


def reference_blocks(numel: int, ratio: float, block: int, mk: MaskKey) -> torch.Tensor:
    """The spec of the shared mask in plain Python integers (sorted int64 indices, on CPU)."""
    nblocks = math.ceil(numel / block)
    k = min(nblocks, math.ceil(ratio * numel / block))
    s = mk.generator_seed()

    def mix(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x45D9F3B) & M32
        x ^= x >> 16
        x = (x * 0x45D9F3B) & M32
        return x ^ (x >> 16)

    def score(b: int) -> int:
        return ((mix(mix(b ^ (s & M32)) ^ ((s >> 32) & 0x7FFFFFFF)) >> 1) << 32) | b

    smallest = sorted(score(b) for b in range(nblocks))[:k]
    return torch.tensor(sorted(v & M32 for v in smallest), dtype=torch.int64)


def reference_gather(x: torch.Tensor, blocks: torch.Tensor, block: int) -> torch.Tensor:
    out = torch.zeros(blocks.numel() * block, dtype=x.dtype, device=x.device)
    for j, b in enumerate(blocks.tolist()):
        seg = x[b * block:(b + 1) * block]
        out[j * block:j * block + seg.numel()] = seg
    return out


def reference_scatter(values: torch.Tensor, blocks: torch.Tensor, block: int, numel: int) -> torch.Tensor:
    out = torch.zeros(numel, dtype=values.dtype, device=values.device)
    for j, b in enumerate(blocks.tolist()):
        n = min(block, numel - b * block)
        out[b * block:b * block + n] = values[j * block:j * block + n]
    return out


class BlockMask:
    """A selection of blocks for one tensor size, with the index views the fast paths need.

    Built once per (numel, MaskKey, device) and reused by gather and scatter of the same step.
    """

    __slots__ = ("numel", "block", "blocks", "k", "nfull", "tail_len", "_split")

    def __init__(self, numel: int, block: int, blocks: torch.Tensor):
        self.numel, self.block, self.blocks = numel, block, blocks  # blocks: sorted, on the data's device
        self.k = blocks.numel()
        self.nfull = numel // block
        self.tail_len = numel - self.nfull * block
        self._split = None

    def _full_and_tail(self) -> tuple[torch.Tensor, bool]:
        """(selected full blocks, whether the short tail block is selected), for the index-op paths.
        Reads the last index (a host read on CUDA: the CUDA kernels never need it)."""
        if self._split is None:
            # blocks is sorted, so a selected tail block (index nfull) can only be the last one
            tail = self.tail_len > 0 and self.k > 0 and int(self.blocks[-1]) == self.nfull
            self._split = (self.blocks[:-1] if tail else self.blocks, tail)
        return self._split

    @property
    def tail_sel(self) -> bool:
        return self._full_and_tail()[1]

    @property
    def full_sel(self) -> torch.Tensor:
        return self._full_and_tail()[0]

    def full_on(self, device: torch.device) -> torch.Tensor:
        return self.full_sel.to(device)

    def all_on(self, device: torch.device) -> torch.Tensor:
        """All selected block indices (tail block included), for the CUDA kernels: already on the device."""
        return self.blocks if self.blocks.device == device else self.blocks.to(device)

    def gather(self, x: torch.Tensor, out: torch.Tensor | None = None, zero_source: bool = False) -> torch.Tensor:
        """out[j*b:(j+1)*b] = x[block j]; with ``zero_source`` those x entries are then set to 0."""
        b, nf = self.block, self.full_sel.numel()
        if out is None:
            out = torch.empty(self.k * b, dtype=x.dtype, device=x.device)
        if x.is_cuda:  # FAST PATH on GPU: one kernel gathers (and zeroes) every block, tail included
            (kernels.block_gather_zero if zero_source else kernels.block_gather)(x, self.all_on(x.device), b, out)
            return out
        idx = self.full_on(x.device)  # CPU: index_select over [nfull, b] rows runs at copy speed
        full = x[: self.nfull * b].view(self.nfull, b)
        torch.index_select(full, 0, idx, out=out[: nf * b].view(nf, b))
        if self.tail_sel:
            tail = x[self.nfull * b:]
            out[nf * b: nf * b + self.tail_len].copy_(tail)
            out[nf * b + self.tail_len:].zero_()
            if zero_source:
                tail.zero_()
        if zero_source:
            full.index_fill_(0, idx, 0)
        return out

    def scatter(self, values: torch.Tensor, out: torch.Tensor, add: bool = False) -> torch.Tensor:
        """Write (or add) the payload back into its blocks of ``out``; other entries untouched."""
        b, nf = self.block, self.full_sel.numel()
        if out.is_cuda and values.dtype == out.dtype:  # FAST PATH on GPU: one kernel, tail included
            (kernels.block_scatter_add if add else kernels.block_scatter)(values, self.all_on(out.device), b, out)
            return out
        idx = self.full_on(out.device)
        full = out[: self.nfull * b].view(self.nfull, b)
        src = values[: nf * b].view(nf, b)
        if add:
            full.index_add_(0, idx, src.to(out.dtype))
        else:
            full.index_copy_(0, idx, src.to(out.dtype))
        if self.tail_sel:
            tail = out[self.nfull * b:]
            v = values[nf * b: nf * b + self.tail_len].to(out.dtype)
            tail.add_(v) if add else tail.copy_(v)
        return out

    def selected_numel(self) -> int:
        return self.k * self.block - (self.block - self.tail_len if self.tail_sel else 0)


MASK_CACHE = 8  # masks kept per compressor: DDP has several buckets of one step in flight


class RandomBlock(Compressor):
    """random_block(ratio, block): C(x) = x on the shared-mask blocks, 0 elsewhere."""

    linear = True

    def __init__(self, ratio: float, block: int = 256, scaled: bool = False):
        name = "random_k" if block == 1 else "random_block"
        if not (is_real(ratio) and 0 < ratio <= 1):
            raise ValueError(f"{name}: ratio must be in (0, 1], got {ratio!r}")
        block = int_option(name, "block", block, 1)
        if scaled not in (True, False):  # bool(2) / bool("0") would switch it on
            raise ValueError(f"{name}: scaled must be 0 or 1 (False or True), got {scaled!r}")
        self.ratio, self.block, self.scaled = float(ratio), block, bool(scaled)
        self.unbiased = self.scaled
        self.projection = not self.scaled
        self.name = name
        self._cache: dict = {}  # (numel, MaskKey, device) -> BlockMask, the last MASK_CACHE ones

    def spec(self):
        s = f"random_block:ratio={self.ratio!r},block={self.block}"
        return s + (",scaled=1" if self.scaled else "")

    def delta(self, numel):
        # in expectation over the mask: every block, the short tail block too, is kept with probability
        # k/nblocks, so E||C(x)||^2 = (k/nblocks)||x||^2 (k*block/numel overstates it when the tail is short)
        if self.scaled:
            return None
        nblocks = math.ceil(numel / self.block)
        return self.num_blocks(numel) / nblocks if nblocks else 1.0

    def num_blocks(self, numel: int) -> int:
        nblocks = math.ceil(numel / self.block)
        return min(nblocks, math.ceil(self.ratio * numel / self.block))

    def mask(self, numel: int, mk: MaskKey, device="cpu") -> BlockMask:
        """The shared mask for this (numel, key) on ``device``. The last MASK_CACHE masks are kept, so the
        decode of a bucket reuses its encode's mask with several buckets of the step in flight."""
        key = (numel, mk, torch.device(device))
        m = self._cache.pop(key, None)
        if m is None:
            m = BlockMask(numel, self.block, select_blocks(numel, self.ratio, self.block, mk, device))
            while len(self._cache) >= MASK_CACHE:
                self._cache.pop(next(iter(self._cache)))  # the least recently used
        self._cache[key] = m
        return m

    def _scale(self, numel: int) -> float:
        # unbiased: 1 / P(block kept) = nblocks / k, the same for the short tail block
        k = self.num_blocks(numel)
        return math.ceil(numel / self.block) / k if self.scaled and k else 1.0

    def compress(self, x, mk, segments=None):
        check_input(x, self.name)
        values = self.mask(x.numel(), mk, x.device).gather(x)  # FAST PATH (kernels.block_gather on CUDA)
        if self.scaled:
            values.mul_(self._scale(x.numel()))
        return (values,)

    def compress_ef(self, p, mk, segments=None):
        check_input(p, self.name)
        values = self.mask(p.numel(), mk, p.device).gather(p, zero_source=True)  # FAST PATH (block_gather_zero)
        if self.scaled:  # residual of the scaled compressor is p - s*mask(p), not just the unselected part
            m = self.mask(p.numel(), mk, p.device)
            m.scatter(values.mul(1.0 - self._scale(p.numel())), p)
            values.mul_(self._scale(p.numel()))
        return (values,)

    def overwrite(self, values, out, mk, segments=None):
        return self.mask(out.numel(), mk, out.device).scatter(values, out)  # FAST PATH (kernels.block_scatter on CUDA)

    def decompress(self, payload, numel, dtype, mk, segments=None, out=None):
        (values,) = payload
        if out is None:
            out = torch.zeros(numel, dtype=dtype, device=values.device)
        else:
            out.zero_()
        return self.overwrite(values, out, mk)

    def wire_bytes(self, numel, dtype=torch.float32, segments=None):
        return self.num_blocks(numel) * self.block * torch.empty((), dtype=dtype).element_size()
