"""fp16 autocast + torch.amp.GradScaler with ``on_nonfinite="skip"`` (cser_hooks/nonfinite.py).

Real 2-rank gloo DDP jobs on scikit-learn's digits, autocast to fp16 on the CPU, a real
``GradScaler("cpu")``. An overflow is injected on rank 1 only, at chosen steps (its loss times inf,
so its gradients hold inf/NaN, as a too-large loss scale produces). Checked:

* every algorithm's state after the skipped step equals its state before it, bitwise (per-key
  tensors, step counter = RNG position, per-key dicts), on both ranks; both GradScalers skipped
  (their scale halved) and the model did not move; for the local-SGD algorithms the step is one a
  synchronization follows, and an overflow on a purely local step is one rank's own (only its
  GradScaler skips, nothing of the state changes, the step counters stay aligned);
* a CSER full reset due at the skipped step happens after the next optimizer step that runs
  (the replicas are bitwise equal right after it, and not before);
* the non-finite check reads the device at most once per optimizer step, through the seam the
  CUDA path uses (``StepGuard.host_reads``);
* the job trains: with overflows injected at several steps each algorithm ends near the same job
  without them;
* ``on_nonfinite="raise"`` keeps its clear error on every rank, and "skip" without a GradScaler
  (optimizer.step() called on the flagged gradient) raises before the parameters change;
  ``"auto"`` is "skip" where the configuration can skip, else "raise".
"""
from __future__ import annotations

import pytest
import torch

from harness import RankError, run_ranks

pytestmark = [pytest.mark.timeout(400)]

ALGOS = {
    "ef_random_block": ("EFState", "ef_hook", {"compressor": "random_block:ratio=1/8,block=16"}, 0.9),
    "ef_random_block_bf16": ("EFState", "ef_hook", {"compressor": "random_block:ratio=1/8,block=16",
                                                    "residual_dtype": "bf16"}, 0.9),
    "ef_top_k": ("EFState", "ef_hook", {"compressor": "top_k:ratio=1/8"}, 0.9),
    # the non-finite flag read off the payload (top-k's values above, QSGD's block norms here)
    "ef_qsgd": ("EFState", "ef_hook", {"compressor": "qsgd:s=15,block=64"}, 0.9),
    # the 64-element bias bucket goes dense (min_compress_numel): its flag comes from the average
    "ef_top_k_small_dense": ("EFState", "ef_hook", {"compressor": "top_k:ratio=1/8", "min_compress_numel": 100}, 0.9),
    "cser": ("CSERState", "cser_hook", {"c1": "random_block:ratio=1/8,block=16", "c2": "identity",
                                         "period": 4}, 0.9),
    "mcser_top_k": ("CSERState", "cser_hook", {"c1": "top_k:ratio=1/8", "c2": "random_block:ratio=1/2,block=16",
                                                "period": 4, "momentum": 0.9, "nesterov": True}, 0.0),
    "compskip": ("CompSkipState", "compskip_hook", {"compressor": "top_k:ratio=1/8", "send_every": 2}, 0.9),
    "dist_ef_sgdm": ("DistEFSGDMState", "dist_ef_sgdm_hook", {"momentum": 0.9}, 0.0),
    # local SGD: the flag is shared only on the steps a synchronization follows (7 is one for all three)
    "qsparse": ("QsparseLocalSGDState", "qsparse_local_sgd_hook", {"compressor": "top_k:ratio=1/8 + qsgd:s=15",
                                                                   "period": 4}, 0.9),
    "qprsgd": ("QPRSGDState", "qprsgd_hook", {"period": 4}, 0.9),
    "cser_pl": ("CSERState", "cser_hook", {"c1": "zero", "c2": "identity", "period": 4}, 0.9),
}
LOCAL_SGD = ("qsparse", "qprsgd", "cser_pl")
BATCH, LR = 32, 0.05


def _data():
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    return x[:1500], y[:1500], x[1500:], y[1500:]


def _snapshot(st) -> dict:
    sd = st.state_dict()
    return {"step": sd["step"], "buffers": {k: {n: t.clone() for n, t in v.items()} for k, v in sd["buffers"].items()},
            "dicts": {k: dict(v) for k, v in sd.items() if k in ("lr_of", "reset_done", "skips")}}


def _train(rank, ws, algo, steps, bad_steps, policy="skip", scaler_on=True, watch=(), amp_dtype=torch.float16):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from cser_hooks import ddp as D

    state_name, hook_name, kw, momentum = ALGOS[algo]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    ddp = DDP(model, bucket_cap_mb=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum)
    st = getattr(D, state_name)(optimizer=opt, on_nonfinite=policy, **kw)
    ddp.register_comm_hook(st, getattr(D, hook_name))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=10 ** 6, enabled=scaler_on)
    xtr, ytr, xte, yte = _data()
    g = torch.Generator().manual_seed(100 + rank)
    out = {"watch": {}, "reads": [], "equal_after": {}}
    for it in range(steps):
        idx = torch.randint(0, len(xtr), (BATCH,), generator=g)
        before = _snapshot(st) if it in watch else None
        params_before = [p.detach().clone() for p in model.parameters()]
        reads0 = st.guard.host_reads if st.guard is not None else 0
        scale0 = scaler.get_scale() if scaler_on else 1.0
        opt.zero_grad()
        with torch.autocast("cpu", dtype=amp_dtype):
            loss = torch.nn.functional.cross_entropy(ddp(xtr[idx]).float(), ytr[idx])
        if rank == 1 and it in bad_steps:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        try:
            scaler.step(opt)
        except FloatingPointError as e:
            unchanged = all(torch.equal(a, b) for a, b in zip(params_before, model.parameters()))
            raise FloatingPointError(f"{e} [parameters unchanged: {unchanged}]") from e
        scaler.update()
        if st.guard is not None:
            out["reads"].append(st.guard.host_reads - reads0)
        if it in watch:
            out["watch"][it] = {"before": before, "after": _snapshot(st),
                                "scale": (scale0, scaler.get_scale() if scaler_on else 1.0),
                                "moved": any(not torch.equal(a, b) for a, b in zip(params_before, model.parameters()))}
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        everyone = [torch.empty_like(flat) for _ in range(ws)]
        torch.distributed.all_gather(everyone, flat)
        out["equal_after"][it] = all(torch.equal(everyone[0], e) for e in everyone)
    with torch.no_grad():
        out["acc"] = float((model(xte).argmax(1) == yte).float().mean())
    out["stats"] = st.stats()
    return out


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_skipped_step_leaves_state_bitwise_unchanged(algo):
    bad = 7 if algo != "compskip" else 9   # CompSkip: a send step ((s + 1) % 2 == 0)
    res = run_ranks(_train, 2, algo, 12, {bad}, watch=(bad,), timeout=200)
    for rank, r in enumerate(res):
        w = r["watch"][bad]
        assert w["scale"][1] == w["scale"][0] / 2, f"rank {rank}: GradScaler did not skip ({w['scale']})"
        assert not w["moved"], f"rank {rank}: the model moved on a skipped step"
        b, a = w["before"], w["after"]
        assert a["step"] == b["step"], (rank, b["step"], a["step"])
        assert a["dicts"] == b["dicts"]
        assert a["buffers"].keys() == b["buffers"].keys()
        for k in b["buffers"]:
            for n, t in b["buffers"][k].items():
                assert torch.equal(a["buffers"][k][n], t), f"rank {rank}: {n!r} of key {k!r} changed"
        assert r["stats"]["skipped_steps"] == 1
        assert (r["stats"]["uncompressed_keys"] == 1) == ("small_dense" in algo), r["stats"]["uncompressed_keys"]
        # the shadows are one copy of the per-key tensors (CSER with a shared-mask C1 stores none)
        assert r["stats"]["shadow_bytes"] == r["stats"]["state_bytes"]
        assert (r["stats"]["state_bytes"] > 0) == (algo not in ("cser", "cser_pl"))
        # at most one device read per optimizer step for the non-finite check
        assert max(r["reads"]) <= 1 and sum(r["reads"]) >= 12 - 2 - 1


def test_cser_reset_due_at_a_skipped_step_runs_at_the_next():
    # period 4, warm-up 1: the reset is due after step 3 (iteration 3); iteration 3 is skipped, so
    # iteration 4 runs step 3 again and resets after its optimizer step.
    res = run_ranks(_train, 2, "cser", 6, {3}, timeout=200)
    eq = res[0]["equal_after"]
    assert not eq[2] and not eq[3], eq
    assert eq[4], eq
    assert res[0]["stats"]["step"] == 5 and res[0]["stats"]["skipped_steps"] == 1


@pytest.mark.parametrize("algo", LOCAL_SGD)
def test_local_step_overflow_is_one_ranks_own(algo):
    # step 5 is a local step (no synchronization follows): rank 1's GradScaler alone skips its update;
    # nothing of the state changes on either rank and the step counters stay aligned
    res = run_ranks(_train, 2, algo, 12, {5}, watch=(5,), timeout=200)
    w0, w1 = res[0]["watch"][5], res[1]["watch"][5]
    assert w1["scale"][1] == w1["scale"][0] / 2 and not w1["moved"]
    assert w0["scale"][1] == w0["scale"][0] and w0["moved"]
    for w in (w0, w1):
        assert w["after"]["step"] == w["before"]["step"] + 1
        for k, tensors in w["before"]["buffers"].items():
            for n, t in tensors.items():
                assert torch.equal(w["after"]["buffers"][k][n], t), (algo, k, n)
    assert res[0]["stats"]["step"] == res[1]["stats"]["step"] == 12
    assert res[0]["stats"]["skipped_steps"] == res[1]["stats"]["skipped_steps"] == 0


@pytest.mark.parametrize("algo", ["cser", "ef_top_k", "dist_ef_sgdm", "qsparse"])
def test_trains_through_overflows(algo):
    clean = run_ranks(_train, 2, algo, 150, set(), timeout=300)
    hit = run_ranks(_train, 2, algo, 150, {20, 59, 60, 111}, timeout=300)
    assert clean[0]["acc"] > 0.85, clean[0]["acc"]
    assert hit[0]["acc"] > clean[0]["acc"] - 0.03, (hit[0]["acc"], clean[0]["acc"])
    # qsparse (H = 4): iterations 59 and 60 both run step 59, which a synchronization follows (skipped
    # on both ranks); 20 and 111 (step 109) are local steps, rank 1's own
    assert hit[0]["stats"]["skipped_steps"] == (2 if algo == "qsparse" else 4)


@pytest.mark.parametrize("algo", ["cser", "ef_top_k"])
def test_bf16_autocast_needs_no_scaler(algo):
    # bf16 autocast, no GradScaler, the default policy: trains like the fp16 + scaler job, nothing skipped
    res = run_ranks(_train, 2, algo, 150, set(), policy="raise", scaler_on=False, amp_dtype=torch.bfloat16,
                    timeout=300)
    assert res[0]["acc"] > 0.85, res[0]["acc"]
    assert res[0]["stats"]["skipped_steps"] == 0 and res[0]["stats"]["step"] == 150


def test_raise_policy_still_raises_on_every_rank():
    with pytest.raises(RankError) as err:
        run_ranks(_train, 2, "ef_random_block", 6, {3}, policy="raise", timeout=120)
    text = str(err.value)
    assert "non-finite gradient" in text and "on_nonfinite='skip'" in text
    assert "rank 0" in text and "rank 1" in text


@pytest.mark.parametrize("scaler_on", [False, True], ids=["no_scaler", "scaler"])
@pytest.mark.parametrize("algo", ["dist_ef_sgdm", "qprsgd", "qsparse", "cser_pl"])
def test_raise_policy_raises_on_every_rank_together(algo, scaler_on):
    # an inf loss on rank 1 at step 7: dist-EF-SGDM's server flag (read from Δ's block scales) and, for
    # the local-SGD methods, the flag shared in the hook of a step a synchronization follows make both
    # ranks raise the non-finite error itself (not one rank that error and the other a failed collective).
    # With a GradScaler too: were the check left to the round, rank 1's scaler would skip its step and
    # with it its synchronization, and rank 0 would wait in the round alone.
    with pytest.raises(RankError) as err:
        run_ranks(_train, 2, algo, 10, {7}, policy="raise", scaler_on=scaler_on, timeout=120)
    text = str(err.value)
    assert "rank 0: non-finite gradient" in text and "rank 1: non-finite gradient" in text, text
    assert "collective failed" not in text and "every rank raises this together" in text, text


@pytest.mark.parametrize("algo", ["qprsgd", "qsparse"])
def test_raise_policy_on_a_local_step_says_it_is_one_ranks_own(algo):
    # step 5 is a purely local step: rank 1 raises alone, and says so; rank 0 stops at the synchronization
    with pytest.raises(RankError) as err:
        run_ranks(_train, 2, algo, 10, {5}, policy="raise", scaler_on=False, timeout=120)
    text = str(err.value)
    assert "rank 1: non-finite gradient (NaN/Inf) at step 5" in text and "this rank raises alone" in text, text
    assert "rank 0: non-finite gradient" not in text, text


def test_skip_without_a_scaler_raises_instead_of_training_on_nan():
    with pytest.raises(RankError) as err:
        run_ranks(_train, 2, "cser", 6, {3}, scaler_on=False, timeout=120)
    assert "optimizer.step() was called on it" in str(err.value)
    assert "[parameters unchanged: True]" in str(err.value)  # raised by the step pre-hook


def test_auto_policy_is_skip_with_finite_checks():
    from cser_hooks.algorithms.cser import CSER
    from cser_hooks.algorithms.ef import ErrorFeedback
    from cser_hooks.algorithms.qsparse import QsparseLocalSGD
    from cser_hooks.comm import Communicator

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    assert ErrorFeedback(Communicator(), optimizer=opt, on_nonfinite="auto").on_nonfinite == "skip"
    e = ErrorFeedback(Communicator(), optimizer=opt, on_nonfinite="auto", check_finite=False)
    assert e.guard is None and e.on_nonfinite == "raise"
    assert CSER(Communicator(), c1="zero", optimizer=opt, on_nonfinite="auto").guard is not None
    assert QsparseLocalSGD(Communicator(), optimizer=opt, on_nonfinite="auto").on_nonfinite == "skip"


def test_unknown_policy_refused():
    from cser_hooks.algorithms.qsparse import QsparseLocalSGD
    from cser_hooks.comm import Communicator

    with pytest.raises(ValueError, match="on_nonfinite must be"):
        QsparseLocalSGD(Communicator(), on_nonfinite="ignore")
