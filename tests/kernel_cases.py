"""Inputs and the statistics tolerance of the kernel tests (tests/test_kernels_cpu.py, tests/test_kernels_cudasim.py).

:func:`make_input` and :func:`make_offsets` build the tensors and segment layouts both files check;
:func:`assert_stats` holds an fp32 block statistic of m terms (counted by :func:`sign_counts` /
:func:`block_counts`) to the order-independent bound (m + 2) * 2^-24 relative to the float64 reference.
The references themselves are in tests/reference/kernels.py.
"""
from __future__ import annotations

import torch

U32 = 2.0**-24


def make_offsets(n: int, how: str, seed: int = 0) -> torch.Tensor:
    """Segment layouts: one block, fixed size, irregular with empty segments, single elements."""
    g = torch.Generator().manual_seed(seed)
    if how == "one":
        return torch.tensor([0, n], dtype=torch.int64)
    if how == "fixed":
        b = max(1, min(100, n // 3 or 1))
        return torch.tensor(list(range(0, n, b)) + [n], dtype=torch.int64)
    if how == "ones":
        return torch.arange(n + 1, dtype=torch.int64)
    cuts = torch.randint(0, n + 1, (max(3, n // 500),), generator=g)
    cuts = torch.cat([torch.tensor([0, 0, n, n]), cuts, torch.tensor([n // 2, n // 2])])
    return cuts.sort().values.to(torch.int64)


def make_input(n: int, dtype, seed: int, zeros: bool = True, integers: bool = False) -> torch.Tensor:
    """Random values spanning a few decades (or small integers in [-8, 8], whose fp32 sums of |x|
    and x^2 are exact in any order for n < 2^18), with +0, -0 and an all-zero stretch."""
    g = torch.Generator().manual_seed(seed)
    if integers:
        x = torch.randint(-8, 9, (n,), generator=g).float()
    else:
        x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g))
    if zeros and n > 4:
        x[1] = 0.0
        x[3] = -0.0
        x[n // 2: n // 2 + min(40, n // 3)] = 0.0  # an all-zero stretch (zero scale / norm)
    return x.to(dtype)


def assert_stats(got: torch.Tensor, ref64: torch.Tensor, counts: torch.Tensor) -> None:
    """fp32 statistics of ``counts`` terms each within (m + 2) u of the float64 reference."""
    rtol = (counts.double() + 2) * U32
    err = (got.double() - ref64).abs()
    worst = float((err / ref64.abs()).nan_to_num().max()) if err.numel() else 0.0
    assert bool(torch.all(err <= rtol * ref64.abs())), f"max rel err {worst:.3g}"


def sign_counts(offsets: torch.Tensor) -> torch.Tensor:
    return offsets[1:] - offsets[:-1]


def block_counts(n: int, block: int) -> torch.Tensor:
    return (torch.arange(0, n, block) + block).clamp(max=n) - torch.arange(0, n, block)
