"""What is trained: the gradient tensors, DDP's buckets of them, and the measured compute time.

DDP's bucket layout, as torch builds it after the first iteration (``Reducer::rebuild_buckets``,
``compute_bucket_assignment_by_size``): the gradients in the order they become ready, taken here as
the reverse of the registration order (exact for sequential models), are put into the current
bucket one by one; a bucket is closed as soon as its size reaches its limit (≥, so a bucket can
exceed the cap by its last tensor), and the next bucket opens with the next limit. The limits are
``[1 MiB, cap]`` when ``bucket_cap_mb`` is left at torch's default (``None``) and ``[cap]`` when it is
given (``DistributedDataParallel`` only uses the small first bucket for the default; the bench always
passes ``--bucket-cap-mb``, 25 by default). 1 MB here is 1 MiB, as in torch (``_MB_TO_BYTES``).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

MIB = 1024 * 1024
FIRST_BUCKET_BYTES = MIB          # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
DEFAULT_BUCKET_CAP_MB = 25.0      # torch's default cap (and the bench's --bucket-cap-mb default)
PARAMS_TENSOR_NUMEL = 2048 * 2048  # --params N without shapes: square 2048 x 2048 tensors (16 MiB)


@dataclass(frozen=True)
class Workload:
    """The training job of one rank.

    tensors: the gradient tensors' shapes in *registration* order (``model.parameters()``);
    compute_s: measured forward + backward + optimizer time of one step *without communication*;
    bucket_cap_mb: DDP's ``bucket_cap_mb`` (None: torch's default, 25 MiB with a 1 MiB first bucket);
    backward_share: the part of compute_s spent in the backward pass, which bucket communication can
        overlap (default 0.6: backward ≈ 2 x forward, the optimizer ≈ 10 %; an assumption, not measured);
    elem_bytes: bytes per gradient element (4: fp32);
    block: random-block size of the shared-mask compressors (None: the bench's rule, 256 for models
        with >= 1M parameters, 32 below: cser_hooks/bench/cli.py).
    """

    tensors: tuple[tuple[int, ...], ...]
    compute_s: float
    bucket_cap_mb: float | None = DEFAULT_BUCKET_CAP_MB
    backward_share: float = 0.6
    elem_bytes: int = 4
    block: int | None = None

    def __post_init__(self):
        if not self.tensors:
            raise ValueError("Workload: no gradient tensors")
        if self.compute_s < 0 or not 0 <= self.backward_share <= 1:
            raise ValueError(f"Workload: need compute_s >= 0 and 0 <= backward_share <= 1, got "
                             f"{self.compute_s}, {self.backward_share}")

    @property
    def params(self) -> int:
        return sum(numel(s) for s in self.tensors)

    @property
    def nbytes(self) -> int:
        return self.params * self.elem_bytes

    @property
    def random_block(self) -> int:
        """The shared-mask block size: ``block``, else the bench's rule (256 from 1M parameters, else 32)."""
        return self.block or (256 if self.params >= 1_000_000 else 32)

    def with_cap(self, bucket_cap_mb: float | None) -> Workload:
        return replace(self, bucket_cap_mb=bucket_cap_mb)

    def buckets(self) -> list[list[tuple[int, ...]]]:
        """DDP's buckets (lists of tensor shapes, each in ready order), in the order they become ready."""
        return assign_buckets(list(reversed(self.tensors)), self.elem_bytes, bucket_limits(self.bucket_cap_mb))


def numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def bucket_limits(bucket_cap_mb: float | None) -> list[int]:
    """Byte limits of the buckets in ready order; the last one repeats (see the module docstring)."""
    if bucket_cap_mb is None:
        return [FIRST_BUCKET_BYTES, int(DEFAULT_BUCKET_CAP_MB * MIB)]
    if bucket_cap_mb < 0:
        raise ValueError(f"bucket_cap_mb must be >= 0, got {bucket_cap_mb}")
    return [int(bucket_cap_mb * MIB)]


def assign_buckets(ready: Iterable[tuple[int, ...]], elem_bytes: int, limits: Sequence[int]
                   ) -> list[list[tuple[int, ...]]]:
    """Greedy assignment: add each tensor to the open bucket; close it once its bytes reach its limit."""
    out: list[list[tuple[int, ...]]] = []
    cur: list[tuple[int, ...]] = []
    size = 0
    for shape in ready:
        cur.append(tuple(shape))
        size += numel(shape) * elem_bytes
        if size >= limits[min(len(out), len(limits) - 1)]:
            out.append(cur)
            cur, size = [], 0
    if cur:
        out.append(cur)
    return out


def from_module(module, compute_s: float, **kw) -> Workload:
    """The trainable parameters of an ``nn.Module`` (shapes in registration order)."""
    shapes = tuple(tuple(p.shape) for p in module.parameters() if p.requires_grad)
    return Workload(shapes, compute_s, **kw)


def square(n: int) -> tuple[int, int]:
    """A matrix shape of n elements, as square as whole rows allow (rows = ⌈√n⌉ or fewer dividing n)."""
    rows = max(1, math.isqrt(n))
    while n % rows:
        rows -= 1
    return (rows, n // rows)


def from_params(params: int, compute_s: float, **kw) -> Workload:
    """Only a parameter count: tensors of at most 2048 x 2048 (16 MiB), the remainder last (an assumption
    that matters for the bucket count and PowerSGD's matrix shapes only)."""
    if params < 1:
        raise ValueError(f"params must be >= 1, got {params}")
    full, rest = divmod(params, PARAMS_TENSOR_NUMEL)
    shapes = [(2048, 2048)] * full + ([square(rest)] if rest else [])
    return Workload(tuple(shapes), compute_s, **kw)


def from_bucket_sizes(numels: Sequence[int], compute_s: float, **kw) -> Workload:
    """Given bucket sizes (elements, in ready order): one square matrix per bucket, and a cap of 0 so
    that each stays its own bucket (a method with its own cap, PowerSGD's one bucket, merges them)."""
    if not numels or any(n < 1 for n in numels):
        raise ValueError(f"bucket sizes must be >= 1 element each, got {list(numels)}")
    shapes = tuple(square(int(n)) for n in reversed(list(numels)))  # registration order = reverse ready order
    return Workload(shapes, compute_s, **{"bucket_cap_mb": 0.0, **kw})
