"""Identity and floating-point casts (docs/algorithms.md §1, "linear with a shared mask" family).

``fp16`` overflow policy (documented, tested): values beyond the fp16 range are *clipped* to
±65504 instead of becoming ±inf, so one outlier cannot poison the allreduce. NaN stays NaN, and
the algorithms' finite check reports it. ``bf16`` has fp32's range, so it never overflows.
The front ends divide by the world size *before* the cast-and-sum, so the sum of n clipped
values cannot overflow either.
"""
from __future__ import annotations

import torch

from .base import Compressor, check_input

FP16_MAX = 65504.0


class _Dense(Compressor):
    """A payload that is the whole tensor, in some dtype: decompress is a cast, overwrite a copy."""

    def decompress(self, payload, numel, dtype, mk, segments=None, out=None):
        (v,) = payload
        if out is None:
            return v.to(dtype)
        return out.copy_(v)

    def overwrite(self, values, out, mk, segments=None):
        return out.copy_(values)


class Identity(_Dense):
    """C(x) = x. Payload: x itself (dense)."""

    name = "identity"
    linear = True
    unbiased = True
    elementwise = projection = quantizer = True

    def delta(self, numel):
        return 1.0

    def compress(self, x, mk, segments=None):
        check_input(x, self.name)
        return (x,)

    def compress_ef(self, p, mk, segments=None):
        check_input(p, self.name)
        payload = (p.clone(),)
        p.zero_()
        return payload

    def wire_bytes(self, numel, dtype=torch.float32, segments=None):
        return numel * torch.empty((), dtype=dtype).element_size()


class Cast(_Dense):
    """C(x) = cast(x) to ``wire_dtype`` and back; fp16 clips to ±65504 (see module docstring)."""

    linear = True
    unbiased = False
    elementwise = quantizer = True

    def __init__(self, wire_dtype: torch.dtype):
        if wire_dtype not in (torch.float16, torch.bfloat16):
            raise ValueError("Cast supports torch.float16 and torch.bfloat16")
        self.wire_dtype = wire_dtype
        self.name = "fp16" if wire_dtype == torch.float16 else "bf16"

    def delta(self, numel):
        # relative rounding error <= 2^-11 (fp16) / 2^-8 (bf16) per element, ignoring clipping/underflow
        if self.wire_dtype == torch.float16:
            return None  # no data-independent bound: |x| < 2^-14 underflows, |x| > 65504 is clipped
        return 1.0 - 2.0 ** -16  # bf16 keeps fp32's range: relative error <= 2^-8 per (normal) element

    def reference_compress(self, x):
        if self.wire_dtype == torch.float16:
            x = x.float().clamp(-FP16_MAX, FP16_MAX)
        return (x.to(self.wire_dtype),)

    def compress(self, x, mk, segments=None):
        check_input(x, self.name)
        if x.dtype == self.wire_dtype:
            return (x,)
        if self.wire_dtype == torch.float16 and x.dtype != torch.float16:
            out = torch.empty_like(x, dtype=torch.float16)
            # clamp in the source dtype, then cast: one pass over x in torch's fused copy
            torch.clamp(x, -FP16_MAX, FP16_MAX, out=out) if x.dtype == torch.float16 else out.copy_(
                torch.clamp(x, -FP16_MAX, FP16_MAX))
            return (out,)
        return (x.to(self.wire_dtype),)

    def compress_ef(self, p, mk, segments=None):
        (v,) = self.compress(p, mk, segments)
        if v is p:  # p already has the wire dtype: C(p) = p, send a copy and keep residual 0
            v = p.clone()
            p.zero_()
        else:
            p.sub_(v.to(p.dtype))
        return (v,)

    def wire_bytes(self, numel, dtype=torch.float32, segments=None):
        return numel * 2


class Zero(Compressor):
    """C(x) = 0: nothing is sent (CSER's C1 for purely local steps, i.e. CSER-PL / local SGD)."""

    name = "zero"
    linear = True
    unbiased = False
    elementwise = sends_nothing = True

    def delta(self, numel):
        return 0.0

    def compress(self, x, mk, segments=None):
        check_input(x, self.name)
        return (x.new_empty(0),)

    def compress_ef(self, p, mk, segments=None):
        check_input(p, self.name)
        return (p.new_empty(0),)

    def decompress(self, payload, numel, dtype, mk, segments=None, out=None):
        if out is None:
            return torch.zeros(numel, dtype=dtype, device=payload[0].device)
        return out.zero_()

    def overwrite(self, values, out, mk, segments=None):
        return out

    def wire_bytes(self, numel, dtype=torch.float32, segments=None):
        return 0
