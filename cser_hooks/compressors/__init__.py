"""Compressors of docs/algorithms.md §1 and a registry that builds them from strings.

    get_compressor("random_block:ratio=1/64,block=256")
    get_compressor("top_k:ratio=0.01 + qsgd:s=15")        # compose(sparsifier, quantizer)

Parameters are ``name=value`` pairs; fractions like ``1/64`` are accepted for ratios.
"""
from __future__ import annotations

import inspect
from fractions import Fraction

import torch

from .base import Compressor, MaskKey, Payload, check_input, payload_bytes
from .cast import Cast, Identity, Zero
from .compose import Compose
from .qsgd import QSGD
from .random_block import RandomBlock
from .sign import SignBlockwise
from .top_k import TopK

__all__ = ["Compressor", "MaskKey", "Payload", "get_compressor", "check_input", "payload_bytes", "REGISTRY",
           "Identity", "Zero", "Cast", "RandomBlock", "TopK", "SignBlockwise", "QSGD", "Compose"]


def _num(v: str):
    v = v.strip()
    try:
        return int(v)
    except ValueError:
        return float(Fraction(v))


# the constructors check the values (type and range), so a Compressor built in Python is checked alike
REGISTRY = {
    "identity": lambda: Identity(),
    "zero": lambda: Zero(),
    "fp16": lambda: Cast(torch.float16),
    "bf16": lambda: Cast(torch.bfloat16),
    "random_block": lambda ratio, block=256, scaled=0: RandomBlock(ratio, block, scaled),
    "random_k": lambda ratio, scaled=0: RandomBlock(ratio, 1, scaled),
    "top_k": lambda ratio: TopK(ratio),
    "sign_blockwise": lambda block=None: SignBlockwise(block),
    "sign": lambda block=None: SignBlockwise(block),
    "qsgd": lambda s=15, block=512, scale=1.0: QSGD(s, block, scale),
}


def get_compressor(spec: str | Compressor) -> Compressor:
    """Build a compressor from ``"name:k=v,k=v"`` (or ``"a + b"`` for compose); objects pass through."""
    if isinstance(spec, Compressor):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"compressor must be a string spec or a Compressor, got {type(spec).__name__}")
    if "+" in spec:
        parts = [p.strip() for p in spec.split("+")]
        if len(parts) != 2:
            raise ValueError(f"compose takes exactly two parts 'sparsifier + quantizer', got {spec!r}")
        return Compose(get_compressor(parts[0]), get_compressor(parts[1]))
    name, _, args = spec.strip().partition(":")
    if name not in REGISTRY:
        raise ValueError(f"unknown compressor {name!r}; known: {', '.join(sorted(REGISTRY))}")
    options = inspect.signature(REGISTRY[name]).parameters
    takes = f"{name} takes " + (", ".join(f"{o}=" for o in options) if options else "no options")
    kwargs = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        k, eq, v = item.partition("=")
        k = k.strip()
        if not eq or not k:
            raise ValueError(f"compressor {spec!r}: option {item!r} must be name=value; {takes}")
        if k in kwargs:
            raise ValueError(f"compressor {spec!r}: option {k} is given twice; {takes}")
        try:
            kwargs[k] = _num(v)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"compressor {spec!r}: option {k}={v.strip()!r} is not a number "
                             f"(e.g. 0.01 or 1/64)") from None
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ValueError(f"compressor {spec!r}: unknown option{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(unknown)}; {takes}")
    missing = [o for o, p in options.items() if p.default is p.empty and o not in kwargs]
    if missing:
        raise ValueError(f"compressor {spec!r}: needs {', '.join(f'{o}=...' for o in missing)}; {takes} "
                         f"(e.g. '{name}:{missing[0]}=1/64')")
    try:
        return REGISTRY[name](**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"compressor {spec!r}: {e}") from None
