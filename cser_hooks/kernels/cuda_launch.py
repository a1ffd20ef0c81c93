"""CUDA plumbing: the lazy ``numba.cuda`` import, the device-function decorator, launching on
torch's current stream with torch-owned scratch.

Importing this module imports ``numba.cuda``; ``_runtime.py`` does so only when a CUDA
tensor arrives, so CPU users never need the CUDA toolkit. Under ``NUMBA_ENABLE_CUDASIM=1`` the same
kernels run in Numba's simulator (plain Python threads, NumPy arrays): launchers take any arrays
the kernels accept, so tests call them with NumPy arrays and the simulator's ``device_array``.
"""
from __future__ import annotations

import os

import numpy as np
from numba import cuda as _numba_cuda

#: True when numba.cuda is the simulator (the decision is made when numba.cuda is first imported)
SIMULATOR = int(os.environ.get("NUMBA_ENABLE_CUDASIM", "0") or 0) != 0


class _SimulatorCuda:
    """``numba.cuda`` as the kernel modules see it in the simulator.

    The simulator wraps every device function in a per-module lock (it swaps the module's ``cuda``
    global for the launch's fake module on each call). With one Python thread per CUDA thread, the
    threads of a block then queue on that lock once per helper call and the GIL hands it over in
    5 ms slices: a 64 K-element test took minutes. Here device functions stay plain Python (see
    :func:`devfn`) and this proxy resolves ``cuda.threadIdx``, ``cuda.syncthreads``,
    ``cuda.shared.array``, ... to the running launch's fake module, which is what the swap did.
    """

    def __getattr__(self, name):
        from numba.cuda.simulator import kernel as sim_kernel

        ctx = sim_kernel._kernel_context
        return getattr(ctx if ctx is not None else _numba_cuda, name)


#: the module kernels use: ``numba.cuda`` on a GPU / for PTX, a lock-free proxy in the simulator
cuda = _SimulatorCuda() if SIMULATOR else _numba_cuda

#: threads per block of every kernel (shared arrays are sized for it); the simulator's tests
#: launch with fewer threads, which the kernels accept (any power of two from 32 to TPB).
TPB = 256


def devfn(fn):
    """Compile ``fn`` as a CUDA device function, inlined where the real compiler is used."""
    if SIMULATOR:
        return fn  # plain Python: the simulator's device-function wrapper serializes threads
    return cuda.jit(device=True, forceinline=True)(fn)


def grid_for(work: int, tpb: int, cap: int = 65535) -> int:
    """Blocks for a grid-stride loop over ``work`` items."""
    return max(1, min(cap, (work + tpb - 1) // tpb))


class SimAlloc:
    """Scratch allocator for launchers when no torch device is involved (simulator / tests)."""

    def empty(self, shape, dtype):
        return cuda.device_array(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        return cuda.to_device(np.zeros(shape, dtype=dtype))


class TorchAlloc:
    """Scratch from torch's caching allocator on ``device`` (stream-ordered, no cudaMalloc per call).

    The torch tensors are kept alive by this object until it is dropped after the launches; the
    caching allocator then reuses the memory only for work ordered after them on the same stream.
    """

    def __init__(self, device) -> None:
        self.device = device
        self.keep: list = []

    def _wrap(self, t):
        self.keep.append(t)
        return cuda.as_cuda_array(t, sync=False)

    def empty(self, shape, dtype):
        import torch

        return self._wrap(torch.empty(shape, dtype=_TORCH_DTYPES[np.dtype(dtype).str], device=self.device))

    def zeros(self, shape, dtype):
        import torch

        return self._wrap(torch.zeros(shape, dtype=_TORCH_DTYPES[np.dtype(dtype).str], device=self.device))


def _torch_dtypes():
    import torch

    return {np.dtype(np.float32).str: torch.float32, np.dtype(np.float64).str: torch.float64,
            np.dtype(np.int64).str: torch.int64,
            np.dtype(np.int32).str: torch.int32, np.dtype(np.uint8).str: torch.uint8}


_TORCH_DTYPES = _torch_dtypes()


def as_device_array(t):
    """A torch CUDA tensor as a Numba device array, zero-copy, without a stream sync."""
    return cuda.as_cuda_array(t, sync=False)


def torch_stream(device):
    """torch's current stream on ``device`` as a Numba stream."""
    import torch

    return cuda.external_stream(torch.cuda.current_stream(device).cuda_stream)
