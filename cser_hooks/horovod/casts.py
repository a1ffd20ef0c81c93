"""``compression=FP16Compression()`` / ``BF16Compression()``: the core ``fp16``/``bf16`` casts on any tensor.

The cast itself is ``cser_hooks.compressors.cast.Cast`` (fp16 clipped to ±65504); like
``Communicator.allreduce_mean`` the fp16 payload is divided by the world size *before* Horovod
sums it, so the sum of n clipped values stays finite, and multiplied back after Horovod's average.
Averages smaller than about n·6e-5 in magnitude fall into fp16's subnormal range and lose relative
precision (gradients scaled by AMP's loss scale are far above it). bf16 has fp32's range and is
cast only. Non-floating tensors pass unchanged. No names, no state; counts the bytes handed.
"""
from __future__ import annotations

from typing import Any

import torch

from ..compressors.cast import Cast
from .comm import _hvd


class _CastCompression:
    """Horovod's compress/decompress contract over a core :class:`Cast`."""

    wire_dtype = torch.float16

    def __init__(self):
        self._cast = Cast(self.wire_dtype)
        self._hvd = _hvd()
        self.bytes_sent_total = 0
        self.dense_bytes_total = 0

    def __repr__(self):
        return f"{type(self).__name__}()"

    def compress(self, tensor: torch.Tensor):
        if not tensor.dtype.is_floating_point:
            return tensor, None
        (out,) = self._cast.compress(tensor.detach().reshape(-1), None)
        n = self._hvd.size() if self.wire_dtype == torch.float16 else 1
        if n > 1:
            out = out / n  # Horovod sums before it averages: keep the fp16 sum within ±65504
        self.bytes_sent_total += out.numel() * out.element_size()
        self.dense_bytes_total += tensor.numel() * tensor.element_size()
        return out, (tensor.dtype, tensor.shape, n)

    def decompress(self, tensor: torch.Tensor, ctx):
        if ctx is None:
            return tensor
        dtype, shape, n = ctx
        if n > 1:
            tensor = tensor.float().mul_(n)
        return self._cast.decompress((tensor,), tensor.numel(), dtype, None).view(shape)

    def stats(self) -> dict[str, Any]:
        return {"bytes_sent_total": self.bytes_sent_total, "dense_bytes_total": self.dense_bytes_total}


class FP16Compression(_CastCompression):
    """``compression=FP16Compression()``: fp16 on the wire, clipped to ±65504 and overflow-safe."""

    wire_dtype = torch.float16


class BF16Compression(_CastCompression):
    """``compression=BF16Compression()``: bfloat16 on the wire (fp32's range: no clipping).

    Horovod 0.28's PyTorch ops have no bfloat16 (``Tensor type torch.BFloat16Tensor is not supported``);
    construction fails there with that reason instead of at the first allreduce.
    """

    wire_dtype = torch.bfloat16

    def __init__(self):
        super().__init__()
        from horovod.torch import mpi_ops

        if not hasattr(mpi_ops.mpi_lib, "horovod_torch_allreduce_async_torch_BFloat16Tensor"):
            import horovod

            raise NotImplementedError(
                f"BF16Compression: this Horovod ({getattr(horovod, '__version__', '?')}) cannot allreduce "
                f"bfloat16 tensors from PyTorch (torch.BFloat16Tensor is not supported by its ops). Use "
                f"compression=FP16Compression() (same 2 bytes per element, clipped to ±65504), or the DDP "
                f"front end's 'bf16' compressor.")
