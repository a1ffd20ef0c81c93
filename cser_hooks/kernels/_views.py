"""How torch tensors reach the kernels: dtype kinds, bit views and argument checks.

CPU tensors become zero-copy NumPy views (``Tensor.numpy()``); CUDA tensors become Numba device
arrays through ``__cuda_array_interface__`` (``cuda_launch.py``). float16 / bfloat16 go as
their ``uint16`` / ``int16`` bit patterns (see ``_scalar.py``), which both paths and the
CUDA simulator handle alike.
"""
from __future__ import annotations

import torch

from ._scalar import K_BF16, K_F16, K_F32, K_F64

KIND_OF = {torch.float32: K_F32, torch.float16: K_F16, torch.bfloat16: K_BF16, torch.float64: K_F64}
_BIT_VIEW = {torch.float16: torch.uint16, torch.bfloat16: torch.int16}
#: dtypes the compress kernels read (float64 would lose precision in the fp32 arithmetic)
COMPRESS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: dtypes a decompressed output may have
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: raw element views used by dtype-agnostic copies (gather / scatter move bits only)
_RAW_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def kind_of(t: torch.Tensor, who: str, allowed=OUT_DTYPES) -> int:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{who}: dtype {t.dtype} is not supported here (use one of {names}; "
                        f"e.g. pass x.float())")
    return KIND_OF[t.dtype]


def bit_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor as the array type the kernels take (16-bit floats as integer bit patterns)."""
    v = _BIT_VIEW.get(t.dtype)
    return t.view(v) if v is not None else t


def raw_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor as same-size integers, for kernels that only move bits."""
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t.view(_RAW_VIEW[t.element_size()])


def check_flat(t: torch.Tensor, who: str, name: str, numel: int | None = None, dtype=None,
               device=None) -> None:
    """A flat contiguous tensor, optionally of a given size, dtype and device; clear errors."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{who}: {name} must be 1-D (pass {name}.view(-1)), got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{who}: {name} must be contiguous (pass {name}.contiguous())")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{who}: {name} must have {numel} elements, has {t.numel()}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{who}: {name} must be {dtype}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{who}: {name} is on {t.device} but the data is on {device}; "
                         f"move it with .to({str(device)!r})")
