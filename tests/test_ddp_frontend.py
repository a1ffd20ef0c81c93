"""DDP front end: byte accounting, resume, bad input and DDP feature compatibility (issue: DDP front end).

The numerical equivalence with the reference simulations lives in test_ddp_equivalence.py; this
file checks what the front end promises around it, on real gloo ranks (tests/harness.py).
"""
from __future__ import annotations

import os

import pytest
import torch

from cser_hooks.comm import Communicator
from harness import RankError, run_ranks

# --------------------------------------------------------------------------------------------
# a small deterministic workload (data depends only on rank and step)

def _model(width=64, din=20, dout=10, dtype=torch.float32):
    torch.manual_seed(1234)
    m = torch.nn.Sequential(torch.nn.Linear(din, width), torch.nn.ReLU(), torch.nn.Linear(width, dout))
    return m.to(dtype)


def _batch(rank, step, din=20, dout=10, n=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(10_000 * rank + step)
    return torch.randn(n, din, generator=g).to(dtype), torch.randint(0, dout, (n,), generator=g)


def _make(kind, ddp, opt, **kw):
    from cser_hooks import ddp as D
    if kind == "ef":
        st = D.EFState(None, kw.pop("compressor", "random_block:ratio=1/16,block=8"), **kw)
        ddp.register_comm_hook(st, D.ef_hook)
    elif kind == "cser":
        st = D.CSERState(None, kw.pop("c1", "random_block:ratio=1/16,block=8"),
                         kw.pop("c2", "random_block:ratio=1/4,block=8"), kw.pop("period", 4), optimizer=opt, **kw)
        ddp.register_comm_hook(st, D.cser_hook)
    elif kind == "compskip":
        st = D.CompSkipState(None, kw.pop("compressor", "random_block:ratio=1/4,block=8"), **kw)
        ddp.register_comm_hook(st, D.compskip_hook)
    else:
        raise ValueError(kind)
    return st


def _train(rank, ddp, opt, steps, start=0, dtype=torch.float32, accumulate=1):
    for s in range(start, start + steps):
        opt.zero_grad()
        for a in range(accumulate):
            x, y = _batch(rank, s * accumulate + a, dtype=dtype)
            if a < accumulate - 1:
                with ddp.no_sync():
                    torch.nn.functional.cross_entropy(ddp(x).float(), y).backward()
            else:
                torch.nn.functional.cross_entropy(ddp(x).float(), y).backward()
        opt.step()


def _flat(model):
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


# --------------------------------------------------------------------------------------------
# bytes

def _count_rank(rank, ws, kind, kw, cap_mb):
    m = _model()
    # small buckets: in torch 2.13 a small model only gets several buckets with find_unused_parameters
    ddp = torch.nn.parallel.DistributedDataParallel(m, bucket_cap_mb=cap_mb, find_unused_parameters=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    st = _make(kind, ddp, opt, **kw)
    per_step = []
    for s in range(4):
        _train(rank, ddp, opt, 1, start=s)
        per_step.append(st.stats()["bytes_sent_last_step"])
    # the buckets the hook saw: key -> element offsets of its parameters
    return per_step, {k: (seg[-1], seg) for k, seg in st.seg_cache.items()}


@pytest.mark.parametrize("kind,kw", [
    ("ef", {"compressor": "random_block:ratio=1/16,block=8"}),
    ("ef", {"compressor": "top_k:ratio=1/16"}),
    ("ef", {"compressor": "sign_blockwise"}),
    ("ef", {"compressor": "qsgd:s=7,block=64"}),
    ("cser", {"c2": "random_block:ratio=1/4,block=8", "period": 2}),
])
def test_bytes_counted_equal_wire_format(kind, kw):
    """state.stats() bytes == sum over buckets of the compressor's wire_bytes + the 1-element finite flag."""
    from cser_hooks.compressors import get_compressor

    per_step, layout = run_ranks(_count_rank, 2, kind, dict(kw), 0.004, timeout=90)[0]
    assert len(layout) >= 2, "the test wants several buckets"
    f32 = torch.float32
    if kind == "ef":
        c = get_compressor(kw["compressor"])
        # + the non-finite flag: one fp32 element appended (allreduce) or 4 bytes packed (allgather)
        compressed = sum(c.wire_bytes(n, f32, seg) + 4 for n, seg in layout.values())
        assert per_step[1:] == [compressed] * 3
    else:
        c1, c2 = get_compressor("random_block:ratio=1/16,block=8"), get_compressor(kw["c2"])
        grad_part = sum(c1.wire_bytes(n, f32) + 4 for n, _ in layout.values())
        reset_part = sum(c2.wire_bytes(n, f32) for n, _ in layout.values())
        # steps 1..3; reset after step s when (s+1) % 2 == 0 (s >= warmup 1): after step 1 and 3, counted in the
        # following step (the post-hook runs after the step closed)
        assert per_step[1] == grad_part
        assert per_step[2] == grad_part + reset_part
        assert per_step[3] == grad_part
    dense = sum(n * 4 for n, _ in layout.values())
    assert per_step[0] == dense  # warm-up: plain allreduce


def _ratio_rank(rank, ws, steps):
    torch.manual_seed(0)
    # 4.2M parameters in DDP's default buckets (1 MB first, then 25 MB): block rounding (at most one block of 256
    # per bucket and compressor) stays below 0.5% of the payload
    m = torch.nn.Sequential(torch.nn.Linear(512, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 512))
    ddp = torch.nn.parallel.DistributedDataParallel(m)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    from cser_hooks.ddp import CSERState, cser_hook
    st = CSERState(None, c1="random_block:ratio=1/64", c2="random_block:ratio=1/32", period=8, optimizer=opt,
                   warmup_steps=1)
    ddp.register_comm_hook(st, cser_hook)
    g = torch.Generator().manual_seed(rank)
    sent = dense = 0
    for s in range(steps + 1):
        x = torch.randn(8, 512, generator=g)
        opt.zero_grad()
        ddp(x).pow(2).mean().backward()
        opt.step()
        if s >= 1:  # after warm-up
            sent += st.stats()["bytes_sent_last_step"]
            dense += st.stats()["dense_bytes_last_step"]
    return sent / steps, dense / steps, dict(st.seg_cache)


@pytest.mark.slow
def test_cser_mean_traffic_under_one_fiftieth():
    """CSER ρ1=1/64, ρ2=1/32, H=8 (nominal 1/51.2): mean bytes/step over 64 steps <= 1/50 of dense."""
    mean_sent, mean_dense, buckets = run_ranks(_ratio_rank, 2, 64, timeout=240)[0]
    ratio = mean_sent / mean_dense
    print(f"CSER mean bytes/step {mean_sent:.0f} of dense {mean_dense:.0f}: 1/{1 / ratio:.1f}; "
          f"buckets {[seg[-1] for seg in buckets.values()]}")
    assert ratio <= 1 / 50
    assert ratio >= 1 / 64  # it does send the C1 share


# --------------------------------------------------------------------------------------------
# resume

def _resume_rank(rank, ws, kind, kw, phase, steps, ckpt_dir):
    m = _model()
    ddp = torch.nn.parallel.DistributedDataParallel(m, bucket_cap_mb=0.004, find_unused_parameters=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    st = _make(kind, ddp, opt, **dict(kw))
    path = os.path.join(ckpt_dir, f"rank{rank}.pt")
    start = 0
    if phase == "second":
        ck = torch.load(path, weights_only=False)
        m.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        st.load_state_dict(ck["state"])
        start = ck["step"]
    _train(rank, ddp, opt, steps, start=start)
    if phase == "first":
        torch.save({"model": m.state_dict(), "opt": opt.state_dict(), "state": st.state_dict(),
                    "step": start + steps}, path)
    return _flat(m)


@pytest.mark.parametrize("kind,kw", [
    ("cser", {}),
    ("ef", {"compressor": "top_k:ratio=1/16"}),
    ("ef", {"compressor": "qsgd:s=7,block=64"}),
    ("compskip", {"send_every": 3}),
])
def test_resume_is_bitwise_identical(tmp_path, kind, kw):
    """20 steps + save + new processes + load + 20 steps == 40 uninterrupted steps, bitwise."""
    full = run_ranks(_resume_rank, 2, kind, kw, "full", 40, str(tmp_path), timeout=120)
    run_ranks(_resume_rank, 2, kind, kw, "first", 20, str(tmp_path), timeout=120)
    resumed = run_ranks(_resume_rank, 2, kind, kw, "second", 20, str(tmp_path), timeout=120)
    for r in range(2):
        assert torch.equal(full[r], resumed[r]), f"rank {r}: max diff {(full[r] - resumed[r]).abs().max()}"


# --------------------------------------------------------------------------------------------
# bad input

def _mismatch_rank(rank, ws):
    m = _model()
    ddp = torch.nn.parallel.DistributedDataParallel(m)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    _make("cser", ddp, opt, period=4 if rank == 0 else 5)
    _train(rank, ddp, opt, 2)


def test_config_mismatch_across_ranks_is_a_clear_error():
    with pytest.raises(RankError) as ei:
        run_ranks(_mismatch_rank, 2, timeout=60)
    msg = str(ei.value)
    assert "ranks are configured differently" in msg and "'period'" in msg


def _nan_rank(rank, ws, kind):
    m = _model()
    ddp = torch.nn.parallel.DistributedDataParallel(m)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    _make(kind, ddp, opt)
    _train(rank, ddp, opt, 2)
    x, y = _batch(rank, 99)
    if rank == 1:
        x[0, 0] = float("nan")
    opt.zero_grad()
    try:
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
    except Exception as e:  # noqa: BLE001 - the test inspects what every rank saw
        return f"{type(e).__name__}: {e}"
    return "no error"


@pytest.mark.parametrize("kind", ["ef", "cser"])
def test_nan_gradient_on_one_rank_fails_every_rank_clearly(kind):
    """A NaN on one rank raises on *all* ranks (the flag travels with the payload): no hang, no divergence."""
    out = run_ranks(_nan_rank, 2, kind, timeout=60)
    for r, msg in enumerate(out):
        assert "non-finite gradient" in msg, f"rank {r}: {msg}"


def _wrong_shape_rank(rank, ws, path):
    from cser_hooks.ddp import EFState, ef_hook
    m = _model(width=64)
    ddp = torch.nn.parallel.DistributedDataParallel(m)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    st = EFState(None, "random_block:ratio=1/16,block=8")
    ddp.register_comm_hook(st, ef_hook)
    _train(rank, ddp, opt, 3)
    torch.save(st.state_dict(), path)
    # a different model (other bucket size) restoring that state must fail clearly
    m2 = _model(width=32)
    ddp2 = torch.nn.parallel.DistributedDataParallel(m2)
    opt2 = torch.optim.SGD(ddp2.parameters(), lr=0.1)
    st2 = EFState(None, "random_block:ratio=1/16,block=8")
    st2.load_state_dict(torch.load(path, weights_only=False))
    ddp2.register_comm_hook(st2, ef_hook)
    errors = []
    try:
        _train(rank, ddp2, opt2, 1, start=3)
    except Exception as e:  # noqa: BLE001
        errors.append(str(e))
    # another algorithm's state is refused at load time
    from cser_hooks.ddp import CSERState
    try:
        CSERState(None).load_state_dict(torch.load(path, weights_only=False))
    except ValueError as e:
        errors.append(str(e))
    return errors


def test_wrong_shape_or_algorithm_state_on_restore_is_a_clear_error(tmp_path):
    errors = run_ranks(_wrong_shape_rank, 1, str(tmp_path / "st.pt"), timeout=60)[0]
    assert len(errors) == 2
    assert "elements here but" in errors[0] and "in the checkpoint: restore into the same model" in errors[0]
    assert "checkpoint is for algorithm 'ef'" in errors[1]


class _OneRank(Communicator):
    """A world of one rank without a process group (its averages are the values themselves)."""

    def all_gather_object(self, obj):
        return [obj]


class _PeerComm(Communicator):
    """Rank 0 of 2 without a process group; the peer's config() is ours updated with ``theirs``."""

    world_size = 2

    def __init__(self, theirs: dict):
        super().__init__()
        self.theirs = theirs

    def all_gather_object(self, obj):
        return [obj, {k: v for k, v in {**obj, **self.theirs}.items() if v is not None}]


@pytest.mark.parametrize("kw,match", [
    ({"momentum": 1.0}, r"momentum \(M-CSER's β\) must be in \[0, 1\)"),
    ({"momentum": -0.1}, r"must be in \[0, 1\)"),
    ({"nesterov": True}, "nesterov=True needs momentum > 0"),
])
def test_mcser_knobs_out_of_range_are_clear_errors(kw, match):
    from cser_hooks.algorithms.cser import CSER
    with pytest.raises(ValueError, match=match):
        CSER(Communicator(), **kw)


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    lambda ps: torch.optim.Adam(ps, lr=1e-3),
], ids=["sgd_momentum", "sgd_nesterov", "adam"])
def test_mcser_refuses_an_optimizer_with_momentum(make_opt):
    """M-CSER applies the momentum before C1: a second one in the optimizer is refused, at construction and
    at attach_optimizer; the default mode (momentum=0, the practical variant) takes any optimizer."""
    from cser_hooks.algorithms.cser import CSER
    opt = make_opt(_model().parameters())
    for attach_later in (False, True):
        with pytest.raises(ValueError, match=r"M-CSER.*CSERState\(momentum=0.9.*torch\.optim\.SGD\(.*momentum=0"):
            if attach_later:
                CSER(Communicator(), momentum=0.9).attach_optimizer(opt)
            else:
                CSER(Communicator(), momentum=0.9, optimizer=opt)
    assert CSER(Communicator(), optimizer=opt).optimizer is opt
    plain = torch.optim.SGD(_model().parameters(), lr=0.1, weight_decay=1e-4)
    assert CSER(Communicator(), momentum=0.9, optimizer=plain).optimizer is plain


@pytest.mark.parametrize("mine,theirs,field", [
    ({"momentum": 0.9}, {"momentum": 0.8}, "momentum"),
    ({"momentum": 0.9, "nesterov": True}, {"nesterov": False}, "nesterov"),
    ({"momentum": 0.9}, {"momentum": None, "nesterov": None}, "momentum"),  # the peer runs plain CSER
])
def test_mcser_config_mismatch_names_the_field(mine, theirs, field):
    from cser_hooks.algorithms.cser import CSER
    from cser_hooks.state import ConfigMismatchError
    st = CSER(_PeerComm(theirs), **mine)
    assert st.config()["momentum"] == 0.9 and st.config()["nesterov"] == mine.get("nesterov", False)
    with pytest.raises(ConfigMismatchError, match=f"field '{field}'"):
        st.check_agreement()
    assert "momentum" not in CSER(Communicator()).config()  # default mode: old checkpoints keep loading


class _Bucket:
    """Just enough of a DDP GradBucket for ``run_hook``: one bucket, one parameter (the same tensor every
    step, as in DDP), last of its step."""

    def __init__(self, grad, param):
        self.grad, self.param = grad, param

    def buffer(self):
        return self.grad

    def index(self):
        return 0

    def parameters(self):
        return [self.param]

    def is_last(self):
        return True


def _mcser_steps(st, steps, start=0):
    """The gradient the optimizer would get at each step, world size 1 (gradient of step s: seed s)."""
    from cser_hooks.ddp import run_hook
    param = torch.zeros(40)
    return [run_hook(st, _Bucket(torch.randn(40, generator=torch.Generator().manual_seed(s)), param)).wait().clone()
            for s in range(start, start + steps)]


def test_mcser_hook_applies_the_momentum_and_checkpoints_it():
    """One rank: ĝ = v = g + β m with m ← β m + g (Nesterov), from the first step after warm-up; the fp32
    m travels in state_dict(), so 3 + save/load + 3 steps == 6 steps, bitwise."""
    from cser_hooks.algorithms.cser import CSER
    kw = dict(c1="random_block:ratio=1/4,block=8", c2="identity", period=2, momentum=0.9, nesterov=True)
    full = _mcser_steps(CSER(_OneRank(), **kw), 6)
    m = torch.zeros(40)
    for s in range(6):
        g = torch.randn(40, generator=torch.Generator().manual_seed(s))
        if s >= 1:  # warm-up step 0: the plain (averaged) gradient, m untouched
            m = 0.9 * m + g
            g = g + 0.9 * m
        assert torch.allclose(full[s], g, atol=1e-6), f"step {s}"
    first = CSER(_OneRank(), **kw)
    head = _mcser_steps(first, 3)
    sd = first.state_dict()
    assert sd["buffers"][0]["m"].dtype == torch.float32
    second = CSER(_OneRank(), **kw)
    second.load_state_dict(sd)
    tail = _mcser_steps(second, 3, start=3)
    assert all(torch.equal(a, b) for a, b in zip(full, head + tail))


def _fp16_overflow_rank(rank, ws):
    """Documented behaviour: the fp16 compressor clips to ±65504 instead of sending inf."""
    from cser_hooks.ddp import EFState, ef_hook
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 1, bias=False)
    ddp = torch.nn.parallel.DistributedDataParallel(m)
    st = EFState(None, "fp16", warmup_steps=0)
    ddp.register_comm_hook(st, ef_hook)
    x = torch.full((1, 4), 1e6 if rank == 0 else 1.0)
    ddp(x).sum().backward()
    return m.weight.grad.clone(), st.state_dict()["buffers"][0]["e"]


def test_fp16_overflow_is_clipped_and_the_excess_stays_in_the_residual():
    g0, e0 = run_ranks(_fp16_overflow_rank, 2, timeout=60)[0]
    assert torch.isfinite(g0).all()
    # rank 0 sent 65504 (clipped) and rank 1 sent 1: the average, rounded to fp16 on the wire
    expect = (torch.tensor(65504.0 / 2, dtype=torch.float16).float() + torch.tensor(0.5, dtype=torch.float16).float())
    assert torch.allclose(g0, expect.expand_as(g0), rtol=1e-3)
    # error feedback keeps what was clipped: 1e6 - 65504 (up to fp32 rounding)
    assert torch.allclose(e0, torch.full_like(e0, 1e6 - 65504.0), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# DDP features

class _WithUnused(torch.nn.Module):
    """The model plus a layer that never takes part in forward (find_unused_parameters=True)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.extra = inner, torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.inner(x)


_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "mcser_bf16": torch.bfloat16}


def _features_rank(rank, ws, feature):
    from cser_hooks.ddp import CSERState, EFState, cser_hook, ef_hook
    dtype = _DTYPE.get(feature, torch.float32)
    m = _model(dtype=dtype)
    if feature == "unused":
        m = _WithUnused(m)
    kwargs = {"bucket_cap_mb": 0.001, "find_unused_parameters": True} if feature == "many_buckets" else {}
    if feature == "unused":
        kwargs["find_unused_parameters"] = True
    if feature == "static":
        kwargs["static_graph"] = True
    ddp = torch.nn.parallel.DistributedDataParallel(m, **kwargs)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    if feature in ("cser_full", "mcser_bf16"):  # full resets after steps 3 and 7
        momentum = dict(momentum=0.9, nesterov=True) if feature == "mcser_bf16" else {}
        st = CSERState(None, "random_block:ratio=1/16,block=8", "identity", period=4, optimizer=opt, **momentum)
        ddp.register_comm_hook(st, cser_hook)
    else:
        st = EFState(None, "random_block:ratio=1/8,block=8")
        ddp.register_comm_hook(st, ef_hook)
    _train(rank, ddp, opt, 8, dtype=dtype, accumulate=2 if feature == "no_sync" else 1)
    return _flat(m), st.step


@pytest.mark.parametrize("feature,ws", [
    ("many_buckets", 4), ("no_sync", 2), ("unused", 2), ("static", 2), ("fp16", 2), ("bf16", 2),
    ("cser_full", 2), ("mcser_bf16", 2), ("world1", 1),
])
def test_ddp_features_keep_replicas_identical(feature, ws):
    """EF replicas apply the same averaged gradient: parameters identical on every rank after 8 steps,
    and they moved; the step counter counts synchronising backward passes only (no_sync excluded)."""
    out = run_ranks(_features_rank, ws, feature, timeout=120)
    start = _flat(_model(dtype=_DTYPE.get(feature, torch.float32)))
    for r in range(1, ws):
        assert torch.equal(out[0][0], out[r][0]), f"rank {r} differs"
    assert torch.isfinite(out[0][0]).all()
    assert (out[0][0][: start.numel()] - start).abs().max() > 1e-3
    assert all(st == 8 for _, st in out)


def _world1_rank(rank, ws, use_hook):
    from cser_hooks.ddp import CSERState, cser_hook
    m = _model()
    ddp = torch.nn.parallel.DistributedDataParallel(m)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    if use_hook:
        st = CSERState(None, "random_block:ratio=1/16,block=8", "random_block:ratio=1/4,block=8", period=3,
                       optimizer=opt)
        ddp.register_comm_hook(st, cser_hook)
    _train(rank, ddp, opt, 10)
    return _flat(m)


def test_world_size_one_has_the_same_numerics_as_no_hook():
    """With one rank, CSER's averages are the rank's own values: training equals plain DDP bitwise."""
    (a,) = run_ranks(_world1_rank, 1, True, timeout=60)
    (b,) = run_ranks(_world1_rank, 1, False, timeout=60)
    assert torch.equal(a, b)


def test_hook_state_type_is_checked():
    from cser_hooks.ddp import cser_hook
    with pytest.raises(TypeError, match="CSERState"):
        cser_hook(object(), None)



@pytest.mark.parametrize("which", ["c1", "c2"])
def test_cser_rejects_a_scaled_mask(which):
    """CSER overwrites the selected blocks with their average: a scaled (unbiased) mask would break exactness."""
    from cser_hooks.algorithms.cser import CSER
    kw = {"c1": "random_block:ratio=1/4", "c2": "random_block:ratio=1/2"}
    kw[which] = kw[which] + ",scaled=1"
    with pytest.raises(ValueError, match=f"CSER: {which}=.*is scaled.*Drop ',scaled=1'"):
        CSER(_OneRank(), **kw)


def test_scratch_is_one_reused_tensor_per_device_and_dtype():
    """AlgorithmState.scratch: the same storage step after step (no per-step allocation), regrown only
    for a larger request, separate per dtype; never part of the saved state."""
    from cser_hooks.state import AlgorithmState

    st = AlgorithmState(Communicator())
    a = st.scratch(100, "cpu")
    assert a.numel() == 100 and a.dtype == torch.float32
    assert st.scratch(60, "cpu").data_ptr() == a.data_ptr()
    assert st.scratch(100, "cpu", torch.bfloat16).data_ptr() != a.data_ptr()
    big = st.scratch(200, "cpu")
    assert big.numel() == 200 and st.scratch(100, "cpu").data_ptr() == big.data_ptr()
    assert not st.buffers
