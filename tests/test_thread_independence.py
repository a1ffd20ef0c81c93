"""No hook result depends on the thread count: 1 and 2 threads give bitwise-equal parameters.

Every algorithm trains a model whose gradients are element-wise (so torch's own thread split cannot
change them) on 2 gloo ranks, once with torch and Numba on one thread per rank and once on two, with
an lr that changes at every step (the errors' lr rescaling reads the lr when the hook runs, never in
a Future callback). Buckets are large enough for the parallel paths: Numba's tiled kernels (sign,
QSGD statistics, top-k select from 64K elements) and torch's intra-op reductions. The final
parameters must be bitwise equal.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from harness import run_ranks

pytestmark = [pytest.mark.timeout(600)]

SIZES = (300_000, 70_000, 4_099)
STEPS = 6
ALGOS = {
    "ef_sign": ("EFState", "ef_hook", {"compressor": "sign_blockwise"}),
    "ef_topk": ("EFState", "ef_hook", {"compressor": "top_k:ratio=1/64"}),
    "ef_qsgd": ("EFState", "ef_hook", {"compressor": "qsgd:s=15,block=512"}),
    "ef_rb": ("EFState", "ef_hook", {"compressor": "random_block:ratio=1/32"}),
    "cser_rb": ("CSERState", "cser_hook", {"c1": "random_block:ratio=1/16", "c2": "random_block:ratio=1/4",
                                           "period": 2}),
    "cser_topk": ("CSERState", "cser_hook", {"c1": "top_k:ratio=1/16", "c2": "identity", "period": 3}),
    "compskip": ("CompSkipState", "compskip_hook", {"compressor": "top_k:ratio=1/32", "send_every": 2}),
    "dist_ef_sgdm": ("DistEFSGDMState", "dist_ef_sgdm_hook", {"momentum": 0.9}),
    "qsparse": ("QsparseLocalSGDState", "qsparse_local_sgd_hook", {"period": 2}),
    "qprsgd": ("QPRSGDState", "qprsgd_hook", {"period": 2}),
}
HOOK_MOMENTUM = {"dist_ef_sgdm"}  # the state applies the momentum: plain SGD outside


class Elementwise(nn.Module):
    """Parameters whose gradients are element-wise in the data: w − x per tensor."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.w = nn.ParameterList(nn.Parameter(torch.randn(n, generator=g)) for n in SIZES)

    def forward(self, xs):
        return sum(0.5 * ((w - x) ** 2).sum() for w, x in zip(self.w, xs))


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return [torch.randn(n, generator=g) * (1 + step % 3) for n in SIZES]


def train_all(rank: int, world_size: int, threads: int) -> dict:
    os.environ["NUMBA_NUM_THREADS"] = str(threads)   # before the kernels import numba
    torch.set_num_threads(threads)
    from torch.nn.parallel import DistributedDataParallel as DDP

    from cser_hooks import ddp as D

    out = {}
    for name, (state_name, hook_name, kw) in ALGOS.items():
        model = Elementwise()
        ddp = DDP(model, bucket_cap_mb=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.0 if name in HOOK_MOMENTUM else 0.9)
        state = getattr(D, state_name)(optimizer=opt, **kw)
        ddp.register_comm_hook(state, getattr(D, hook_name))
        for s in range(STEPS):
            for grp in opt.param_groups:
                grp["lr"] = 0.05 / (1 + s)       # changes every step
            opt.zero_grad()
            ddp(_batch(rank, s)).backward()
            opt.step()
        out[name] = [p.detach().clone() for p in model.parameters()]
    import numba
    out["_threads"] = (torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    return out


@pytest.fixture(scope="module")
def runs():
    return {t: run_ranks(train_all, 2, t, timeout=400) for t in (1, 2)}


def test_the_runs_used_the_thread_counts(runs):
    for t, ranks in runs.items():
        assert all(r["_threads"] == (t, t) for r in ranks), [r["_threads"] for r in ranks]


@pytest.mark.parametrize("name", list(ALGOS))
def test_parameters_bitwise_equal_across_thread_counts(runs, name):
    init = [p.detach() for p in Elementwise().parameters()]
    for rank in range(2):
        one, two = runs[1][rank][name], runs[2][rank][name]
        assert max((a - b).abs().max().item() for a, b in zip(one, two)) == 0.0, f"{name}, rank {rank}"
        assert max((a - b).abs().max().item() for a, b in zip(one, init)) > 1e-3, f"{name}: did not train"
