"""Resume is exact for plain DDP (no ``find_unused_parameters``), whatever DDP's bucket layout.

A fresh ``DistributedDataParallel`` runs its first iteration with an initial bucket layout
(registration order, one bucket here) and rebuilds it from the gradient-ready order afterwards
(several buckets here, ``bucket_cap_mb=0.01``). The uninterrupted job has used the rebuilt layout
since its second step; a job restarted from a mid-period checkpoint starts with the initial one. The
state keeps its own (canonical) buckets and remaps DDP's onto them (cser_hooks/bucket_layout.py), so
for every algorithm: save at step 13 (mid-period: CSER and the local-SGD methods hold ranks apart),
new processes, load, run to step 24 == the uninterrupted run, bitwise — also when the resumed job
uses another ``bucket_cap_mb`` (one bucket instead of several), where DDP's layout never matches.
Loading the model before ``DDP(model)`` is caught with a clear error on every rank.
"""
from __future__ import annotations

import os

import pytest
import torch

from harness import RankError, run_ranks

pytestmark = [pytest.mark.timeout(600)]

ALGOS = {
    "ef_random_block": ("EFState", "ef_hook", {"compressor": "random_block:ratio=1/8,block=16"}, 0.9),
    "ef_top_k": ("EFState", "ef_hook", {"compressor": "top_k:ratio=1/16"}, 0.9),
    "cser_full": ("CSERState", "cser_hook", {"c1": "random_block:ratio=1/8,block=16", "period": 4}, 0.9),
    "cser_partial": ("CSERState", "cser_hook", {"c1": "random_block:ratio=1/8,block=16",
                                                 "c2": "random_block:ratio=1/4,block=16", "period": 4}, 0.9),
    "compskip": ("CompSkipState", "compskip_hook", {"compressor": "random_block:ratio=1/8,block=16",
                                                     "send_every": 2}, 0.9),
    "dist_ef_sgdm": ("DistEFSGDMState", "dist_ef_sgdm_hook", {"compressor": "sign_blockwise:block=32",
                                                               "momentum": 0.9}, 0.0),
    "qsparse": ("QsparseLocalSGDState", "qsparse_local_sgd_hook", {"period": 4}, 0.9),
    "qprsgd": ("QPRSGDState", "qprsgd_hook", {"period": 4}, 0.9),
}
SAVE_AT, STEPS, CAP = 13, 24, 0.01


def _model():
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 10))


def _run(rank, ws, algo, phase, ckpt_dir, cap=CAP, load_before_ddp=False):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from cser_hooks import ddp as D

    state_name, hook_name, kw, momentum = ALGOS[algo]
    model = _model()
    path = os.path.join(ckpt_dir, f"rank{rank}.pt")
    ck = torch.load(path, weights_only=False) if phase == "second" else None
    if load_before_ddp:
        model.load_state_dict(ck["model"])
    ddp = DDP(model, bucket_cap_mb=cap)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
    st = getattr(D, state_name)(optimizer=opt, **kw)
    ddp.register_comm_hook(st, getattr(D, hook_name))
    start, stop = 0, STEPS
    if ck is not None:  # the documented order: after DDP(model), before the first step
        if not load_before_ddp:
            model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        st.load_state_dict(ck["state"])
        start = SAVE_AT
    elif phase == "first":
        stop = SAVE_AT
    for s in range(start, stop):
        opt.zero_grad()
        gen = torch.Generator().manual_seed(10_000 * rank + s)
        x, y = torch.randn(16, 20, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    if phase == "first":
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": st.state_dict()}, path)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), st.stats()["bytes_sent_total"]


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_resume_is_exact_across_ddp_layouts(algo, tmp_path):
    full = run_ranks(_run, 2, algo, "full", str(tmp_path), timeout=180)
    run_ranks(_run, 2, algo, "first", str(tmp_path), timeout=180)
    same_cap = run_ranks(_run, 2, algo, "second", str(tmp_path), timeout=180)
    other_cap = run_ranks(_run, 2, algo, "second", str(tmp_path), 25.0, timeout=180)
    for r in range(2):
        assert torch.equal(same_cap[r][0], full[r][0]), f"{algo} rank {r}: resumed run differs (same bucket_cap_mb)"
        assert torch.equal(other_cap[r][0], full[r][0]), f"{algo} rank {r}: resumed run differs (bucket_cap_mb 25)"
        assert same_cap[r][1] > 0
    if algo.startswith(("cser", "qsparse", "qprsgd")):  # the ranks' models were apart at the save
        first = torch.load(os.path.join(tmp_path, "rank0.pt"), weights_only=False)["model"]
        second = torch.load(os.path.join(tmp_path, "rank1.pt"), weights_only=False)["model"]
        assert any(not torch.equal(first[k], second[k]) for k in first)


def test_loading_the_model_before_ddp_is_a_clear_error_on_every_rank(tmp_path):
    run_ranks(_run, 2, "cser_full", "first", str(tmp_path), timeout=180)
    with pytest.raises(RankError) as info:
        run_ranks(_run, 2, "cser_full", "second", str(tmp_path), CAP, True, timeout=180)
    text = str(info.value)
    assert info.value.failed_ranks == [0, 1], text          # every rank raises together: no hang
    assert text.count("wrap it in DDP, then load") >= 2 and "(rank 1: " in text, text
    assert "rank 0:" not in text  # rank 0's parameters are the ones DDP broadcast: only rank 1's differ
