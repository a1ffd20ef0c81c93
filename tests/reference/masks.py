"""Shared masks and compressors, re-implemented from the brief's definition (docs/algorithms.md §1).

Independent of ``cser_hooks``: the mask of ``random_block`` is rebuilt here from the written
definition (blake2b seed of ``"{seed}|{step}|{key}|{salt}"``; each block scored by a 32-bit integer
hash of (block index, seed), the k smallest (hash, index) pairs selected; written here with NumPy's
wrapping uint64 arithmetic, the package uses int64 torch ops on the tensor's device), so a test
comparing the package with this module compares two separate implementations.
Every function returns dense tensors: ``C(p)`` has the shape of ``p`` with zeros where nothing is
sent.
"""
from __future__ import annotations

import hashlib
import math
from fractions import Fraction

import numpy as np
import torch


def generator_seed(seed: int, step: int, key, salt: str) -> int:
    """63-bit seed of the shared mask for (job seed, step, bucket key, salt)."""
    digest = hashlib.blake2b(f"{seed}|{step}|{key}|{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _hash32(v: np.ndarray) -> np.ndarray:
    """x ^= x>>16; x *= 0x45D9F3B (mod 2^32); x ^= x>>16; x *= 0x45D9F3B (mod 2^32); x ^= x>>16."""
    m = np.uint64(0xFFFFFFFF)
    c = np.uint64(0x45D9F3B)
    v = v ^ (v >> np.uint64(16))
    v = (v * c) & m
    v = v ^ (v >> np.uint64(16))
    v = (v * c) & m
    return v ^ (v >> np.uint64(16))


def rounding_uniforms_at(idx: np.ndarray, seed63: int) -> torch.Tensor:
    """QSGD's uniform of each element index in ``idx`` (docs/algorithms.md §1): the hash of the index
    (low 32 bits against the seed's low word, then the seed's next 31 bits and the index's high bits),
    its top 24 bits times 2^-24."""
    idx = np.asarray(idx, dtype=np.uint64)
    lo, hi = np.uint64(seed63 & 0xFFFFFFFF), np.uint64((seed63 >> 32) & 0x7FFFFFFF)
    h = _hash32(_hash32((idx & np.uint64(0xFFFFFFFF)) ^ lo) ^ hi ^ (idx >> np.uint64(32)))
    return torch.from_numpy((h >> np.uint64(8)).astype(np.float64) / 2.0 ** 24).float()


def rounding_uniforms(n: int, seed63: int) -> torch.Tensor:
    """The uniforms of elements 0 .. n-1 (float32, exact)."""
    return rounding_uniforms_at(np.arange(n, dtype=np.uint64), seed63)


def chosen_blocks(nblocks: int, k: int, seed63: int) -> torch.Tensor:
    """The k blocks of smallest (hash(block) >> 1, block), ascending: the draw of the shared mask."""
    idx = np.arange(nblocks, dtype=np.uint64)
    lo, hi = np.uint64(seed63 & 0xFFFFFFFF), np.uint64((seed63 >> 32) & 0x7FFFFFFF)
    h = _hash32(_hash32(idx ^ lo) ^ hi) >> np.uint64(1)
    order = np.lexsort((idx, h))  # by hash, then by index
    return torch.from_numpy(np.sort(order[:k]).astype(np.int64))


def random_block_mask(numel: int, ratio: float, block: int, seed: int, step: int, key,
                      salt: str) -> torch.Tensor:
    """Boolean mask of the selected blocks: ceil(ratio*numel/block) of ceil(numel/block) blocks."""
    nblocks = math.ceil(numel / block)
    k = min(nblocks, math.ceil(ratio * numel / block))
    chosen = chosen_blocks(nblocks, k, generator_seed(seed, step, key, salt))
    block_mask = torch.zeros(nblocks, dtype=torch.bool)
    block_mask[chosen] = True
    return block_mask.repeat_interleave(block)[:numel]


def top_k_mask(p: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask of the k = ceil(ratio*numel) entries of largest magnitude (ties to the lower index)."""
    k = min(p.numel(), math.ceil(ratio * p.numel()))
    mask = torch.zeros(p.numel(), dtype=torch.bool)
    mask[torch.sort(p.abs(), descending=True, stable=True).indices[:k]] = True
    return mask


def _parse_ratio(text: str) -> float:
    return float(Fraction(text))


class RefCompressor:
    """A dense reference compressor parsed from a registry string such as
    ``"random_block:ratio=1/16,block=8"``, ``"random_k:ratio=1/8"``, ``"top_k:ratio=1/16"``,
    ``"identity"`` or ``"zero"`` (sends nothing; CSER's local-SGD configuration).

    ``compressor(p, seed, step, key, salt)`` returns ``C(p)`` as a dense tensor.
    ``shared_mask`` tells whether the selection depends only on the key (not on ``p``).
    """

    def __init__(self, spec: str):
        name, _, args = spec.partition(":")
        self.spec = spec
        self.name = name.strip()
        opts = dict(kv.split("=", 1) for kv in args.split(",") if kv.strip())
        self.ratio = _parse_ratio(opts.get("ratio", "1"))
        if self.name == "random_block" and "block" not in opts:
            raise ValueError(f"reference random_block needs an explicit block size: {spec!r}")
        self.block = 1 if self.name == "random_k" else int(opts.get("block", 1))
        if self.name not in ("random_block", "random_k", "top_k", "identity", "zero"):
            raise ValueError(f"reference compressor {self.name!r} not implemented")
        self.shared_mask = self.name != "top_k"

    def mask(self, p: torch.Tensor, seed: int, step: int, key, salt: str) -> torch.Tensor:
        n = p.numel()
        if self.name == "identity":
            return torch.ones(n, dtype=torch.bool)
        if self.name == "zero":
            return torch.zeros(n, dtype=torch.bool)
        if self.name == "top_k":
            return top_k_mask(p, self.ratio)
        return random_block_mask(n, self.ratio, self.block, seed, step, key, salt)

    def __call__(self, p: torch.Tensor, seed: int, step: int, key, salt: str) -> torch.Tensor:
        return torch.where(self.mask(p, seed, step, key, salt), p, torch.zeros_like(p))


# ---------------------------------------------------------------------------------------------------
# the same definition in the form of the compressor tests: a mask key ``mk`` is any object with the
# fields seed, step, key, salt and rank (the package's MaskKey is one; it is not imported here)

def ref_seed(mk, per_rank: bool = False) -> int:
    """The brief's seed: blake2b-64 of "seed|step|key|salt" (QSGD: + "|rank{r}"), low 63 bits."""
    text = f"{mk.seed}|{mk.step}|{mk.key}|{mk.salt}" + (f"|rank{mk.rank}" if per_rank else "")
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def ref_blocks(numel: int, ratio: float, block: int, mk) -> tuple[int, torch.Tensor]:
    """(nblocks, sorted selected block indices) of the shared mask."""
    nblocks = math.ceil(numel / block)
    k = min(nblocks, math.ceil(ratio * numel / block))
    return nblocks, chosen_blocks(nblocks, k, generator_seed(mk.seed, mk.step, mk.key, mk.salt))
