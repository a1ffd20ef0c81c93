"""per_tensor(inner): apply a compressor to each parameter tensor of a flat bucket separately.

The authors' CSER code compresses per tensor, with masks seeded per layer (docs/algorithms.md §3, last
paragraph). This wrapper does that over a DDP bucket while keeping *one* collective per bucket:
each tensor ``i`` (element range ``segments[i]:segments[i+1]``, name ``names[i]``) is compressed
with the inner compressor under ``MaskKey(..., key=names[i])``, and the payloads are concatenated.
Because the key is the parameter's name, a DDP bucket in per-tensor mode selects exactly what the
Horovod front end (which sees one tensor at a time, keyed by name) selects: the two front ends
are then numerically interchangeable. Only linear (shared-mask) inner compressors are supported.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from .base import Compressor, check_input


class PerTensor(Compressor):
    linear = True

    def __init__(self, inner: Compressor, names: Sequence[str]):
        if not inner.linear:
            raise ValueError(f"per-tensor mode supports shared-mask compressors, got {inner.spec()}")
        self.inner, self.names = inner, list(names)
        self.name = inner.name
        self.unbiased = inner.unbiased
        self.projection = inner.projection

    def spec(self):
        return self.inner.spec()

    def _parts(self, numel, segments):
        if segments is None or len(segments) != len(self.names) + 1 or segments[-1] != numel:
            raise ValueError("per-tensor mode needs one segment per named tensor covering the bucket")
        return list(zip(self.names, segments, segments[1:]))

    def _sizes(self, numel, segments, dtype):
        return [self.inner.wire_bytes(b - a, dtype) // torch.empty((), dtype=dtype).element_size()
                for _, a, b in self._parts(numel, segments)]

    def compress(self, x, mk, segments=None):
        check_input(x, self.name)
        vals = [self.inner.compress(x[a:b], replace(mk, key=n))[0] for n, a, b in self._parts(x.numel(), segments)]
        return (torch.cat(vals),)

    def compress_ef(self, p, mk, segments=None):
        vals = [self.inner.compress_ef(p[a:b], replace(mk, key=n))[0] for n, a, b in self._parts(p.numel(), segments)]
        return (torch.cat(vals),)

    def overwrite(self, values, out, mk, segments=None):
        o = 0
        sizes = self._sizes(out.numel(), segments, values.dtype)
        for (n, a, b), size in zip(self._parts(out.numel(), segments), sizes):
            self.inner.overwrite(values[o:o + size], out[a:b], replace(mk, key=n))
            o += size
        return out

    def decompress(self, payload, numel, dtype, mk, segments=None, out=None):
        out = torch.zeros(numel, dtype=dtype, device=payload[0].device) if out is None else out.zero_()
        return self.overwrite(payload[0], out, mk, segments)

    def wire_bytes(self, numel, dtype=torch.float32, segments=None):
        return sum(self.inner.wire_bytes(b - a, dtype) for _, a, b in self._parts(numel, segments))
