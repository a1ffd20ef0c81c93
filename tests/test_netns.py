"""``--link`` runs (network namespaces + veths + tbf) leave nothing behind, however they end.

Needs root and iproute2 (CI runs as root); skipped otherwise. What is checked is the system
itself: ``ip netns list``, the interfaces of the root namespace, and /proc (workers carry
``CSER_BENCH_PARENT=<launcher pid>`` in their environment).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cser_hooks.bench import netns

REPO = Path(__file__).resolve().parents[1]

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
                                reason="needs root and iproute2 (ip, tc) to create network namespaces")


def namespaces_of(pid: int) -> list[str]:
    return [n for n in netns.list_namespaces() if n.startswith(f"cserb-{pid}-")]


def processes_of(pid: int) -> list[int]:
    """Processes (other than the launcher) whose environment names ``pid`` as their bench launcher."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == pid:
            continue
        try:
            env = (d / "environ").read_bytes()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"CSER_BENCH_PARENT={pid}".encode() in env.split(b"\0") and state != "Z":
            found.append(int(d.name))
    return found


def veths_in_root() -> list[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return re.findall(r"^\d+: (cb[0-9a-f]{4}[wh]\d+)", out, flags=re.M)


class Bench:
    """A --link benchmark in the background; stderr collected so the test can wait for a line."""

    def __init__(self, tmp_path: Path, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cser_hooks.bench", "--link", "1gbit", "--out", str(tmp_path / "out"),
             *args],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.err = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        fd = self.proc.stderr.fileno()
        for chunk in iter(lambda: os.read(fd, 4096), b""):  # whatever is there, not 4096 bytes
            self.err.append(chunk.decode(errors="replace"))

    def text(self) -> str:
        return "".join(self.err)

    def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.text()):
                return
            if self.proc.poll() is not None:
                pytest.fail(f"benchmark exited with {self.proc.returncode} before {pattern!r}:\n"
                            f"{self.text()[-2000:]}")
            time.sleep(0.2)
        self.proc.kill()
        pytest.fail(f"no {pattern!r} within {timeout} s:\n{self.text()[-2000:]}")


def assert_nothing_left(pid: int) -> None:
    assert namespaces_of(pid) == []
    assert veths_in_root() == []
    assert processes_of(pid) == []


@needs_root
@pytest.mark.slow
@pytest.mark.timeout(60)
def test_sigint_during_training_leaves_no_namespace_veth_or_process(tmp_path):
    b = Bench(tmp_path, "--methods", "dense", "--steps", "100000")
    try:
        b.wait_for(r"network: 4 namespaces", 20)
        assert len(namespaces_of(b.proc.pid)) == 5  # 4 workers + the bridge's hub
        b.wait_for(r"dense:.*step/s", 45)  # the method started: all 4 workers joined the gloo group
        assert len(processes_of(b.proc.pid)) >= 4
        b.proc.send_signal(signal.SIGINT)
        assert b.proc.wait(timeout=20) == 130
        assert "interrupted: workers stopped, namespaces removed" in b.text()
        assert_nothing_left(b.proc.pid)
    finally:
        if b.proc.poll() is None:
            b.proc.kill()


@needs_root
@pytest.mark.slow
@pytest.mark.timeout(60)
def test_sigkilled_launcher_workers_die_and_cleanup_removes_its_namespaces(tmp_path):
    b = Bench(tmp_path, "--methods", "dense", "--steps", "100000")
    try:
        b.wait_for(r"dense:.*step/s", 45)
        pid = b.proc.pid
        assert len(processes_of(pid)) >= 4
        b.proc.kill()  # no handler runs: PDEATHSIG must take the workers down
        b.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while processes_of(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_of(pid) == []
        assert len(namespaces_of(pid)) == 5  # stale, but findable by the launcher's (dead) pid
        proc = subprocess.run([sys.executable, "-m", "cser_hooks.bench", "--cleanup"], cwd=REPO,
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert "removed" in proc.stdout and f"cserb-{pid}-" in proc.stdout
        assert_nothing_left(pid)
    finally:
        if b.proc.poll() is None:
            b.proc.kill()
        subprocess.run([sys.executable, "-m", "cser_hooks.bench", "--cleanup"], cwd=REPO, capture_output=True,
                       timeout=30)


def test_link_and_delay_arguments_are_checked():
    assert netns.parse_rate("100mbit") == 100e6 and netns.parse_rate("1gbit") == 1e9
    with pytest.raises(SystemExit, match="like 100mbit"):
        netns.parse_rate("100 Mbps")
    with pytest.raises(SystemExit, match="like 1ms"):
        netns.check_delay("1 millisecond")
