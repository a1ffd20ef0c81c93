"""dcp.save / dcp.load of a state through DCPState on 2 real gloo ranks: the run continues bitwise.

Each rank trains 6 steps with EF top-k (per-rank residuals) and M-CSER (per-rank momentum; a full reset
at step 6, so the replicas are equal when DCP keeps one copy of the model), saves the model, the
optimizer (torch's ``get_state_dict``) and the state with DCP, trains 6 more; then builds everything
anew, loads the DCP checkpoint and trains the same 6 steps: the parameters must equal the
uninterrupted run's bitwise, and each rank must get its own residuals back (not rank 0's).
"""
from __future__ import annotations

import pytest
import torch

from harness import run_ranks

STEPS = 6


def _batch(rank, step):
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(16, 12, generator=g)
    return x, (x[:, 0] > 0).long()


def _job(algo):
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from cser_hooks import ddp as D

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 2))
    model = DDP(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0 if algo == "mcser" else 0.9)
    if algo == "ef":
        state, hook = D.EFState(compressor="top_k:ratio=1/8", optimizer=opt), D.ef_hook
    else:
        # a full reset at the save step (period 3 divides STEPS): DCP keeps one replica of the model
        state = D.CSERState(c1="random_block:ratio=1/4,block=8", c2="identity", period=3, momentum=0.9,
                            optimizer=opt)
        hook = D.cser_hook
    model.register_comm_hook(state, hook)
    return net, model, opt, state


def _train(model, opt, rank, first):
    from torch import nn

    for s in range(first, first + STEPS):
        x, y = _batch(rank, s)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def dcp_rank(rank, world, folder, algo):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.checkpoint.stateful import Stateful

    from cser_hooks.checkpoint import DCPState

    net, model, opt, state = _job(algo)
    _train(model, opt, rank, 0)
    msd, osd = get_state_dict(net, opt)
    assert isinstance(DCPState(state), Stateful)
    dcp.save({"model": msd, "optim": osd, "cser": DCPState(state)}, checkpoint_id=folder)
    saved = {k: {n: t.clone() for n, t in v.items()} for k, v in state.buffers.items()}
    _train(model, opt, rank, STEPS)
    uninterrupted = [p.detach().clone() for p in net.parameters()]

    net2, model2, opt2, state2 = _job(algo)
    msd2, osd2 = get_state_dict(net2, opt2)
    target = {"model": msd2, "optim": osd2, "cser": DCPState(state2)}
    dcp.load(target, checkpoint_id=folder)
    set_state_dict(net2, opt2, model_state_dict=target["model"], optim_state_dict=target["optim"])
    loaded = {k: {n: t.clone() for n, t in v.items()} for k, v in state2._loaded.items()}
    _train(model2, opt2, rank, STEPS)
    resumed = [p.detach().clone() for p in net2.parameters()]
    return {"uninterrupted": uninterrupted, "resumed": resumed, "saved": saved, "loaded": loaded,
            "step": state2.step}


@pytest.mark.parametrize("algo", ["ef", "mcser"])
def test_dcp_round_trip_continues_bitwise(tmp_path, algo):
    out = run_ranks(dcp_rank, 2, str(tmp_path / algo), algo, timeout=120)
    for r in out:
        assert r["step"] == 2 * STEPS
        assert all(torch.equal(a, b) for a, b in zip(r["uninterrupted"], r["resumed"])), "resume is not bitwise"
        assert r["saved"] and r["saved"].keys() == r["loaded"].keys()
        for k in r["saved"]:
            for n, t in r["saved"][k].items():
                assert torch.equal(t, r["loaded"][k][n]), f"rank {out.index(r)} got another rank's {n}"
    k = next(iter(out[0]["saved"]))
    n = next(iter(out[0]["saved"][k]))
    assert not torch.equal(out[0]["saved"][k][n], out[1]["saved"][k][n]), "the ranks' tensors should differ"


def dcp_partial_rank(rank, world, folder):
    """CSER with a partial C2 saved between full synchronizations: DCP keeps rank 0's replica of the
    model; the first step after the load must fail on every rank with the load-order error, never train."""
    import torch.distributed.checkpoint as dcp
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from cser_hooks import ddp as D
    from cser_hooks.checkpoint import DCPState

    def job():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 2))
        model = DDP(net)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        state = D.CSERState(c1="random_block:ratio=1/4,block=8", c2="random_block:ratio=1/2,block=8", period=4,
                            optimizer=opt)
        model.register_comm_hook(state, D.cser_hook)
        return net, model, opt, state

    net, model, opt, state = job()
    _train(model, opt, rank, 0)
    dcp.save({"model": net.state_dict(), "cser": DCPState(state)}, checkpoint_id=folder)
    net2, model2, opt2, state2 = job()
    target = {"model": net2.state_dict(), "cser": DCPState(state2)}
    dcp.load(target, checkpoint_id=folder)
    net2.load_state_dict(target["model"])
    try:
        _train(model2, opt2, rank, STEPS)
    except Exception as e:  # noqa: BLE001 - the message is the result
        return str(e)
    return "trained"


def test_dcp_between_partial_resets_fails_clearly(tmp_path):
    for msg in run_ranks(dcp_partial_rank, 2, str(tmp_path / "partial"), timeout=120):
        assert "not those the state was saved with" in msg, msg


def test_dcp_state_refuses_what_it_cannot_wrap():
    from cser_hooks.checkpoint import DCPState

    with pytest.raises(TypeError, match="wraps a cser_hooks state"):
        DCPState(object())
