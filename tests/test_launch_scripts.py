"""The cluster launchers run the example trainings for real: torchrun + DDP hook, horovodrun + Horovod CSER.

Each test starts the launcher exactly as a GPU cluster would (same flags and environment variables),
except for the device: 2 CPU processes on this host over gloo on loopback instead of GPUs over NCCL.
It then checks what an operator reads in the log: the ``cser-start`` line, the periodic
``cser-stats`` lines with the plugin's byte counters, and one ``cser-final`` line per rank.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN_LAUNCHER = ROOT / "scripts" / "launch_torchrun.sh"
HOROVOD_LAUNCHER = ROOT / "scripts" / "launch_horovodrun.sh"
NPROC = 2
STEPS, LOG_EVERY = 40, 10
C1_RATIO = 1 / 64
# The flags a GPU job would pass (the device is picked by the script: --backend auto / hvd.local_rank()).
CSER_FLAGS = ["--method", "cser", "--steps", str(STEPS), "--log-every", str(LOG_EVERY),
              "--c1", "random_block:ratio=1/64", "--c2", "random_block:ratio=1/4", "--period", "16"]
LINE = re.compile(r"(cser-start|cser-stats|cser-final) (\{.*\})\s*$")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def run_launcher(script: Path, flags: list[str], env: dict[str, str], timeout: float = 150):
    """Run a launcher in its own process group; on timeout kill the whole job and fail with its output."""
    proc = subprocess.Popen(["bash", str(script), *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, env=env, cwd=ROOT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{script.name} did not finish within {timeout} s; output:\n{out[-8000:]}")
    return proc.returncode, out


def parse_log(out: str) -> dict[str, list[dict]]:
    records: dict[str, list[dict]] = {"cser-start": [], "cser-stats": [], "cser-final": []}
    for line in out.splitlines():
        m = LINE.search(line)
        if m:
            records[m.group(1)].append(json.loads(m.group(2)))
    return records


def check_training_log(out: str) -> dict[str, list[dict]]:
    """What both launchers must print: start line, stats every LOG_EVERY steps, a final line per rank."""
    rec = parse_log(out)
    assert len(rec["cser-start"]) == 1, out[-4000:]
    assert rec["cser-start"][0]["world_size"] == NPROC
    assert [s["step"] for s in rec["cser-stats"]] == [1, *range(LOG_EVERY, STEPS + 1, LOG_EVERY)], out[-4000:]
    finals = sorted(rec["cser-final"], key=lambda r: r["rank"])
    assert [f["rank"] for f in finals] == list(range(NPROC)), out[-4000:]
    for f in finals:
        assert f["steps"] == STEPS and f["method"] == "cser"
        assert f["last_loss"] < f["first_loss"], f"rank {f['rank']} did not learn: {f}"
    return rec


def check_cser_traffic(stats: dict) -> None:
    """The hook is active with the configured C1: a non-reset step sends ~1/64 of the dense bytes.

    Lower bound: C1 keeps at least ratio * numel values (4 bytes each). Upper bound: 1/32, well below
    anything a dense step (1.0), a reset step (C2 = 1/4) or a mis-read ratio would show; the slack
    covers rounding up to whole blocks (one bucket under DDP; one key per parameter tensor under
    Horovod, where the six tensors of this MLP round up to 0.027 of dense).
    """
    assert stats["algorithm"] == "cser" and stats["step"] >= STEPS
    dense = stats["dense_bytes_last_step"]
    assert dense > 0
    assert C1_RATIO * dense <= stats["bytes_sent_last_step"] < 2 * C1_RATIO * dense, stats
    # warm-up (1 dense step) + resets included, the whole run still sends a small share of dense
    assert stats["bytes_sent_total"] < 0.15 * stats["dense_bytes_total"], stats


def test_torchrun_launcher_trains_with_the_cser_hook():
    env = cpu_env(NNODES="1", NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                  NPROC_PER_NODE=str(NPROC))
    code, out = run_launcher(TORCHRUN_LAUNCHER, CSER_FLAGS, env)
    assert code == 0, out[-8000:]
    rec = check_training_log(out)
    start = rec["cser-start"][0]
    assert (start["backend"], start["device"]) == ("gloo", "cpu")  # on a GPU node: ("nccl", "cuda:<LOCAL_RANK>")
    check_cser_traffic(rec["cser-stats"][-1])
    for final in rec["cser-final"]:
        check_cser_traffic(final["stats"])


def test_launchers_are_executable():
    """The README and the image call them directly (``scripts/launch_torchrun.sh ...``)."""
    for script in (TORCHRUN_LAUNCHER, HOROVOD_LAUNCHER):
        assert os.access(script, os.X_OK), f"{script} lost its executable bit (git update-index --chmod=+x)"
        assert script.read_text(encoding="utf-8").startswith("#!/usr/bin/env bash\n")


@pytest.mark.parametrize("var, value, message", [
    ("NODE_RANK", "1", "NODE_RANK must be in 0..0"),
    ("NPROC_PER_NODE", "two", "NPROC_PER_NODE must be a positive integer"),
])
def test_torchrun_launcher_rejects_a_bad_topology(var, value, message):
    code, out = run_launcher(TORCHRUN_LAUNCHER, ["--steps", "1"], cpu_env(**{var: value}), timeout=30)
    assert code == 2 and message in out, out


@pytest.mark.horovod
def test_horovodrun_launcher_trains_with_horovod_cser():
    code, out = run_launcher(HOROVOD_LAUNCHER, CSER_FLAGS, cpu_env(HOSTS=f"localhost:{NPROC}", NP=str(NPROC)))
    assert code == 0, out[-8000:]
    assert "--gloo" in out.splitlines()[0], "without CUDA the launcher must choose horovodrun --gloo"
    rec = check_training_log(out)
    assert rec["cser-start"][0]["device"] == "cpu"
    check_cser_traffic(rec["cser-stats"][-1])


def test_horovodrun_launcher_rejects_malformed_hosts():
    code, out = run_launcher(HOROVOD_LAUNCHER, [], cpu_env(HOSTS="node1:8,node2"), timeout=30)
    assert code == 2 and "host:slots" in out, out
