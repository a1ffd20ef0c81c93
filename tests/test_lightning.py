"""PyTorch Lightning adopts CSER with one callback (cser_hooks.lightning.CommHook): real Trainer jobs.

tests/trainer_jobs/lightning_job.py runs ``Trainer(accelerator="cpu", devices=2, strategy="ddp")`` on
sklearn's digits with a small MLP (Lightning starts the second gloo process itself); each fixture is one
launch of several Trainers. Checked: accuracy within 2 points of the same job without the callback, the
hook active (fewer bytes than dense; the replicas bitwise equal right after each reset step and apart
between them), a resume from a mid-period Lightning checkpoint bitwise equal to the uninterrupted run on
every rank, ``accumulate_grad_batches=2``, the errors for misuse, and the README's block.
Skipped when lightning is missing, failed instead under CI=true (trainer_jobs/launch.py).
"""
from __future__ import annotations

import json
import sys
import textwrap

import pytest

from trainer_jobs.launch import JOBS, REPO, require, run_job

JOB = JOBS / "lightning_job.py"
PERIOD, STEPS, CKPT_STEP = 8, 80, 20  # CSER's H in the job; 4 epochs of 20 steps; the epoch-0 checkpoint


def launch(work, runs: list[str], timeout: float = 120) -> dict:
    run_job([sys.executable, str(JOB), str(work / "out.json"), str(work), *runs], work, timeout)
    return json.loads((work / "out.json").read_text())


@pytest.fixture(scope="module")
def main_runs(tmp_path_factory):
    require("lightning.pytorch", "lightning")
    work = tmp_path_factory.mktemp("lightning")
    return work, launch(work, ["plain", "cser", "resume"])


def check_active(run: dict, steps: int) -> None:
    stats = run["stats"]
    assert 0 < stats["bytes_sent_total"] < 0.4 * stats["dense_bytes_total"], stats
    assert run["state_step"] == run["global_step"] == steps
    for step, equal in run["equal_after_step"]:
        if step == 0:
            continue
        reset = step % PERIOD == 0 or step == 1  # step 1: the dense warm-up step
        assert equal == reset, f"after step {step}: replicas {'equal' if equal else 'apart'}"
    assert len(set(run["digests"])) == 1  # the last step is a reset step


def test_one_callback_cser_trains_like_plain_ddp(main_runs):
    _, r = main_runs
    assert r["plain"]["accuracy"] > 90, r["plain"]
    assert abs(r["cser"]["accuracy"] - r["plain"]["accuracy"]) <= 2, (r["cser"]["accuracy"], r["plain"]["accuracy"])
    check_active(r["cser"], STEPS)
    assert all(equal for step, equal in r["plain"]["equal_after_step"])


def test_resume_from_lightning_checkpoint_is_bitwise(main_runs):
    import torch

    work, r = main_runs
    assert r["resume"]["ckpt"].startswith(f"epoch=0-step={CKPT_STEP}") and CKPT_STEP % PERIOD != 0
    assert r["resume"]["digests"] == r["cser"]["digests"]  # every rank, bitwise
    assert r["resume"]["state_step"] == STEPS
    # mid-period, the ranks' models differ: the checkpoint (written by rank 0) carries rank 1's own
    ck = torch.load(work / "ckpt" / r["resume"]["ckpt"], map_location="cpu", weights_only=False)
    entry = ck["callbacks"]["CommHook"]
    assert entry["world_size"] == 2 and [e["state"]["rank"] for e in entry["ranks"]] == [0, 1]
    assert entry["ranks"][0]["model"] is None and entry["ranks"][1]["model"] is not None
    assert entry["ranks"][1]["optimizer"] is not None  # its momentum buffers are its own too


def test_accumulate_grad_batches(tmp_path):
    require("lightning.pytorch", "lightning")
    r = launch(tmp_path, ["plain_acc2", "cser_acc2"])
    assert abs(r["cser_acc2"]["accuracy"] - r["plain_acc2"]["accuracy"]) <= 2, r
    check_active(r["cser_acc2"], STEPS // 2)  # DDP's no_sync: one hook call per optimizer step


def test_fp16_gradscaler_overflows_are_skipped(tmp_path):
    # Lightning's fp16 plugin on the CPU holds a real GradScaler: the callback builds the state with
    # on_nonfinite="auto" ("skip" for CSER), so the injected overflows (rank 1 only) skip the step on
    # both ranks instead of failing the fit, and training goes on
    require("lightning.pytorch", "lightning")
    r = launch(tmp_path, ["plain", "cser_fp16"], timeout=150)["cser_fp16"]
    assert r["on_nonfinite"] == "skip"
    assert r["stats"]["skipped_steps"] == 2, r["stats"]
    # Lightning counts the skipped optimizer steps in global_step; the state ran them again
    assert r["global_step"] == STEPS and r["state_step"] == STEPS - 2, r
    assert r["scale"] == 2.0 ** 16 / 4  # each GradScaler halved its initial scale twice
    assert r["accuracy"] > 88, r["accuracy"]


def test_misuse_fails_with_the_fix(main_runs):
    work, _ = main_runs
    r = launch(work, ["single", "world1"], timeout=90)
    assert "CommHook needs Lightning's DDP strategy" in r["single"]["error"]
    assert "SingleDeviceStrategy" in r["single"]["error"]
    assert "unknown algorithm 'cserr'" in r["single"]["bad_name"] and "'qprsgd'" in r["single"]["bad_name"]
    assert "drop optimizer=" in r["single"]["optimizer_knob"]
    assert "holds the comm-hook state of 2 ranks, this job has 1" in r["world1"]["error"]
    assert "resume with 2 processes" in r["world1"]["error"]


def readme_block(job, name: str) -> str:
    text = job.read_text()
    begin, end = f"# README ({name}) begins\n", f"# README ({name}) ends"
    body = text[text.index(begin) + len(begin):text.index(end)]
    return textwrap.dedent(body).rstrip()


def test_readme_has_the_block_the_job_runs():
    block = readme_block(JOB, "Lightning")
    assert "CommHook(" in block and block in (REPO / "README.md").read_text()
