"""Hugging Face Accelerate adopts CSER in one line after ``accelerator.prepare``: a real 2-process job.

tests/trainer_jobs/accelerate_job.py runs under torchrun (2 CPU processes, gloo: ``accelerate launch
--cpu`` starts several processes only through mpirun) on sklearn's digits with a small MLP, gradient
accumulation over 2 micro-batches (``accelerator.accumulate``). Checked: accuracy within 2 points of
the same job without the hook, the hook active (fewer bytes than dense; replicas bitwise equal right
after each reset and apart between them), ``save_state``/``load_state`` with
``register_for_checkpointing(RankLocalCheckpoint(...))`` resuming bitwise on every rank, and the README's
block. Skipped when accelerate is missing, failed instead under CI=true (trainer_jobs/launch.py).
"""
from __future__ import annotations

import json
import sys
import textwrap

import pytest

from trainer_jobs.launch import JOBS, REPO, require, run_job

JOB = JOBS / "accelerate_job.py"
PERIOD, STEPS, SAVE_STEP = 8, 60, 10  # CSER's H in the job; 6 epochs of 10 optimizer steps; saved after epoch 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    require("accelerate", "accelerate")
    work = tmp_path_factory.mktemp("accelerate")
    run_job([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(JOB),
             str(work / "out.json"), str(work), "plain", "cser", "resume"], work, timeout=120)
    return work, json.loads((work / "out.json").read_text())


def test_one_line_after_prepare_trains_like_plain_ddp(runs):
    _, r = runs
    assert r["plain"]["accuracy"] > 90, r["plain"]
    assert abs(r["cser"]["accuracy"] - r["plain"]["accuracy"]) <= 2, (r["cser"]["accuracy"], r["plain"]["accuracy"])
    stats = r["cser"]["stats"]
    assert 0 < stats["bytes_sent_total"] < 0.4 * stats["dense_bytes_total"], stats
    assert r["cser"]["state_step"] == r["cser"]["optimizer_steps"] == STEPS  # no_sync micro-batches: no hook call
    for step, equal in r["cser"]["equal_after_step"]:
        assert equal == (step % PERIOD == 0 or step == 1), f"after step {step}"  # step 1: dense warm-up
    assert all(equal for _, equal in r["plain"]["equal_after_step"])


def test_save_state_load_state_is_bitwise(runs):
    import torch

    work, r = runs
    assert SAVE_STEP % PERIOD != 0 and r["resume"]["optimizer_steps"] == STEPS - SAVE_STEP
    assert r["cser"]["digests"][0] != r["cser"]["digests"][1]  # the job ends mid-period: the ranks differ
    assert r["resume"]["digests"] == r["cser"]["digests"]  # and each resumed rank equals its uninterrupted self
    assert r["resume"]["state_step"] == STEPS
    # Accelerate writes custom objects from the main process only: the one file carries every rank
    assert sorted(p.name for p in (work / "state").glob("custom_checkpoint_*")) == ["custom_checkpoint_0.pkl"]
    entry = torch.load(work / "state" / "custom_checkpoint_0.pkl", map_location="cpu", weights_only=False)
    assert entry["world_size"] == 2 and [e["state"]["rank"] for e in entry["ranks"]] == [0, 1]
    assert entry["ranks"][0]["model"] is None and entry["ranks"][1]["model"] is not None


def test_readme_has_the_block_the_job_runs():
    text = JOB.read_text()
    begin, end = "# README (Accelerate) begins\n", "# README (Accelerate) ends"
    block = textwrap.dedent(text[text.index(begin) + len(begin):text.index(end)]).rstrip()
    assert "register_comm_hook" in block and block in (REPO / "README.md").read_text()
