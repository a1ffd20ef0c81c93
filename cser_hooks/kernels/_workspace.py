"""Reusable host scratch for the CPU kernels, so a call allocates nothing but its outputs.

One buffer per (thread, name, dtype), grown geometrically and handed out as views. A caller must
be done with a view before it asks for the same name again on the same thread (the kernels use
their scratch only for the duration of one call). The ``_*`` helpers below are the named scratch
buffers the dispatch modules hand to the CPU kernels.
"""
from __future__ import annotations

import threading

import numpy as np


class HostWorkspace(threading.local):
    def __init__(self) -> None:
        self._bufs: dict = {}

    def get(self, name: str, shape, dtype) -> np.ndarray:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        size = int(np.prod(shape)) if shape else 1
        key = (name, np.dtype(dtype).str)
        buf = self._bufs.get(key)
        if buf is None or buf.size < size:
            buf = np.empty(max(size, 2 * (0 if buf is None else buf.size), 16), dtype=dtype)
            self._bufs[key] = buf
        return buf[:size].reshape(shape)


WORKSPACE = HostWorkspace()


def _ntiles_partial(n: int, tile: int):
    return WORKSPACE.get("partial", 2 * ((n + tile - 1) // tile), "float64")


def _thread_scratch(tile: int):
    """uint8 [pool threads, tile]: one row per Numba thread (indexed by numba.get_thread_id())."""
    import numba

    return WORKSPACE.get("thread_scratch", (numba.config.NUMBA_NUM_THREADS, tile), "uint8")


def _thread_uniforms(tile: int):
    """float32 [pool threads, tile]: one row of QSGD uniforms per Numba thread."""
    import numba

    return WORKSPACE.get("thread_uniforms", (numba.config.NUMBA_NUM_THREADS, tile), "float32")


def _thread_tables():
    """float32 [pool threads, 256]: per-thread lookup tables (qsgd level values)."""
    import numba

    return WORKSPACE.get("thread_tables", (numba.config.NUMBA_NUM_THREADS, 256), "float32")


def _dummy_f32():
    return WORKSPACE.get("dummy_f32", 1, "float32")
