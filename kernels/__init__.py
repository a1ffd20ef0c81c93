"""Compute kernels of the compressors (docs/algorithms.md §1-2), dispatched by device.

CPU tensors run Numba ``njit(parallel=True, cache=True)`` kernels (``cpu_*.py``); CUDA tensors run
Numba CUDA kernels (``cuda_*.py``) on torch's current stream, reading and writing the tensors in
place through ``__cuda_array_interface__`` (no host copies). ``numba.cuda`` is imported only when a
CUDA tensor arrives. :func:`backend_for` tells which implementation a call would use.

Wire formats (exact, shared by both backends and by the plain-torch references in the tests):

* bit fields: element i -> byte i // 8, bit i % 8, LSB first (``numpy.packbits(bitorder="little")``),
  pad bits 0; L-bit codes: element i at bit i * L.
* ``sign_*``: segments ``[offsets[j], offsets[j+1])``; scale_j = mean |p| over the segment (fp32
  accumulation, 0 for an empty segment); bit 1 iff p >= 0 (0 and -0.0 give +1).
* ``qsgd_*``: blocks of ``block`` elements (last may be short), norm_j = ||p_B||_2 (fp32);
  r = s|p|/norm (0 if norm == 0), level = min(s, floor(r) + (u < r - floor(r))), L bits per level
  with L = :func:`qsgd_level_bits`; decompress ((norm * level) / s) * (+1 | -1).
* ``block_*``: sorted block indices of size b; payload k*b elements, past-the-end zero-padded.
* ``topk_select``: the k largest |x| (ties to the lower index), indices ascending (int32).

Statistics (scales, norms) are float64 sums, rounded to fp32 once: their summation order differs
between backends, vector widths (AVX2, AVX-512) and torch, but the rounded statistic equals a float64
reference's except when the exact sum lies within ~n·2^-53 of an fp32 rounding boundary; given
the statistics, everything else is bit-exact. Inputs to the compress kernels may be float32,
float16 or bfloat16 (arithmetic in float32); decompressed outputs may also be float64. Outputs are
preallocated by the caller; the kernels allocate nothing else per call (CPU scratch comes from
``_workspace.py``, CUDA scratch from torch's caching allocator). ``residual_out`` may be the input
itself (in place) or a separate tensor.

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

from ._views import COMPRESS_DTYPES, OUT_DTYPES, bit_view, check_flat, kind_of, raw_view

__all__ = [
    "backend_for", "backend_for_device", "sign_compress", "sign_compress_ef", "sign_decompress", "qsgd_level_bits",
    "qsgd_compress", "qsgd_decompress", "block_gather", "block_gather_zero", "block_scatter",
    "block_scatter_add", "topk_select", "scatter_add_indices", "pack_bits", "unpack_bits",
    "pack_codes", "unpack_codes", "warm_up",
]

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
    return importlib.import_module(f"{__name__}.{name}")


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


def _ntiles_partial(n: int, tile: int):
    from ._workspace import WORKSPACE

    return WORKSPACE.get("partial", 2 * ((n + tile - 1) // tile), "float64")


def _thread_scratch(tile: int):
    """uint8 [pool threads, tile]: one row per Numba thread (indexed by numba.get_thread_id())."""
    import numba

    from ._workspace import WORKSPACE

    return WORKSPACE.get("thread_scratch", (numba.config.NUMBA_NUM_THREADS, tile), "uint8")


def _thread_tables():
    """float32 [pool threads, 256]: per-thread lookup tables (qsgd level values)."""
    import numba

    from ._workspace import WORKSPACE

    return WORKSPACE.get("thread_tables", (numba.config.NUMBA_NUM_THREADS, 256), "float32")


def _dummy_f32():
    from ._workspace import WORKSPACE

    return WORKSPACE.get("dummy_f32", 1, "float32")


def _dummy_cuda_f32(c: _Cuda):
    return c.alloc.empty(1, "float32")


# ---------------------------------------------------------------------------------------------
# sign_blockwise
# ---------------------------------------------------------------------------------------------
def _check_offsets(offsets: torch.Tensor, n: int, device, who: str) -> int:
    check_flat(offsets, who, "offsets", dtype=torch.int64, device=device)
    if offsets.numel() < 2:
        raise ValueError(f"{who}: offsets needs nblocks + 1 >= 2 entries [0, ..., numel], got {offsets.numel()}")
    if offsets.device.type == "cpu":
        if _mod("cpu_checks").offsets_bad(_np(offsets), n):
            raise ValueError(f"{who}: offsets must be non-decreasing with offsets[0] == 0 and "
                             f"offsets[-1] == numel == {n}")
    return offsets.numel() - 1


def _res_mode(who: str, p: torch.Tensor, e: torch.Tensor | None, res: torch.Tensor | None) -> int:
    """Where the CPU kernels write the residual (see ``cpu_sign.RES_*``); rejects partial overlaps."""
    if res is None:
        return 0
    if e is not None and res is e:
        return 2
    lo, hi = res.data_ptr(), res.data_ptr() + res.numel() * res.element_size()
    plo, phi = p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()
    if (lo, hi) == (plo, phi) and res.dtype == p.dtype:
        return 3
    if lo < phi and plo < hi:
        raise ValueError(f"{who}: residual_out overlaps the input without being it; pass the input itself "
                         f"(in-place) or a separate tensor")
    return 1


def _sign_impl(who, g, e, offsets, bits_out, scales_out, res):
    n = g.numel()
    gkind = kind_of(g, who, COMPRESS_DTYPES)
    check_flat(g, who, "input")
    dev = g.device
    nseg = _check_offsets(offsets, n, dev, who)
    check_flat(bits_out, who, "bits_out", numel=(n + 7) // 8, dtype=torch.uint8, device=dev)
    check_flat(scales_out, who, "scales_out", numel=nseg, dtype=torch.float32, device=dev)
    if e is not None:
        check_flat(e, who, "e", numel=n, dtype=torch.float32, device=dev)
    if res is not None:
        check_flat(res, who, "residual_out", numel=n, dtype=torch.float32, device=dev)
    if n == 0:
        scales_out.zero_()
        return
    if backend_for(g) == "cpu":
        cs = _mod("cpu_sign")
        tile = _mod("cpu_segments").TILE
        dummy = _dummy_f32()
        res_mode = _res_mode(who, g, e, res)
        with _cpu_run(n):
            cs.sign_compress(_np(bit_view(g)), gkind, dummy if e is None else _np(e), e is not None,
                             _np(offsets), n, nseg, _np(bits_out), _np(scales_out), _ntiles_partial(n, tile),
                             _thread_scratch(tile), dummy if res is None else _np(res), res_mode, tile)
        return
    with _Cuda(dev) as c:
        dummy = None if (e is not None and res is not None) else _dummy_cuda_f32(c)
        _mod("cuda_sign").sign_compress(
            c.arr(bit_view(g)), gkind, dummy if e is None else c.arr(e), e is not None, c.arr(offsets), n, nseg,
            c.arr(bits_out), c.arr(scales_out), dummy if res is None else c.arr(res), res is not None, c.alloc,
            stream=c.stream)


def sign_compress(p: torch.Tensor, offsets: torch.Tensor, bits_out: torch.Tensor, scales_out: torch.Tensor,
                  residual_out: torch.Tensor | None = None) -> None:
    """sign_blockwise compress of flat ``p`` (f32/f16/bf16) into ``bits_out`` (uint8[ceil(n/8)]) and
    ``scales_out`` (f32[nblocks]); if ``residual_out`` (f32[n], may be ``p`` itself when p is f32)
    is given, also write ``p - C(p)`` there in the same passes (docs/algorithms.md §1, §2)."""
    _sign_impl("sign_compress", p, None, offsets, bits_out, scales_out, residual_out)


def sign_compress_ef(g: torch.Tensor, e: torch.Tensor, offsets: torch.Tensor, bits_out: torch.Tensor,
                     scales_out: torch.Tensor) -> None:
    """Fused error feedback (docs/algorithms.md §2): p = g + e; compress p; e <- p - C(p) in place."""
    _sign_impl("sign_compress_ef", g, e, offsets, bits_out, scales_out, e)


def sign_decompress(bits: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor) -> None:
    """out_i = scale_j * (+1 if bit i else -1) for i in segment j; ``out`` of any float dtype."""
    who = "sign_decompress"
    n = out.numel()
    okind = kind_of(out, who, OUT_DTYPES)
    check_flat(out, who, "out")
    dev = out.device
    nseg = _check_offsets(offsets, n, dev, who)
    check_flat(bits, who, "bits", numel=(n + 7) // 8, dtype=torch.uint8, device=dev)
    check_flat(scales, who, "scales", numel=nseg, dtype=torch.float32, device=dev)
    if n == 0:
        return
    if backend_for(out) == "cpu":
        with _cpu_run(n):
            _mod("cpu_sign").sign_decompress(_np(bits), _np(scales), _np(offsets), n, nseg,
                                             _mod("cpu_segments").TILE, _np(bit_view(out)), okind)
        return
    with _Cuda(dev) as c:
        _mod("cuda_sign").sign_decompress(c.arr(bits), c.arr(scales), c.arr(offsets), n, nseg,
                                          c.arr(bit_view(out)), okind, stream=c.stream)


# ---------------------------------------------------------------------------------------------
# qsgd
# ---------------------------------------------------------------------------------------------
def qsgd_level_bits(s: int) -> int:
    """L: the smallest of 1, 2, 4, 8 with 2**L >= s + 1 (bits per packed level)."""
    if not isinstance(s, int) or not 1 <= s <= 255:
        raise ValueError(f"qsgd: s must be an int in [1, 255], got {s!r}")
    for nbits in (1, 2, 4, 8):
        if (1 << nbits) >= s + 1:
            return nbits
    raise AssertionError("unreachable")


def _check_block(block: int, who: str) -> None:
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"{who}: block must be a positive int, got {block!r}")


def qsgd_compress(p: torch.Tensor, u: torch.Tensor, s: int, block: int, signs_out: torch.Tensor,
                  levels_out: torch.Tensor, norms_out: torch.Tensor,
                  residual_out: torch.Tensor | None = None) -> None:
    """QSGD(s) compress of flat ``p`` with caller-supplied uniforms ``u`` (f32[n]) into
    ``signs_out`` (uint8[ceil(n/8)]), ``levels_out`` (uint8[ceil(n*L/8)]), ``norms_out``
    (f32[ceil(n/block)]); optional fused ``residual_out = p - C(p)`` (f32[n], may be ``p``)."""
    who = "qsgd_compress"
    n = p.numel()
    gkind = kind_of(p, who, COMPRESS_DTYPES)
    check_flat(p, who, "p")
    nbits = qsgd_level_bits(s)
    _check_block(block, who)
    dev = p.device
    check_flat(u, who, "u", numel=n, dtype=torch.float32, device=dev)
    check_flat(signs_out, who, "signs_out", numel=(n + 7) // 8, dtype=torch.uint8, device=dev)
    check_flat(levels_out, who, "levels_out", numel=(n * nbits + 7) // 8, dtype=torch.uint8, device=dev)
    check_flat(norms_out, who, "norms_out", numel=(n + block - 1) // block, dtype=torch.float32, device=dev)
    if residual_out is not None:
        check_flat(residual_out, who, "residual_out", numel=n, dtype=torch.float32, device=dev)
    if n == 0:
        return
    has_res = residual_out is not None
    if backend_for(p) == "cpu":
        tile = _mod("cpu_segments").TILE
        dummy = _dummy_f32()
        res_mode = _res_mode(who, p, None, residual_out)
        with _cpu_run(n):
            _mod("cpu_qsgd").qsgd_compress(
                _np(bit_view(p)), gkind, dummy, False, _np(u), block, n, s, nbits, _np(signs_out),
                _np(levels_out), _np(norms_out), _ntiles_partial(n, tile), _thread_scratch(tile),
                _np(residual_out) if has_res else dummy, res_mode, tile)
        return
    with _Cuda(dev) as c:
        dummy = _dummy_cuda_f32(c)
        _mod("cuda_qsgd").qsgd_compress(
            c.arr(bit_view(p)), gkind, dummy, False, c.arr(u), block, n, s, nbits, c.arr(signs_out),
            c.arr(levels_out), c.arr(norms_out), c.arr(residual_out) if has_res else dummy, has_res, c.alloc,
            stream=c.stream)


def qsgd_decompress(signs: torch.Tensor, levels: torch.Tensor, norms: torch.Tensor, s: int, block: int,
                    out: torch.Tensor) -> None:
    """out_i = ((norm_j * level_i) / s) * (+1 | -1); ``out`` of any float dtype."""
    who = "qsgd_decompress"
    n = out.numel()
    okind = kind_of(out, who, OUT_DTYPES)
    check_flat(out, who, "out")
    nbits = qsgd_level_bits(s)
    _check_block(block, who)
    dev = out.device
    check_flat(signs, who, "signs", numel=(n + 7) // 8, dtype=torch.uint8, device=dev)
    check_flat(levels, who, "levels", numel=(n * nbits + 7) // 8, dtype=torch.uint8, device=dev)
    check_flat(norms, who, "norms", numel=(n + block - 1) // block, dtype=torch.float32, device=dev)
    if n == 0:
        return
    if backend_for(out) == "cpu":
        import numpy as np

        with _cpu_run(n):
            _mod("cpu_qsgd").qsgd_decompress(_np(signs), _np(levels), _np(norms), np.float32(s), nbits, block, n,
                                             _mod("cpu_segments").TILE, _thread_tables(), _np(bit_view(out)), okind)
        return
    with _Cuda(dev) as c:
        _mod("cuda_qsgd").qsgd_decompress(c.arr(signs), c.arr(levels), c.arr(norms), s, nbits, block, n,
                                          c.arr(bit_view(out)), okind, stream=c.stream)


# ---------------------------------------------------------------------------------------------
# random_block / random_k gather and scatter
# ---------------------------------------------------------------------------------------------
def _check_blocks(who, data, blocks, b, payload, payload_name):
    check_flat(data, who, "tensor")
    if not isinstance(b, int) or b < 1:
        raise ValueError(f"{who}: block size b must be a positive int, got {b!r}")
    check_flat(blocks, who, "blocks", dtype=torch.int64, device=data.device)
    check_flat(payload, who, payload_name, numel=blocks.numel() * b, device=data.device)
    if payload.dtype != data.dtype:
        raise TypeError(f"{who}: {payload_name} dtype {payload.dtype} differs from the tensor's {data.dtype}; "
                        f"allocate it with dtype={data.dtype}")


def _gather(who, x, blocks, b, out, zero):
    _check_blocks(who, x, blocks, b, out, "out")
    if out.numel() == 0:
        return
    n = x.numel()
    if backend_for(x) == "cpu":
        with _cpu_run(out.numel()):
            _mod("cpu_blocks").gather(_np(raw_view(x)), _np(blocks), b, n, _np(raw_view(out)), zero)
        return
    with _Cuda(x.device) as c:
        _mod("cuda_blocks").gather(c.arr(raw_view(x)), c.arr(blocks), b, n, c.arr(raw_view(out)), zero,
                                   stream=c.stream)


def block_gather(x: torch.Tensor, blocks: torch.Tensor, b: int, out: torch.Tensor) -> None:
    """out[j*b + t] = x[blocks[j]*b + t] (0 past numel); ``out`` has k*b elements, x's dtype."""
    _gather("block_gather", x, blocks, b, out, False)


def block_gather_zero(x: torch.Tensor, blocks: torch.Tensor, b: int, out: torch.Tensor) -> None:
    """block_gather, and zero the gathered elements of ``x`` (EF residual in the same pass)."""
    _gather("block_gather_zero", x, blocks, b, out, True)


def _scatter(who, values, blocks, b, out, add):
    _check_blocks(who, out, blocks, b, values, "values")
    if values.numel() == 0:
        return
    n = out.numel()
    if add:
        kind = kind_of(out, who, OUT_DTYPES)
        v, o = bit_view(values), bit_view(out)
    else:
        kind = 0
        v, o = raw_view(values), raw_view(out)
    if backend_for(out) == "cpu":
        cb = _mod("cpu_blocks")
        with _cpu_run(values.numel()):
            if add:
                cb.scatter_add(_np(v), _np(blocks), b, n, _np(o), kind)
            else:
                cb.scatter(_np(v), _np(blocks), b, n, _np(o))
        return
    with _Cuda(out.device) as c:
        _mod("cuda_blocks").scatter(c.arr(v), c.arr(blocks), b, n, c.arr(o), add, kind, stream=c.stream)


def block_scatter(values: torch.Tensor, blocks: torch.Tensor, b: int, out: torch.Tensor) -> None:
    """out[blocks[j]*b + t] = values[j*b + t] where that index < numel; other elements untouched."""
    _scatter("block_scatter", values, blocks, b, out, False)


def block_scatter_add(values: torch.Tensor, blocks: torch.Tensor, b: int, out: torch.Tensor) -> None:
    """out[blocks[j]*b + t] += values[j*b + t] (16-bit dtypes add in float32, then round)."""
    _scatter("block_scatter_add", values, blocks, b, out, True)


# ---------------------------------------------------------------------------------------------
# top_k
# ---------------------------------------------------------------------------------------------
def _topk_torch(x: torch.Tensor, k: int):
    """Exact top-k by |x| with the same tie rule, in plain torch (float64 inputs)."""
    a = x.abs()
    thr = torch.topk(a, k).values[-1]
    gt = a > thr
    eq = a == thr
    need = k - int(gt.sum())
    take = gt | (eq & (torch.cumsum(eq.to(torch.int64), 0) <= need))
    idx = torch.nonzero(take).view(-1)
    return x[idx], idx.to(torch.int32)


def topk_select(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k elements of flat ``x`` with the largest |x| (ties to the lower index, NaN counts as
    largest), as (values, int32 indices) with indices ascending."""
    who = "topk_select"
    check_flat(x, who, "x")
    kind_of(x, who, OUT_DTYPES)
    n = x.numel()
    if not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"{who}: k must be an int in [0, numel={n}], got {k!r}")
    if n >= 2**31:
        raise ValueError(f"{who}: indices are int32, so numel must be < 2**31 (got {n}); split the tensor")
    if x.dtype == torch.float64 and k > 0:
        return _topk_torch(x, k)
    values = torch.empty(k, dtype=x.dtype, device=x.device)
    indices = torch.empty(k, dtype=torch.int32, device=x.device)
    if k == 0:
        return values, indices
    kind = kind_of(x, who, COMPRESS_DTYPES)
    key_bits = 31 if x.dtype == torch.float32 else 15
    xv, vv = bit_view(x), bit_view(values)
    if backend_for(x) == "cpu":
        import numba

        from ._workspace import WORKSPACE

        ct = _mod("cpu_topk")
        _start_cpu_pool()
        nw = max(1, min(4 * numba.get_num_threads(), (n + 65535) // 65536))
        hist = WORKSPACE.get("topk_hist", (nw, ct.HIST), "int64")
        cnt = WORKSPACE.get("topk_cnt", (nw, 2), "int64")
        with _cpu_run(n):
            ct.topk_select(_np(xv), kind, key_bits, k, hist, cnt, _np(vv), _np(indices))
        return values, indices
    with _Cuda(x.device) as c:
        _mod("cuda_topk").topk_select(c.arr(xv), kind, key_bits, n, k, c.arr(vv), c.arr(indices), c.alloc,
                                      stream=c.stream)
    return values, indices


def scatter_add_indices(values: torch.Tensor, indices: torch.Tensor, out: torch.Tensor) -> None:
    """out[indices[i]] += values[i]; indices (int32 / int64) must be distinct, as topk_select gives."""
    who = "scatter_add_indices"
    check_flat(out, who, "out")
    kind = kind_of(out, who, OUT_DTYPES)
    check_flat(values, who, "values", dtype=out.dtype, device=out.device)
    check_flat(indices, who, "indices", numel=values.numel(), device=out.device)
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{who}: indices must be int32 or int64, got {indices.dtype}")
    if values.numel() == 0:
        return
    if backend_for(out) == "cpu":
        with _cpu_run(values.numel()):
            _mod("cpu_blocks").scatter_add_indices(_np(bit_view(values)), _np(indices), _np(bit_view(out)), kind,
                                                   1 << 15)
        return
    with _Cuda(out.device) as c:
        _mod("cuda_blocks").scatter_add_indices(c.arr(bit_view(values)), c.arr(indices), c.arr(bit_view(out)),
                                                kind, stream=c.stream)


# ---------------------------------------------------------------------------------------------
# bit fields
# ---------------------------------------------------------------------------------------------
def _codes(who, fn_cpu, fn_cuda, src, nbits, n, dst):
    if n == 0:
        return
    if backend_for(src, dst) == "cpu":
        with _cpu_run(n):
            getattr(_mod("cpu_bits"), fn_cpu)(_np(src), nbits, n, _np(dst))
        return
    with _Cuda(dst.device) as c:
        getattr(_mod("cuda_bits"), fn_cuda)(c.arr(src), nbits, n, c.arr(dst), stream=c.stream)


def _check_nbits(nbits, who):
    if nbits not in (1, 2, 4, 8):
        raise ValueError(f"{who}: nbits must be 1, 2, 4 or 8, got {nbits!r}")


def pack_codes(codes: torch.Tensor, nbits: int, out: torch.Tensor) -> None:
    """Pack uint8 codes (low ``nbits`` bits each) into ``out`` (uint8[ceil(n*nbits/8)])."""
    who = "pack_codes"
    _check_nbits(nbits, who)
    check_flat(codes, who, "codes", dtype=torch.uint8)
    n = codes.numel()
    check_flat(out, who, "out", numel=(n * nbits + 7) // 8, dtype=torch.uint8, device=codes.device)
    _codes(who, "pack_codes", "pack_codes", codes, nbits, n, out)


def unpack_codes(packed: torch.Tensor, nbits: int, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The n codes of ``nbits`` bits packed in ``packed``, as uint8."""
    who = "unpack_codes"
    _check_nbits(nbits, who)
    check_flat(packed, who, "packed", numel=(n * nbits + 7) // 8, dtype=torch.uint8)
    if out is None:
        out = torch.empty(n, dtype=torch.uint8, device=packed.device)
    check_flat(out, who, "out", numel=n, dtype=torch.uint8, device=packed.device)
    _codes(who, "unpack_codes", "unpack_codes", packed, nbits, n, out)
    return out


def pack_bits(flags: torch.Tensor, out: torch.Tensor) -> None:
    """Pack bool flags (or uint8 0/1) into ``out`` (uint8[ceil(n/8)]), LSB first."""
    who = "pack_bits"
    if flags.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"{who}: flags must be bool or uint8, got {flags.dtype}")
    check_flat(flags, who, "flags")
    n = flags.numel()
    check_flat(out, who, "out", numel=(n + 7) // 8, dtype=torch.uint8, device=flags.device)
    _codes(who, "pack_codes", "pack_codes", raw_view(flags), 1, n, out)


def unpack_bits(bits: torch.Tensor, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The n flags packed in ``bits`` as a bool tensor."""
    who = "unpack_bits"
    check_flat(bits, who, "bits", numel=(n + 7) // 8, dtype=torch.uint8)
    if out is None:
        out = torch.empty(n, dtype=torch.bool, device=bits.device)
    check_flat(out, who, "out", numel=n, device=bits.device)
    if out.dtype != torch.bool:
        raise TypeError(f"{who}: out must be bool, got {out.dtype}")
    _codes(who, "unpack_codes", "unpack_codes", bits, 1, n, raw_view(out))
    return out



def warm_up() -> None:
    """Load every CPU kernel the compressors use (from Numba's on-disk cache, or compile it) on a tiny
    input, so the first training step does not pay it (about 1 s per process here). Optional: the
    first call of each kernel does the same."""
    n, s, block = 64, 15, 16
    x = torch.linspace(-1.0, 1.0, n)
    bounds = torch.tensor([0, 7, n])
    bits = torch.empty((n + 7) // 8, dtype=torch.uint8)
    scales = torch.empty(2)
    out = torch.empty(n)
    sign_compress(x, bounds, bits, scales)
    sign_compress(x.clone(), bounds, bits, scales, residual_out=out)
    sign_decompress(bits, scales, bounds, out)
    levels = torch.empty((n * qsgd_level_bits(s) + 7) // 8, dtype=torch.uint8)
    norms = torch.empty(n // block)
    qsgd_compress(x, torch.rand(n), s, block, bits, levels, norms)
    qsgd_decompress(bits, levels, norms, s, block, out)
    values, idx = topk_select(x, 5)
    scatter_add_indices(values, idx, out)
