"""The planner (cser_hooks.plan): its formulas on inputs worked out by hand here, its byte predictions
against the stats() of real gloo ranks, and the CLI.

The hand figures are written as numbers (W = 4: an allreduce of n bytes sends 1.5 n, an allgather 3 n;
100 Mbit/s = 12.5e6 bytes/s), not computed with cser_hooks.wire, so a wrong formula in either fails.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cser_hooks import plan
from cser_hooks.bench import methods as bench_methods
from cser_hooks.plan import by_method, cli, collectives, costs
from harness import run_ranks

REPO = Path(__file__).resolve().parents[1]
# a link without protocol overhead or latency, 100 Mbit/s = 12.5e6 bytes/s
BARE_100M = plan.Link(100e6, latency_s=0.0, overhead=0.0)


def _work(shapes, compute_s=0.1, **kw):
    return plan.Workload(tuple(shapes), compute_s, **kw)


# -- formulas by hand ---------------------------------------------------------------------------

def test_collective_bytes_and_hops_by_hand():
    ar = plan.Collective("allreduce", 1000)
    ag = plan.Collective("allgather", 1000)
    a2a = plan.Collective("all_to_all", 100, pieces=(10, 20, 30, 40))
    assert ar.wire_bytes(4) == 1500 and ar.wire_bytes(2) == 1000 and ar.wire_bytes(1) == 0
    assert ag.wire_bytes(4) == 3000 and ag.wire_bytes(2) == 1000
    assert a2a.wire_bytes(4, rank=0) == 90 and a2a.wire_bytes(4, rank=3) == 60  # own chunk stays local
    assert ar.hops(4) == 6 and ag.hops(4) == 3 and a2a.hops(4) == 3 and ar.hops(1) == 0


def test_link_time_by_hand():
    link = plan.Link(100e6, latency_s=50e-6, overhead=0.0)
    # 1 MB allreduce at W = 4: 1.5e6 bytes / 12.5e6 B/s = 0.12 s, plus 2(W-1) = 6 hops of 50 us
    assert link.seconds(plan.Collective("allreduce", 1_000_000), 4) == pytest.approx(0.1203)
    # +10 % protocol bytes: 0.132 s of transfer
    assert plan.Link(100e6, 50e-6, 0.10).seconds(plan.Collective("allreduce", 1_000_000), 4) == \
        pytest.approx(0.1323)
    assert plan.Link.parse("1gbit", "1ms").bandwidth_bps == 1e9 and plan.parse_duration("50us") == 50e-6
    # sync_s (σ) is a per-step cost: step_time adds it, the collective's own time does not hold it
    synced = plan.Link.parse("100mbit", "50us", 0.0, sync="20ms")
    assert synced.sync_s == pytest.approx(0.02) and "20 ms sync per step" in synced.describe()
    assert synced.seconds(plan.Collective("allreduce", 1_000_000), 4) == pytest.approx(0.1203)
    with pytest.raises(ValueError, match="sync >= 0"):
        plan.Link(100e6, sync_s=-1.0)


def test_sync_reaches_the_cli_and_the_extrapolated_grid(capsys):
    work = plan.from_bucket_sizes([250_000], compute_s=0.05)
    cells = {s: plan.extrapolate(work, [8], ["1gbit"], sync=s, methods=["ef-rb@1/8"]) for s in ("0us", "10ms")}
    for a, b in zip(cells["0us"][0]["predictions"], cells["10ms"][0]["predictions"]):
        assert b.step_s == pytest.approx(a.step_s + 0.010), a.method   # one collective per step each
    assert cli.main(["--buckets", "250000", "--bandwidth", "1gbit", "--compute-ms", "50", "--sync", "10ms",
                     "--methods", "ef-rb@1/8"]) == 0
    assert "10 ms sync per step" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="sync 'ten': give a duration"):
        cli.main(["--buckets", "250000", "--compute-ms", "50", "--sync", "ten"])


def test_sync_cost_is_paid_once_per_communicating_step():
    # ef-rb: one allreduce per bucket; two buckets ready during the backward pass (the first at half of it)
    work = plan.from_bucket_sizes([250_000, 250_000], compute_s=1.0)
    base = plan.estimate(work, BARE_100M, 4, methods=["ef-rb@1/8"])[1]
    synced = plan.estimate(work, plan.Link(100e6, 0.0, 0.0, sync_s=0.3), 4, methods=["ef-rb@1/8"])[1]
    x = base.comm_s / 2                 # one bucket's allreduce: 1/8 of 1 MB x 1.5 / 12.5e6 B/s = 15 ms
    assert base.collectives == 2 and x == pytest.approx(0.015, rel=0.05)
    assert synced.comm_s == pytest.approx(base.comm_s + 0.3)        # once, on bucket 0's collective
    # T_b = 0.6 s; bucket 0 ready at 0.3 s ends at 0.3 + 0.3 + x; bucket 1 (ready at 0.6) starts after it
    # and ends at 0.6 + 2x: exposed 2x (without σ: bucket 1 ends at 0.6 + x, exposed x)
    assert base.exposed_s == pytest.approx(x)
    assert synced.exposed_s == pytest.approx(2 * x)
    # a step without a collective pays nothing: local SGD's regular step; its sync step pays σ once
    local = plan.estimate(work, plan.Link(100e6, 0.0, 0.0, sync_s=0.3), 4, methods=["local-sgd@4"])[1]
    plain = plan.estimate(work, BARE_100M, 4, methods=["local-sgd@4"])[1]
    assert local.regular_s == pytest.approx(plain.regular_s)
    assert local.event_s == pytest.approx(plain.event_s + 0.3)
    # one rank: no collective, no σ
    solo = plan.estimate(work, plan.Link(100e6, 0.0, 0.0, sync_s=0.3), 1, methods=["ef-rb@1/8"])[1]
    assert solo.step_s == pytest.approx(plan.estimate(work, BARE_100M, 1, methods=["ef-rb@1/8"])[1].step_s)


def test_dense_step_of_a_1mb_model_at_100mbit_by_hand():
    # 250k fp32 parameters = 1 MB in one bucket (ready at the end of the backward pass: nothing overlaps)
    preds = plan.estimate(_work([(250_000,)], compute_s=0.05), plan.Link(100e6, 50e-6, 0.0), 4, methods=["dense"])
    (dense,) = preds
    assert dense.wire_bytes == 1_500_000 and dense.collectives == 1
    assert dense.step_s == pytest.approx(0.05 + 0.12 + 6 * 50e-6)
    assert dense.compress_s == 0 and dense.speedup == 1


def test_overlap_of_two_buckets_by_hand():
    # two 1 MB buckets (cap 0: one tensor each), W = 2 (allreduce sends n), 0.08 s each at 12.5e6 B/s.
    # compute 0.2 s, backward 0.1 s: bucket 0 ready at 0.05, done 0.13; bucket 1 ready at 0.1, done 0.21;
    # exposed = 0.21 - 0.1 = 0.11 -> step 0.31 (0.36 without overlap)
    work = _work([(250_000,), (250_000,)], compute_s=0.2, bucket_cap_mb=0.0, backward_share=0.5)
    (dense,) = plan.estimate(work, BARE_100M, 2, methods=["dense"])
    assert dense.comm_s == pytest.approx(0.16) and dense.exposed_s == pytest.approx(0.11)
    assert dense.step_s == pytest.approx(0.31)


def test_bucket_assignment_follows_ddp_rule():
    # ready order = reverse registration: sizes 40, 2560, 256, 8192 bytes; a cap of 2097 bytes closes a
    # bucket once it reaches the cap: [40 + 2560], [256 + 8192]
    work = _work([(64, 32), (64,), (10, 64), (10,)], bucket_cap_mb=2097 / 2 ** 20)
    assert [sum(torch.Size(s).numel() for s in b) for b in work.buckets()] == [650, 2112]
    # torch's default (None): first bucket 1 MiB, then 25 MiB; 2 x 16 MiB tensors + 1 KiB
    big = _work([(256,), (2 ** 22,), (2 ** 22,)], bucket_cap_mb=None)
    assert [len(b) for b in big.buckets()] == [1, 2]


def test_ef_random_block_and_cser_bytes_by_hand():
    work = _work([(8192,)], block=32)
    # random_block 1/8 of 8192 elements in blocks of 32: 32 blocks = 1024 values = 4096 B + the 4-byte flag;
    # W = 4 allreduce: 1.5 x 4100 = 6150
    assert by_method.traffic("ef-rb@1/8", work, 4).wire_bytes_mean() == 6150
    # CSER (1/8, full reset, H = 4): 6150 per step + every 4 steps an allreduce of all 8192 parameters
    # (32768 B, no flag: 1.5 x = 49152): mean 6150 + 49152 / 4 = 18438
    tr = by_method.traffic("cser@1/8:1:4", work, 4)
    assert tr.regular.wire_bytes(4) == 6150 and tr.event.wire_bytes(4) == 6150 + 49152
    assert tr.period == 4 and tr.wire_bytes_mean() == 18438
    assert tr.events_in(4, 20) == 4  # steps 7, 11, 15, 19


def test_topk_powersgd_and_model_sync_bytes_by_hand():
    # top-k 1/64 of 6400: k = 100, values + int32 indices = 800 B + flag 4; W = 4 allgather: 3 x 804
    assert by_method.traffic("ef-topk@1/64", _work([(6400,)]), 4).wire_bytes_mean() == 2412
    # PowerSGD rank 1 on a 64 x 32 weight + 32-element bias (one bucket): bias dense (128 B), P 64 x 1
    # (256 B), Q 32 x 1 (128 B): three allreduces, at W = 2 each sends its payload
    tr = by_method.traffic("powersgd", _work([(64, 32), (32,)]), 2)
    assert [c.nbytes for c in tr.regular.collectives] == [128, 256, 128] and tr.wire_bytes_mean() == 512
    # QPRSGD (QSGD s=15 blocks of 64) every 4 steps on 6400 elements: sign bits 800 + 4-bit levels 3200
    # + 100 norms 400 = 4400 + flag 4; W = 4 allgather 3 x 4404 = 13212, every 4th step, plus the hook's
    # 4-byte flag allreduce of that step (ring: 2 x 3/4 x 4 = 6 B)
    q = by_method.traffic("qprsgd", _work([(6400,)]), 4)
    assert q.regular.wire_bytes(4) == 0 and q.event.wire_bytes(4) == 13218 and q.wire_bytes_mean() == 3304.5


@pytest.mark.parametrize("n,world,segments,block", [(1000, 4, [0, 300, 1000], None), (1001, 3, [0, 1001], None),
                                                    (5000, 8, None, 64), (7, 4, [0, 7], None), (100, 2, None, 16)])
def test_dist_ef_chunks_equal_the_algorithms_own_plan(n, world, segments, block):
    from cser_hooks.algorithms.dist_ef_sgdm import chunk_plan

    assert collectives.chunk_nbytes(n, world, segments, block) == chunk_plan(n, world, segments, block).nbytes


def test_compression_cost_by_hand():
    c = plan.Costs({op: ((1.0, 2.0), (64.0, 1.0)) for op in costs.OPS}, "test")
    # 4 MB at the nearest size (1 MiB row: 2 GB/s): 2 passes -> 4 ms; 100 MB: the 64 MiB row, 1 GB/s
    assert c.seconds("copy", 4e6, 2.0) == pytest.approx(4e-3)
    assert c.seconds("copy", 100e6) == pytest.approx(0.1)
    assert plan.Costs(c.rates, "test", slowdown=4).seconds("copy", 4e6, 2.0) == pytest.approx(16e-3)
    # fp16 hook on 1M elements (4 MB): cast and cast back at 2 GB/s = 4 ms, plus its host time per bucket
    # (0.77 ms: docs/bench-default, rank 0's compress_seconds per step of the fp16 row)
    (_, fp16) = plan.estimate(_work([(1_000_000,)]), BARE_100M, 4, methods=["fp16"], costs=c)
    assert fp16.compress_s == pytest.approx(4e-3 + 0.77e-3)


def test_qsgd_cost_uses_the_row_of_its_block_size():
    # QSGD rows were measured at blocks of 4096 and of 64 (a norm and a division per block); a compressor
    # takes the nearer one on a log scale (the boundary: 512)
    from cser_hooks.compressors import get_compressor

    n = 1 << 20
    for block, row in ((64, "qsgd_ef_64"), (512, "qsgd_ef_64"), (513, "qsgd_ef"), (4096, "qsgd_ef")):
        enc = costs.encode_passes(get_compressor(f"qsgd:s=15,block={block}"), n)
        dec = costs.decode_passes(get_compressor(f"qsgd:s=15,block={block}"), n)
        assert enc == ((row, 1.0),) and dec == ((row.replace("_ef", "_dec"), 1.0),), block
    # inside a composition the quantizer's passes scale with the kept share (top-k 1/16)
    comp = get_compressor("top_k:ratio=1/16 + qsgd:s=15,block=64")
    assert costs.encode_passes(comp, n) == (("topk_select", 1.0), ("qsgd_ef_64", 1 / 16))


def test_sign_cost_uses_the_row_of_its_block_size():
    # sign rows were measured at blocks of 64, 4096 and 2^20 (one per tensor); nearest on a log scale
    from cser_hooks.compressors import get_compressor

    n = 1 << 20
    for spec, enc, dec in (("sign_blockwise:block=64", "sign_ef_64", "sign_dec_64"),
                           ("sign_blockwise:block=512", "sign_ef_64", "sign_dec_64"),
                           ("sign_blockwise:block=513", "sign_ef_4096", "sign_dec"),
                           ("sign_blockwise:block=65536", "sign_ef_4096", "sign_dec"),
                           ("sign_blockwise:block=65537", "sign_ef_tensor", "sign_dec"),
                           ("sign_blockwise", "sign_ef_tensor", "sign_dec")):
        comp = get_compressor(spec)
        assert costs.encode_passes(comp, n) == ((enc, 1.0),) and costs.decode_passes(comp, n) == ((dec, 1.0),), spec
    # dist-EF-SGDM's step takes the same rows: two decodes of its block size
    work = _work([(1 << 16,)])
    ops = {op for op, _m, _n in by_method.traffic("dist-ef-sgdm", work, 4).regular.work}
    assert {"sign_ef_64", "sign_dec_64"} <= ops and not ops & {"sign_ef_4096", "sign_ef_tensor", "sign_dec"}


def test_builtin_kernel_rates_are_the_committed_report():
    parsed = costs.parse_report((REPO / "docs/bench-kernels/report.md").read_text())
    assert parsed == costs.BUILTIN
    with pytest.raises(ValueError, match="unknown kernel op"):
        costs.load().with_overrides({"nope": 1.0})


def test_methods_are_the_bench_names():
    # every preset of the benchmark has a traffic model (or a clear error), dense first in estimate()
    work = _work([(512, 512), (512,)])
    for name in bench_methods.PRESETS:
        assert by_method.traffic(name, work, 4).method == name
    preds = plan.estimate(work, "1gbit", 4, compute_s=0.01, methods=["cser-32", "ef-rb"])
    assert [p.method for p in preds] == ["dense", "cser-32", "ef-rb"]
    with pytest.raises(SystemExit, match="unknown method"):
        by_method.traffic("no-such-method", work, 4)


def test_gain_line_by_hand():
    stats = {"step": 10, "wire_bytes_total": 10e6, "dense_wire_bytes_total": 100e6, "compress_seconds": 0.1,
             "collectives_total": 10}
    # per step: wire 1 MB / 12.5e6 B/s = 80 ms, compress 10 ms, compute 50 ms -> 140 ms; dense 10 MB: 850 ms
    line = plan.gain_line(stats, BARE_100M, 0.05)
    assert "140.0 ms/step vs dense 850.0 ms (6.07x" in line and "100 Mbit/s" in line
    # with W = 4 and 1 ms latency: + 1 collective x 6 hops x 1 ms on both sides
    line = plan.gain_line(stats, plan.Link(100e6, 1e-3, 0.0), 0.05, world_size=4)
    assert "146.0 ms/step vs dense 856.0 ms" in line
    # + σ = 5 ms per communicating step (sync_s): one collective per step on both sides
    line = plan.gain_line(stats, plan.Link(100e6, 1e-3, 0.0, sync_s=5e-3), 0.05, world_size=4)
    assert "151.0 ms/step vs dense 861.0 ms" in line
    # a method that communicates every 4th step pays a quarter of σ per step on average
    sparse = {**stats, "collectives_total": 2.5}
    line = plan.gain_line(sparse, plan.Link(100e6, 0.0, 0.0, sync_s=4e-3), 0.05)
    assert "141.0 ms/step vs dense 854.0 ms" in line


# -- predicted bytes == stats() of real gloo ranks ---------------------------------------------------

STEPS = 7          # step 0 is the warm-up (dense); 1..6 hold two CSER resets (after steps 2 and 5)
CAP = 2097 / 2 ** 20  # two buckets: [out.bias, out.weight], [hidden.bias, hidden.weight]
GLOO_METHODS = ("dense", "ef-rb@1/8", "cser@1/8:1/2:3", "ef-topk@1/16", "dist-ef-sgdm@16")


def _model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def _gloo_main(rank, world):
    out = {}
    for name in GLOO_METHODS:
        ddp = torch.nn.parallel.DistributedDataParallel(_model(), bucket_cap_mb=CAP)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
        state, hook = bench_methods.get(name).make(None, opt, seed=0, block=8)
        if hook is not None:
            ddp.register_comm_hook(state, hook)
        per_step = []
        for s in range(STEPS):
            g = torch.Generator().manual_seed(100 * rank + s)
            x, y = torch.randn(8, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
            st = state.stats()
            per_step.append((st["wire_bytes_last_step"], st["dense_wire_bytes_last_step"]))
        buckets = sorted(seg[-1] for seg in getattr(state, "seg_cache", {}).values())
        out[name] = {"per_step": per_step, "buckets": buckets}
    return out


@pytest.mark.timeout(200)
def test_predicted_wire_bytes_equal_stats_of_two_gloo_ranks():
    world = 2
    results = run_ranks(_gloo_main, world, timeout=150)
    work = plan.from_module(_model(), 0.01, bucket_cap_mb=CAP, block=8)
    assert sorted(sum(torch.Size(s).numel() for s in b) for b in work.buckets()) == [650, 2112]
    for rank, res in enumerate(results):
        for name in GLOO_METHODS:
            tr = by_method.traffic(name, work, world)
            measured = [w for w, _ in res[name]["per_step"]][1:]  # after the warm-up step
            if res[name]["buckets"]:
                assert res[name]["buckets"] == [650, 2112], name  # the state's buckets are the planner's
            # the window holds whole periods (6 steps, H = 3 for CSER): its mean is the amortised figure
            assert sum(measured) == pytest.approx(len(measured) * tr.wire_bytes_mean(rank), abs=0), (name, rank)
            assert measured[0] == tr.regular.wire_bytes(world, rank), (name, rank)  # step 1: no reset
            assert res[name]["per_step"][-1][1] == tr.dense_wire, name
    cser = results[0]["cser@1/8:1/2:3"]["per_step"]
    assert cser[3][0] > cser[2][0]  # the reset after step 2 is counted in step 3


# -- the CLI ----------------------------------------------------------------------------------------

def test_help_lists_every_input():
    out = subprocess.run([sys.executable, "-m", "cser_hooks.plan", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for flag in ("--model", "--params", "--buckets", "--bucket-cap-mb", "--world-size", "--bandwidth", "--latency",
                 "--sync", "--overhead", "--compute-ms", "--backward-share", "--methods", "--block", "--kernel-report",
                 "--rate", "--compress-slowdown", "--rank", "--extrapolate", "cnn", "mlp-wide", "100mbit"):
        assert flag in out.stdout, flag


def test_cli_recommends_dense_for_a_tiny_model_on_a_fast_link(capsys):
    assert cli.main(["--model", "cnn", "--bandwidth", "10gbit", "--compute-ms", "5"]) == 0
    out = capsys.readouterr().out
    assert "recommendation: dense allreduce is faster here" in out and "MODELLED" in out
    assert "| cser-32 |" in out and "| dense |" in out


def test_cli_recommends_compression_for_a_large_model_on_a_slow_link(capsys):
    assert cli.main(["--params", "100000000", "-W", "16", "--bandwidth", "100mbit", "--compute-ms", "200",
                     "--methods", "fp16,cser-32,ef-rb", "--extrapolate"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("recommendation:"))
    assert "dense allreduce is faster" not in line and ("cser-32" in line or "ef-rb" in line)
    assert "MODELLED, not measured" in out and "| 1024 |" in out


def test_cli_bucket_sizes_and_rate_override(capsys):
    assert cli.main(["--buckets", "1000000,500000", "-W", "8", "--bandwidth", "1gbit", "--compute-ms", "20",
                     "--methods", "ef-topk", "--rate", "topk_select=5"]) == 0
    out = capsys.readouterr().out
    assert "1,500,000 parameters" in out and "topk_select=5 GB/s" in out
    with pytest.raises(SystemExit):
        cli.main(["--buckets", "1000", "--compute-ms", "1", "--rate", "bogus=1"])
