"""A peer that dies or stops answering: the surviving rank says who, when and why, and never waits long.

* killed rank: rank 1 exits (``os._exit``) before step 5; rank 0's backward fails with an error that
  names its rank, the step and the bucket, and the likely cause (another rank exited), before the
  backend's own text.
* frozen rank: rank 1 stops itself (SIGSTOP) before step 5; with ``progress_timeout=3`` rank 0
  reports the collective it waited for (rank, step, bucket) on stderr and exits with code 75 within
  a few seconds, long before the process group's timeout. Without the knob nothing watches
  (the default), which the unit test of the knob's validation covers.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from harness import RankError, run_ranks

pytestmark = [pytest.mark.timeout(300)]
FAIL_AT = 5


def _train(rank, ws, how, progress_timeout=None):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from cser_hooks.ddp import CSERState, cser_hook

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    kw = {} if progress_timeout is None else {"progress_timeout": progress_timeout}
    st = CSERState(c1="random_block:ratio=1/8,block=16", period=4, optimizer=opt, **kw)
    ddp.register_comm_hook(st, cser_hook)
    for s in range(12):
        if s == FAIL_AT and rank == 1:
            if how == "kill":
                os._exit(3)
            os.kill(os.getpid(), signal.SIGSTOP)
        opt.zero_grad()
        x = torch.randn(16, 20)
        torch.nn.functional.cross_entropy(ddp(x), torch.randint(0, 10, (16,))).backward()
        opt.step()
    return st.step


def test_a_killed_rank_gives_an_error_naming_rank_step_and_cause():
    with pytest.raises(RankError) as info:
        run_ranks(_train, 2, "kill", timeout=60)
    text = str(info.value)
    assert 0 in info.value.failed_ranks and 1 in info.value.failed_ranks
    assert f"cser_hooks: rank 0 of 2, step {FAIL_AT}, bucket 0 (CSERState): a collective failed" in text, text
    assert "another rank exited" in text


def test_a_frozen_rank_is_reported_within_the_progress_timeout(capfd):
    t0 = time.monotonic()
    with pytest.raises(RankError) as info:
        run_ranks(_train, 2, "freeze", 3.0, timeout=90)
    waited = time.monotonic() - t0
    err = capfd.readouterr().err
    assert "rank 0: exited with code 75" in str(info.value).replace("the process exited", "exited"), str(info.value)
    assert f"cser_hooks: rank 0: the collective of step {FAIL_AT}, bucket 0 has not completed after" in err, err
    assert "progress_timeout=3 s" in err and "a peer rank is not answering" in err
    assert waited < 60, f"took {waited:.0f} s: the process group's timeout, not the progress check, ended it"


@pytest.mark.parametrize("bad", [0, -1.0, "3", True])
def test_progress_timeout_rejects_non_positive_or_non_numbers(bad):
    from cser_hooks.progress import ProgressWatch

    with pytest.raises(ValueError, match="progress_timeout must be a number of seconds > 0"):
        ProgressWatch(bad, 0)
