"""Emulated links for ``--link``: one network namespace per worker, joined by veths to a bridge.

Layout of one run (``P = cserb-<launcher pid>-<4 hex>``, ``T = <4 hex>``)::

    netns P-w0: veth cbTw0 10.231.X.1/24 ─┐
    netns P-w1: veth cbTw1 10.231.X.2/24 ─┤  peers cbTh0, cbTh1, ... enslaved to bridge br0
    ...                                   ├─ in netns P-hub (not in the root namespace)

Each veth pair is created with both ends directly inside their namespaces (``ip link add ... netns
... peer ... netns ...``), so deleting the namespaces removes every veth: nothing of a run is ever
in the root namespace. The addresses (10.231.X.0/24, X from T) exist only inside these namespaces,
which have no route anywhere else; workers rendezvous on rank 0's address.

Shaping: ``tc qdisc ... tbf rate RATE`` on both ends of every veth (a full-duplex link of RATE per
worker); ``--delay`` adds netem on the worker side (one-way delay per link), which needs a kernel
with ``sch_netem``: the setup fails with that message otherwise.

Cleanup (:meth:`NetLab.cleanup`, idempotent): kill the processes inside the namespaces, delete
them. The launcher calls it from ``finally``, ``atexit`` and its signal handlers;
:func:`cleanup_stale` removes namespaces left by launchers that were killed outright (their pid,
in the name, is gone).
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import time

NAME_RE = re.compile(r"^cserb-(\d+)-([0-9a-f]{4})-(hub|w\d+)$")
RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)(kbit|mbit|gbit)$")
DELAY_RE = re.compile(r"^(\d+(?:\.\d+)?)(us|ms|s)$")
_UNIT_BITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


class NetLabError(RuntimeError):
    pass


def parse_rate(rate: str) -> float:
    """Bits per second of '100mbit' / '1gbit' / '500kbit' (tc's units: 'mbit' is megabits/s)."""
    m = RATE_RE.match(rate.strip().lower())
    if not m:
        raise SystemExit(f"--link {rate!r}: give a rate like 100mbit, 1gbit or 500kbit (bits per second)")
    return float(m[1]) * _UNIT_BITS[m[2]]


def check_delay(delay: str) -> str:
    if not DELAY_RE.match(delay.strip().lower()):
        raise SystemExit(f"--delay {delay!r}: give a delay like 1ms, 500us or 0.1s")
    return delay.strip().lower()


def require_tools() -> None:
    if os.geteuid() != 0:
        raise SystemExit("--link needs root: network namespaces, veths and tc qdiscs can only be created by "
                         "root (run `sudo python -m cser_hooks.bench --link ...`), or drop --link to run on "
                         "127.0.0.1 without shaping")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise SystemExit(f"--link needs the `{tool}` command (Debian/Ubuntu: apt-get install iproute2)")


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetLabError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc


def list_namespaces() -> list[str]:
    proc = _run("ip", "netns", "list", check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _kill_pids_in(ns: str) -> None:
    proc = _run("ip", "netns", "pids", ns, check=False)
    pids = [int(p) for p in proc.stdout.split() if p.isdigit()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(_alive(p) for p in alive):
            time.sleep(0.05)
        pids = [p for p in alive if _alive(p)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def delete_namespace(ns: str) -> None:
    _kill_pids_in(ns)
    _run("ip", "netns", "del", ns, check=False)


def cleanup_stale() -> list[str]:
    """Delete namespaces of earlier runs whose launcher process no longer exists; return their names."""
    removed = []
    for ns in list_namespaces():
        m = NAME_RE.match(ns)
        if m and not _alive(int(m[1])):
            delete_namespace(ns)
            removed.append(ns)
    return removed


class NetLab:
    def __init__(self, world: int, rate: str, delay: str | None = None):
        if world > 250:
            raise SystemExit("--link supports at most 250 workers (one /24)")
        self.world = world
        self.rate = rate.strip().lower()
        self.rate_bps = parse_rate(rate)
        self.delay = check_delay(delay) if delay else None
        self.token = secrets.token_hex(2)
        self.prefix = f"cserb-{os.getpid()}-{self.token}"
        self.subnet = f"10.231.{int(self.token, 16) % 250 + 1}"
        self.created: list[str] = []
        self.ready = False

    # -- names ---------------------------------------------------------------------------------
    @property
    def hub(self) -> str:
        return f"{self.prefix}-hub"

    def ns(self, rank: int) -> str:
        return f"{self.prefix}-w{rank}"

    def ifname(self, rank: int) -> str:
        return f"cb{self.token}w{rank}"

    def _peer(self, rank: int) -> str:
        return f"cb{self.token}h{rank}"

    def addr(self, rank: int) -> str:
        return f"{self.subnet}.{rank + 1}"

    def exec_prefix(self, rank: int) -> list[str]:
        return ["ip", "netns", "exec", self.ns(rank)]

    # -- setup / cleanup -----------------------------------------------------------------------
    def _tbf(self, ns: str, dev: str, parent: list[str]) -> None:
        burst = max(int(self.rate_bps / 8 / 500), 32 * 1024)  # 2 ms of traffic, at least 32 KiB
        _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, *parent, "tbf", "rate", self.rate,
             "burst", str(burst), "latency", "200ms")

    def setup(self) -> None:
        require_tools()
        try:
            self._add_ns(self.hub)
            _run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.hub, "link", "set", "br0", "up")
            for r in range(self.world):
                ns, dev, peer = self.ns(r), self.ifname(r), self._peer(r)
                self._add_ns(ns)
                _run("ip", "link", "add", dev, "netns", ns, "type", "veth",
                     "peer", "name", peer, "netns", self.hub)
                _run("ip", "-n", self.hub, "link", "set", peer, "master", "br0")
                _run("ip", "-n", self.hub, "link", "set", peer, "up")
                _run("ip", "-n", ns, "addr", "add", f"{self.addr(r)}/24", "dev", dev)
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                _run("ip", "-n", ns, "link", "set", dev, "up")
                if self.delay:
                    try:
                        _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root",
                             "handle", "1:", "netem", "delay", self.delay)
                    except NetLabError as exc:
                        raise NetLabError(f"--delay needs the netem qdisc (kernel option "
                                          f"CONFIG_NET_SCH_NETEM, module sch_netem), which this kernel lacks "
                                          f"or cannot load: {exc}. Drop --delay to shape bandwidth only."
                                          ) from exc
                    self._tbf(ns, dev, ["parent", "1:1", "handle", "10:"])
                else:
                    self._tbf(ns, dev, ["root"])
                self._tbf(self.hub, peer, ["root"])
            self.ready = True
        except NetLabError:
            self.cleanup()
            raise

    def _add_ns(self, ns: str) -> None:
        _run("ip", "netns", "add", ns)
        self.created.append(ns)

    def cleanup(self) -> list[str]:
        """Kill what runs inside the namespaces and delete them (workers first, hub last)."""
        mine = set(self.created) | {n for n in list_namespaces() if n.startswith(self.prefix + "-")}
        for ns in sorted(mine, key=lambda n: n.endswith("-hub")):
            delete_namespace(ns)
        self.created = []
        self.ready = False
        return [n for n in list_namespaces() if n.startswith(self.prefix + "-")]

    def describe(self) -> str:
        d = f", delay {self.delay}" if self.delay else ""
        return (f"{self.world} namespaces {self.prefix}-w*, veths cb{self.token}w*/h* on bridge br0 in "
                f"{self.hub}, {self.subnet}.0/24, tbf {self.rate}{d}")
