"""Dispatch of the top_k kernels: exact selection by |x| (``cpu_topk.py`` / ``cuda_topk.py``; float64
in plain torch) and the scatter-add of its (values, indices) back into a dense tensor."""
from __future__ import annotations

import torch

from ._runtime import _cpu_run, _Cuda, _mod, _np, _start_cpu_pool, backend_for
from ._views import COMPRESS_DTYPES, OUT_DTYPES, bit_view, check_flat, kind_of

#: the CPU select resolves the later digits on the top digit's bin alone when it holds at most
#: numel / CAND_SHARE elements (scratch: that many int32 indices); above, every digit is a pass over x
CAND_SHARE = 16


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
            ct.topk_select(_np(xv), kind, key_bits, k, hist, cnt, _np(vv), _np(indices), WORKSPACE.get,
                           n // CAND_SHARE)
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
