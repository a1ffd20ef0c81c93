"""Where a kernel call runs: the CPU backend's lock and thread pool, device detection, the CUDA launch
context, and lazy import of the kernel modules.

CPU notes: calls are serialised by a lock (Numba's parallel layers are not all re-entrant) and run
single-threaded below ``SERIAL_BELOW`` elements. Numba's OpenMP layer shares torch's OpenMP runtime,
whose idle threads spin by default (set ``OMP_WAIT_POLICY=PASSIVE`` before importing torch when
several processes share few cores); starting Numba's pool leaves torch's thread count as it was
(:func:`_start_cpu_pool`). The GNU OpenMP layer is not fork-safe: use the "spawn" start method in
processes that have run a CPU kernel (torch.multiprocessing / DDP launchers do).
"""
from __future__ import annotations

import importlib
import threading

import torch

# Numba's parallel CPU kernels are not all safe to enter from several threads at once (the
# "workqueue" threading layer aborts); DDP may compress from more than one thread, so serialise.
_CPU_LOCK = threading.RLock()
#: below this many elements a CPU kernel runs on the calling thread only: waking the thread pool
#: costs more than it saves (and much more on a loaded machine)
SERIAL_BELOW = 1 << 17


_POOL_STARTED = False


def _start_cpu_pool() -> None:
    """Start Numba's CPU thread pool once per process, keeping torch's thread count.

    Numba's OpenMP layer shares torch's OpenMP runtime (one ``libgomp.so.1`` per process), and
    starting the pool sets that runtime's thread count for the calling thread: a DDP worker that
    called ``torch.set_num_threads(1)`` would run torch on every core afterwards (measured here: 4
    workers on 2 cores then trained 8x slower, every method, until the processes ended). The count
    is put back. OpenMP threads also spin for a while after each parallel region unless
    ``OMP_WAIT_POLICY=PASSIVE`` is set before torch is imported (the benchmark's workers set it).
    """
    global _POOL_STARTED
    if _POOL_STARTED:
        return
    from numba.np.ufunc import parallel

    torch_threads = torch.get_num_threads()
    try:
        parallel._launch_threads()
    finally:
        torch.set_num_threads(torch_threads)
    _POOL_STARTED = True


class _cpu_run:
    """Context of a CPU kernel call on ``n`` elements: the lock, and one thread for small inputs."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self):
        _CPU_LOCK.acquire()
        _start_cpu_pool()
        self.saved = None
        if self.n < SERIAL_BELOW:
            import numba

            self.saved = numba.get_num_threads()
            numba.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            import numba

            numba.set_num_threads(self.saved)
        _CPU_LOCK.release()
        return False


def _mod(name: str):
    """Import a kernel module on first use (so numba.cuda is imported only for CUDA tensors)."""
    return importlib.import_module(f"{__package__}.{name}")


def backend_for_device(device: torch.device) -> str:
    """"cuda" or "cpu": the implementation used for tensors on ``device`` (no GPU needed to ask)."""
    if device.type in ("cpu", "cuda"):
        return device.type
    raise ValueError(f"no kernels for device {device}; use a CPU or CUDA tensor")


def backend_for(*tensors: torch.Tensor | None) -> str:
    """"cuda" or "cpu": the implementation a kernel call on these tensors uses.

    All given tensors must be on one device; raises otherwise, naming the fix.
    """
    devices = {t.device for t in tensors if t is not None}
    if not devices:
        raise ValueError("backend_for: no tensors given")
    if len(devices) > 1:
        names = ", ".join(sorted(str(d) for d in devices))
        raise ValueError(f"kernel arguments are on different devices ({names}); move them to one device")
    return backend_for_device(devices.pop())


class _Cuda:
    """Launch context for torch CUDA tensors: device, torch's current stream, torch scratch."""

    def __init__(self, device: torch.device) -> None:
        self.launch = _mod("cuda_launch")
        self.cuda = self.launch.cuda
        self.device = device
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.alloc = self.launch.TorchAlloc(device)

    def __enter__(self):
        self._gpu = self.cuda.gpus[self.index]
        self._gpu.__enter__()
        self.stream = self.launch.torch_stream(self.device)
        return self

    def __exit__(self, *exc):
        self._gpu.__exit__(*exc)
        return False

    def arr(self, t: torch.Tensor | None):
        return None if t is None else self.launch.as_device_array(t)


def _np(t: torch.Tensor):
    return t.detach().numpy()


def _dummy_cuda_f32(c: _Cuda):
    return c.alloc.empty(1, "float32")
