"""The test foundation itself: run_ranks on real gloo groups, the CUDA simulator, PTX compilation.

run_ranks is what every multi-process test relies on to turn the failures of docs/algorithms.md §8
(a rank raising, stalling in a collective nobody else joins, or dying) into a prompt test failure
naming the rank, so each of those is provoked here for real.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from harness import STARTUP_TIMEOUT, RankError, run_ranks

# --------------------------------------------------------------------------------------------------
# rank functions (module level: the spawned ranks import them by name)


def allreduce_rank(rank, world_size, n):
    t = torch.arange(n, dtype=torch.float64) * (rank + 1)
    dist.all_reduce(t)
    return {"rank": rank, "world": dist.get_world_size(), "sum": t, "threads": torch.get_num_threads()}


def raising_rank(rank, world_size, bad_rank):
    if rank == bad_rank:
        raise ValueError(f"deliberate failure on rank {rank}")
    t = torch.ones(3)
    dist.all_reduce(t)  # the others wait here for the rank that raised
    return t


def absent_rank(rank, world_size, sleeper):
    if rank == sleeper:
        time.sleep(3600)  # never enters the collective
    t = torch.ones(3)
    dist.all_reduce(t)
    return t


def exiting_rank(rank, world_size, victim):
    if rank == victim:
        os._exit(3)
    return rank


# --------------------------------------------------------------------------------------------------
# run_ranks


def test_allreduce_four_ranks():
    n = 5
    out = run_ranks(allreduce_rank, 4, n, timeout=120)
    expected = torch.arange(n, dtype=torch.float64) * (1 + 2 + 3 + 4)
    assert [o["rank"] for o in out] == [0, 1, 2, 3]
    for o in out:
        assert o["world"] == 4
        assert o["threads"] == 1
        torch.testing.assert_close(o["sum"], expected, rtol=0, atol=0)


def test_rank_exception_is_reported_with_rank_and_traceback():
    timeout = 60
    with pytest.raises(RankError) as info:
        run_ranks(raising_rank, 3, 2, timeout=timeout)
    msg = str(info.value)
    assert info.value.run_seconds is not None and info.value.run_seconds < timeout, msg
    assert 2 in info.value.failed_ranks
    assert "rank 2 raised" in msg
    assert "Traceback (most recent call last)" in msg
    assert "ValueError: deliberate failure on rank 2" in msg
    assert "raising_rank" in msg  # the frame of the rank function is in the traceback


def test_rank_that_skips_a_collective_fails_instead_of_hanging():
    timeout = 20
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        run_ranks(absent_rank, 3, 1, timeout=timeout)
    elapsed = time.monotonic() - start
    err = info.value
    msg = str(err)
    assert elapsed < STARTUP_TIMEOUT + timeout + 10, f"run_ranks took {elapsed:.1f} s"
    assert err.run_seconds is not None and err.run_seconds <= timeout + 1, msg
    assert err.running_ranks == [1], msg
    assert "ranks still running (killed by the harness): [1]" in msg
    # The others hit the process group's own timeout inside all_reduce and reported it.
    assert set(err.failed_ranks) == {0, 2}, msg
    assert "all_reduce" in msg
    # ... and rank 1's stack at kill time shows where it was.
    assert "--- rank 1 (still running) Python stacks at kill time ---" in msg
    assert "absent_rank" in msg.split("--- rank 1 (still running)")[1]


def test_rank_that_exits_fails():
    with pytest.raises(RankError) as info:
        run_ranks(exiting_rank, 2, 1, timeout=60)
    msg = str(info.value)
    assert info.value.failed_ranks == [1]
    assert "exited with code 3" in msg
    assert "--- rank 1 ---" in msg


def test_local_function_is_rejected_with_a_clear_error():
    def local(rank, world_size):
        return rank

    with pytest.raises(TypeError, match="module-level function"):
        run_ranks(local, 2)


# --------------------------------------------------------------------------------------------------
# the tiny Numba CUDA kernel of tests/saxpy_kernel.py: simulator and real PTX


@pytest.mark.cudasim
def test_saxpy_in_cuda_simulator():
    from numba import cuda
    from numba.cuda.core import config

    from saxpy_kernel import saxpy

    assert config.ENABLE_CUDASIM, "this test must run in the simulator process (pytest -m cudasim)"
    kernel = cuda.jit(saxpy)
    rng = np.random.default_rng(0)
    n = 1000
    x = rng.standard_normal(n).astype(np.float32)
    y = rng.standard_normal(n).astype(np.float32)
    out = np.full(n, np.nan, dtype=np.float32)
    threads = 128
    kernel[(n + threads - 1) // threads, threads](out, np.float32(2.5), x, y)
    np.testing.assert_allclose(out, np.float32(2.5) * x + y, rtol=1e-6)


@pytest.mark.ptx
@pytest.mark.parametrize("cc,arch", [((8, 0), "sm_80"), ((8, 0), "sm_90"), ((9, 0), "sm_90")])
def test_saxpy_compiles_to_ptx_without_spills(cc, arch, ptxas):
    from numba import cuda

    from saxpy_kernel import SIGNATURE, saxpy

    ptx, _ = cuda.compile_ptx(saxpy, SIGNATURE, cc=cc)
    assert f".target sm_{cc[0]}{cc[1]}" in ptx
    report = ptxas(ptx, arch=arch)
    assert report.spill_stores == 0 and report.spill_loads == 0, report.text
    assert 0 < report.registers <= 255
