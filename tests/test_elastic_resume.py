"""torchrun at 2 ranks, then at 3 from the same checkpoint: the world-size policy of every state.

``on_world_size_change="raise"`` (the default): every rank of the grown job fails at load_state_dict
with the error that names both sizes and the knob. ``"reset"``: every rank warns, drops its per-rank
tensors, continues from the checkpoint's step, trains (finite loss), and the replicas stay equal
(EF: every rank applies the same average; CSER: a reset at the last step's period boundary).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

JOB = Path(__file__).parent / "jobs" / "elastic_job.py"
STEPS = 8


def torchrun(n: int, *args, timeout: float = 120) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", str(JOB),
           *map(str, args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def results(folder: Path, phase: str, n: int) -> list[dict]:
    return [json.loads((folder / f"result_{phase}_rank{r}.json").read_text()) for r in range(n)]


@pytest.fixture(scope="module", params=["ef", "cser"])
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"elastic_{request.param}")
    torchrun(2, "save", folder, request.param)
    return request.param, folder


@pytest.mark.timeout(300)
def test_raise_policy_fails_every_rank_with_the_fix(checkpoint):
    algo, folder = checkpoint
    torchrun(3, "resume", folder, algo, "raise")
    for r in results(folder, "resume", 3):
        err = r.get("error", "")
        assert "world size 2" in err and "3 ranks" in err and "on_world_size_change='reset'" in err, r


@pytest.mark.timeout(300)
def test_reset_policy_warns_drops_and_continues(checkpoint):
    algo, folder = checkpoint
    torchrun(3, "resume", folder, algo, "reset")
    saved = results(folder, "save", 2)
    for r in results(folder, "resume", 3):
        assert "error" not in r, r
        assert len(r["warnings"]) == 1 and "dropped" in r["warnings"][0], r["warnings"]
        assert r["step"] == 2 * STEPS  # the step (the masks' RNG position) continued from the checkpoint
        if algo == "ef":  # the residuals were made anew, at this job's sizes (CSER with linear C1 keeps none)
            assert r["state_bytes"] > 0
        assert r["loss"] == r["loss"] and r["loss"] < 10 * saved[0]["loss"] + 1, r
        assert r["replica_spread"] == 0.0, r


def test_readme_has_the_block_the_job_runs():
    import textwrap

    text = JOB.read_text()
    begin, end = "# README (torchrun) begins\n", "# README (torchrun) ends"
    block = textwrap.dedent(text[text.index(begin) + len(begin):text.index(end)]).rstrip()
    assert "load_state_dict" in block and block in (JOB.parents[2] / "README.md").read_text()
