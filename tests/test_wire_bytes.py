"""Wire accounting (issue 13): the ring / pairwise wire model and what ``stats()`` reports with it.

The expected figures are written out here by hand (a table per world size, and a step-by-step
simulation of the ring schedules), not computed with cser_hooks/wire.py, so a wrong formula there
fails. The multi-process test runs real gloo ranks (tests/harness.py) and checks ``stats()`` against
the payload sizes the compressors document, pushed through those hand-written formulas.
"""
from __future__ import annotations

import pickle

import pytest
import torch

from cser_hooks import wire
from harness import run_ranks

N = 4096  # bytes per rank, divisible by 2, 4 and 8

# bytes one rank sends, by world size: ring allreduce 2(W-1)/W * N, ring allgather (W-1) * N
RING_ALLREDUCE = {1: 0, 2: 4096, 4: 6144, 8: 7168}
RING_ALLGATHER = {1: 0, 2: 4096, 4: 12288, 8: 28672}


def _simulated_ring_allreduce(n: int, world: int, rank: int) -> int:
    """Bytes ``rank`` sends in a reduce-scatter + allgather ring over n bytes cut into W chunks."""
    chunk = [n // world + (1 if c < n % world else 0) for c in range(world)]
    sent = 0
    for step in range(world - 1):  # reduce-scatter: at step s rank r sends chunk (r - s) mod W
        sent += chunk[(rank - step) % world]
    for step in range(world - 1):  # allgather of the reduced chunks: rank r starts with chunk (r + 1) mod W
        sent += chunk[(rank + 1 - step) % world]
    return sent


def _simulated_ring_allgather(sizes: list[int], rank: int) -> int:
    """Bytes ``rank`` sends in a ring allgather: at step s it forwards block (r - s) mod W."""
    world = len(sizes)
    return sum(sizes[(rank - step) % world] for step in range(world - 1))


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_ring_formulas_against_hand_table_and_simulation(world):
    assert wire.allreduce_bytes(N, world) == RING_ALLREDUCE[world]
    assert wire.allgather_bytes(N, world) == RING_ALLGATHER[world]
    assert wire.dense_allreduce_bytes(N, world) == RING_ALLREDUCE[world]
    for rank in range(world):
        assert _simulated_ring_allreduce(N, world, rank) == RING_ALLREDUCE[world]
        assert _simulated_ring_allgather([N] * world, rank) == RING_ALLGATHER[world]
    # W not dividing n: the ranks' shares differ by a chunk boundary; the model is their mean, floored
    n = 1001
    shares = [_simulated_ring_allreduce(n, world, r) for r in range(world)]
    assert wire.allreduce_bytes(n, world) == sum(shares) // world
    assert max(shares) - min(shares) <= 2 * (world - 1)
    assert 0 <= sum(shares) / world - wire.allreduce_bytes(n, world) < 1


@pytest.mark.parametrize("world", [2, 4, 8])
def test_pairwise_formulas(world):
    sizes = [100 * (r + 1) for r in range(world)]  # rank r contributes / addresses 100 (r + 1) bytes
    total = sum(sizes)
    for rank in range(world):
        # allgather_v: this rank's block goes to each of the W - 1 others
        assert wire.allgather_v_bytes(sizes, rank) == (world - 1) * 100 * (rank + 1)
        # all_to_all: everything but the chunk addressed to itself
        assert wire.all_to_all_bytes(sizes, rank) == total - 100 * (rank + 1)
    assert wire.allgather_v_bytes([N] * world, 0) == RING_ALLGATHER[world]  # equal sizes: the ring's figure
    assert wire.p2p_bytes([(N, 1), (N, world - 1)], 0) == 2 * N
    assert wire.p2p_bytes([(N, 0)], 0) == 0  # to itself: local
    assert wire.object_allgather_bytes(92, world) == (world - 1) * 100  # sizes (int64) + the pickle


def test_world_of_one_sends_nothing():
    assert wire.allreduce_bytes(N, 1) == wire.allgather_bytes(N, 1) == 0
    assert wire.allgather_v_bytes([N], 0) == wire.all_to_all_bytes([N], 0) == 0
    assert wire.object_allgather_bytes(50, 1) == 0
    with pytest.raises(ValueError):
        wire.allreduce_bytes(N, 0)


# --------------------------------------------------------------------------------------------
# real gloo ranks: stats() against the formulas applied to the documented payload sizes

STEPS = 4


def _model():
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def _run_ef(rank, compressor):
    from cser_hooks.ddp import EFState, ef_hook

    ddp = torch.nn.parallel.DistributedDataParallel(_model())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    st = EFState(None, compressor, seed=3)
    ddp.register_comm_hook(st, ef_hook)
    per_step = []
    for s in range(STEPS):
        g = torch.Generator().manual_seed(1000 * rank + s)
        x, y = torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        per_step.append(st.stats())
    return {"per_step": per_step, "buckets": {k: seg[-1] for k, seg in st.seg_cache.items()},
            "config_pickle": len(pickle.dumps(st.config()))}


def _direct_collectives(rank, world):
    """Each collective kind of TorchDistCommunicator once, on known sizes (fp32: 4 bytes an element)."""
    from cser_hooks.comm import TorchDistCommunicator

    comm = TorchDistCommunicator()
    comm.allreduce_sum_async(torch.ones(64)).wait()                               # 256 B
    comm.allgather_async(torch.ones(32)).wait()                                   # 128 B
    comm.allgather_v_async(torch.ones(8 * (rank + 1)), [8 * (r + 1) for r in range(world)]).wait()
    comm.all_to_all_async([torch.ones(4 * (j + 1)) for j in range(world)], [4 * (rank + 1)] * world).wait()
    right, left = (rank + 1) % world, (rank - 1) % world
    comm.sendrecv([(torch.ones(16), right)], [(16, torch.float32, left)])          # 64 B
    return dict(comm.wire_by), dict(comm.handed_by), comm.wire_bytes, comm.bytes_sent


def _ranks_main(rank, world):
    return {"topk": _run_ef(rank, "top_k:ratio=1/16"), "rb": _run_ef(rank, "random_block:ratio=1/16,block=8"),
            "direct": _direct_collectives(rank, world)}


@pytest.mark.timeout(150)
def test_stats_wire_bytes_on_four_gloo_ranks():
    from cser_hooks.compressors import get_compressor

    world = 4
    results = run_ranks(_ranks_main, world, timeout=120)
    f32 = torch.float32
    for rank, res in enumerate(results):
        for name, spec, gather in (("topk", "top_k:ratio=1/16", True),
                                   ("rb", "random_block:ratio=1/16,block=8", False)):
            r = res[name]
            numels = list(r["buckets"].values())
            comp = get_compressor(spec)
            dense = sum(4 * n for n in numels)
            payloads = [comp.wire_bytes(n, f32) + 4 for n in numels]  # + the 4-byte non-finite flag
            # by hand, W = 4: allgather sends 3x the payload, allreduce 2*3/4 = 1.5x
            wire_step = sum(3 * p for p in payloads) if gather else sum(3 * p // 2 for p in payloads)
            s0, last = r["per_step"][0], r["per_step"][-1]
            # step 0: warm-up, a dense allreduce
            assert s0["bytes_sent_last_step"] == dense and s0["wire_bytes_last_step"] == 3 * dense // 2
            assert s0["wire_bytes_by_collective"] == {"allreduce": 3 * dense // 2}
            for s in r["per_step"][1:]:
                assert s["bytes_sent_last_step"] == sum(payloads), (name, rank)
                assert s["wire_bytes_last_step"] == wire_step, (name, rank)
                assert s["dense_wire_bytes_last_step"] == 3 * dense // 2
            kind = "allgather" if gather else "allreduce"
            compressed = (STEPS - 1) * wire_step
            assert last["wire_bytes_total"] == 3 * dense // 2 + compressed
            assert last["dense_wire_bytes_total"] == STEPS * 3 * dense // 2
            want_by = {"allreduce": 3 * dense // 2 + compressed} if not gather else \
                {"allreduce": 3 * dense // 2, "allgather": compressed}
            assert last["wire_bytes_by_collective"] == want_by and kind in want_by
            assert last["bytes_sent_by_collective"][kind] == (STEPS - 1) * sum(payloads) + (0 if gather else dense)
            assert last["wire_compression_ratio"] == pytest.approx(last["wire_bytes_total"] /
                                                                   last["dense_wire_bytes_total"])
            # the one-time agreement: apart, (W-1) * (8-byte size + the pickled config)
            assert last["agreement_bytes"] == 3 * (8 + r["config_pickle"]) and last["agreement_collectives"] == 1
            assert last["agreement_bytes_handed"] == 8 + r["config_pickle"]
            # per compressed step: the handed ratio flatters the allgather method by W/2 = 2, not the allreduce one
            handed = last["bytes_sent_last_step"] / last["dense_bytes_last_step"]
            on_wire = last["wire_bytes_last_step"] / last["dense_wire_bytes_last_step"]
            assert on_wire / handed == pytest.approx(2.0 if gather else 1.0, rel=1e-6), name
        wire_by, handed_by, wire_sum, handed_sum = res["direct"]
        assert handed_by == {"allreduce": 256, "allgather": 128, "allgather_v": 32 * (rank + 1),
                             "all_to_all": 16 * (1 + 2 + 3 + 4), "sendrecv": 64}
        assert wire_by == {"allreduce": 384, "allgather": 384, "allgather_v": 3 * 32 * (rank + 1),
                           "all_to_all": 16 * (1 + 2 + 3 + 4) - 16 * (rank + 1), "sendrecv": 64}
        assert wire_sum == sum(wire_by.values()) and handed_sum == sum(handed_by.values())
    # over the steady-state window (after the warm-up step, as the bench counts), top-k's ratio on the wire is
    # W/2 = 2 times its handed ratio: "31.7x" handed is ~16x on the wire at 4 ranks
    first, top = results[0]["topk"]["per_step"][0], results[0]["topk"]["per_step"][-1]
    window = lambda k, d: (top[k] - first[k]) / (top[d] - first[d])  # noqa: E731
    assert window("wire_bytes_total", "dense_wire_bytes_total") == \
        pytest.approx(2 * window("bytes_sent_total", "dense_bytes_total"), rel=1e-9)


# --------------------------------------------------------------------------------------------
# the bench: meters and report use the same model

def test_bench_dense_meter_and_report_use_wire_bytes():
    from cser_hooks.bench import meters, report

    model = torch.nn.Linear(10, 6)  # 66 parameters, 264 bytes
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    meter = meters.NoHookMeter(opt, world=4)
    for _ in range(3):
        opt.step()
    st = meter.stats()
    assert st["bytes_sent_last_step"] == 264 and st["wire_bytes_last_step"] == 396  # 1.5 x 264
    assert st["dense_wire_bytes_total"] == st["wire_bytes_total"] == 3 * 396 and st["wire_compression_ratio"] == 1

    def fake(rank, handed, wire_step):
        steps = 10
        stats = {"bytes_sent_total": handed * steps, "dense_bytes_last_step": 8000, "step": steps,
                 "wire_bytes_total": wire_step * steps, "dense_wire_bytes_total": 12000 * steps,
                 "compress_seconds": 0.01, "comm_seconds": 0.2}
        start = {k: (v * 2 // steps if k.endswith("_total") else v) for k, v in stats.items()}
        return {"rank": rank, "steps": steps, "train_time": 1.0, "curve": [{"step": 0, "time": 0, "acc": 0.1}],
                "acc_final": 0.1, "acc_avg": 0.1, "stats_window_start": start, "stats_end": stats,
                "window_start": 2, "veth_tx_window": 8 * wire_step * 1.05, "params": 2000, "protocol": "allgather"}

    # an allgather method at W = 4: handed 250 B/step (32x), on the wire 3 x 250 = 750 (16x of 1.5 x dense)
    row = report.summarize("ag", "d", [fake(0, 250, 750), fake(1, 250, 750)], None, 4)
    assert row["handed_ratio"] == 32 and row["wire_ratio"] == 16
    assert row["wire_model_bytes_per_step"] == 750 and row["veth_vs_model"] == pytest.approx(0.05)
    table = report.main_table([row])
    assert "wire ratio (ring model)" in table.splitlines()[0]
    assert table.splitlines()[2].split("|")[9:11] == [" 32.0 ", " 16.0 "]
    assert "| ag | 0.25 | 0.75 | 0.79 | +5.0 % |" in report.link_table([row])
