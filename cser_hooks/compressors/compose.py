"""compose(sparsifier, quantizer): quantize only the values the sparsifier kept (docs/algorithms.md §1, §7).

QComp(v) = Q(Comp_k(v)) from Qsparse-local-SGD (Basu et al., NeurIPS 2019). The sparsifier is ``top_k`` (its int32
indices travel) or a shared-mask ``random_block``/``random_k`` (no index travels); the quantizer is
``qsgd`` (use ``scale=1/(1+beta)`` for the contraction of Qsparse's Lemma) or ``sign_blockwise``
(one block: (||Comp_k(v)||_1 / k) * sign(Comp_k(v)), Qsparse's scaled sign).
Payload: (indices if top_k) + the quantizer's payload of the k kept values.
"""
from __future__ import annotations

import torch

from .base import Compressor, check_input
from .random_block import RandomBlock
from .top_k import TopK


class Compose(Compressor):
    name = "compose"
    linear = False

    def __init__(self, sparsifier: Compressor, quantizer: Compressor):
        if not isinstance(sparsifier, (TopK, RandomBlock)):
            raise TypeError(f"compose: sparsifier must be top_k, random_k or random_block, got {sparsifier.spec()}")
        if not quantizer.quantizer:
            raise TypeError(f"compose: quantizer must be qsgd, sign_blockwise, fp16, bf16 or identity, got "
                            f"{quantizer.spec()}")
        self.sparsifier, self.quantizer = sparsifier, quantizer
        self.unbiased = False
        self.per_rank_randomness = quantizer.per_rank_randomness

    def spec(self):
        return f"{self.sparsifier.spec()} + {self.quantizer.spec()}"

    def delta(self, numel):
        ds, dq = self.sparsifier.delta(numel), self.quantizer.delta(numel)
        return None if ds is None or dq is None else ds * dq

    def _kept(self, numel):
        if isinstance(self.sparsifier, TopK):
            return self.sparsifier.k(numel)
        return self.sparsifier.num_blocks(numel) * self.sparsifier.block

    def compress(self, x, mk, segments=None):
        check_input(x, self.name)
        sp = self.sparsifier.compress(x, mk)
        values = sp[0]
        q = self.quantizer.compress(values, mk)
        return (*sp[1:], *q)

    def decompress(self, payload, numel, dtype, mk, segments=None, out=None):
        n_idx = 1 if isinstance(self.sparsifier, TopK) else 0
        idx, qp = payload[:n_idx], payload[n_idx:]
        values = self.quantizer.decompress(tuple(qp), self._kept(numel), torch.float32, mk)
        return self.sparsifier.decompress((values, *idx), numel, dtype, mk, out=out)

    def wire_bytes(self, numel, dtype=torch.float32, segments=None):
        k = self._kept(numel)
        idx = 4 * k if isinstance(self.sparsifier, TopK) else 0
        return idx + self.quantizer.wire_bytes(k, dtype)
