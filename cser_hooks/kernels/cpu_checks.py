"""Cheap CPU validation of kernel arguments (no temporaries)."""
from __future__ import annotations

from numba import njit


@njit(cache=True)
def offsets_bad(offs, n):
    """True unless offs[0] == 0, offs[-1] == n and offs is non-decreasing."""
    if offs[0] != 0 or offs[offs.size - 1] != n:
        return True
    for j in range(offs.size - 1):
        if offs[j + 1] < offs[j]:
            return True
    return False
