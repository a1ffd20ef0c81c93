"""A tiny Numba CUDA kernel for the test foundation's own checks (tests/test_harness.py).

Imported only inside tests: importing numba.cuda decides between the real target and the simulator
(NUMBA_ENABLE_CUDASIM, see tests/conftest.py). The project's real kernels live in cser_hooks/kernels/.
"""
from numba import cuda, float32

SIGNATURE = (float32[:], float32, float32[:], float32[:])


def saxpy(out, a, x, y):
    """out[i] = a * x[i] + y[i] for every i < out.size (one thread per element)."""
    i = cuda.grid(1)
    if i < out.size:
        out[i] = a * x[i] + y[i]
