"""Start the W workers, follow rank 0's progress, and never leave a process behind.

Workers run as ``[ip netns exec NS] python -m cser_hooks.bench.worker --config F --rank R``, each in
its own session (so a terminal's Ctrl-C reaches only the launcher, which then stops them in order),
with ``CSER_BENCH_PARENT`` set so a worker kills itself if the launcher dies (PDEATHSIG).

One set of workers runs all methods in turn (importing torch in W processes on 2 cores costs ~10 s,
paid once). If the workers fail or time out inside a method, that method is reported as failed and
a fresh set of workers is started for the methods after it.

:meth:`Launcher.stop_all` is what ``finally``/``atexit``/signal handlers call: SIGTERM to each
worker's process group, SIGKILL after a grace period, then reap.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Protocol

PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slug(i: int, name: str) -> str:
    return f"{i:02d}-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


class UI(Protocol):
    def start(self, name: str) -> None: ...
    def progress(self, name: str, msg: dict) -> None: ...
    def end(self, name: str, outcome: dict) -> None: ...


class Launcher:
    def __init__(self, work_dir: Path, log_dir: Path, lab=None):
        self.work_dir = work_dir
        self.log_dir = log_dir
        self.lab = lab
        self.procs: list[subprocess.Popen] = []
        self._lock = threading.RLock()
        self._round = 0

    def _env(self, rank: int) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = PACKAGE_PARENT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["CSER_BENCH_PARENT"] = str(os.getpid())
        env["OMP_NUM_THREADS"] = "1"
        env["MKL_NUM_THREADS"] = "1"
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # W workers share the cores: idle OpenMP threads must sleep
        env["PYTHONUNBUFFERED"] = "1"
        env["GLOO_SOCKET_IFNAME"] = self.lab.ifname(rank) if self.lab else "lo"
        env.pop("MASTER_ADDR", None)
        env.pop("MASTER_PORT", None)
        return env

    def run_methods(self, names: list[str], cfg: dict, ui: UI, timeout_s: float) -> dict[str, dict]:
        """Run every method; return ``{name: outcome}``.

        An outcome is ``{"results": [one dict per rank]}`` or ``{"error": str, "unavailable": bool}``.
        """
        slugs = {n: slug(i, n) for i, n in enumerate(names)}
        outcomes: dict[str, dict] = {}
        todo = list(names)
        while todo:
            current = self._run_round(todo, slugs, cfg, ui, timeout_s, outcomes)
            done_upto = todo.index(current) + 1 if current in todo else len(todo)
            todo = [n for n in todo[done_upto:] if n not in outcomes]
        return outcomes

    def _collect(self, name: str, slug_: str, world: int) -> dict | None:
        d = self.work_dir / slug_
        errors = [json.loads(p.read_text()) for p in sorted(d.glob("rank*.error.json"))]
        if errors:
            return {"error": errors[0]["message"], "unavailable": all(e["unavailable"] for e in errors)}
        paths = [d / f"rank{r}.json" for r in range(world)]
        if all(p.exists() for p in paths):
            return {"results": [json.loads(p.read_text()) for p in paths]}
        return None

    def _run_round(self, todo, slugs, cfg, ui, timeout_s, outcomes) -> str | None:
        """One set of workers over ``todo``; returns the method it stopped in (None when all ran)."""
        self._round += 1
        world = int(cfg["world"])
        cfg = dict(cfg, methods=todo, slugs=[slugs[n] for n in todo], out_dir=str(self.work_dir))
        if self.lab:
            cfg.update(master_addr=self.lab.addr(0), master_port=29500 + self._round)
        else:
            cfg.update(master_addr="127.0.0.1", master_port=free_port())
        logs = [self.log_dir / f"workers-{self._round}.rank{r}.log" for r in range(world)]
        lines: queue.Queue[str | None] = queue.Queue()
        procs: list[subprocess.Popen] = []
        current: str | None = None
        try:
            for r in range(world):
                path = self.work_dir / f"config-{self._round}.rank{r}.json"
                path.write_text(json.dumps(dict(cfg, ifname=self.lab.ifname(r) if self.lab else None)))
                cmd = [sys.executable, "-m", "cser_hooks.bench.worker", "--config", str(path),
                       "--rank", str(r)]
                if self.lab:
                    cmd = self.lab.exec_prefix(r) + cmd
                with open(logs[r], "w") as log:
                    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if r == 0 else log, stderr=log,
                                            stdin=subprocess.DEVNULL, env=self._env(r),
                                            start_new_session=True, text=True)
                with self._lock:
                    self.procs.append(proc)
                procs.append(proc)
            threading.Thread(target=_pump, args=(procs[0], logs[0], lines), daemon=True).start()
            deadline = None

            def handle(item: str) -> None:
                nonlocal current, deadline
                msg = json.loads(item)
                name = msg.get("method")
                if msg.get("event") == "start":
                    current, deadline = name, time.monotonic() + timeout_s
                    ui.start(name)
                elif msg.get("event") == "end":
                    outcomes[name] = self._collect(name, slugs[name], world) or {
                        "error": "finished without result files", "unavailable": False}
                    ui.end(name, outcomes[name])
                    current = None
                else:
                    ui.progress(name, msg)

            while True:
                try:
                    item = lines.get(timeout=0.2)
                except queue.Empty:
                    item = None
                if item:
                    handle(item)
                    continue
                codes = [p.poll() for p in procs]
                bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
                if bad or all(c == 0 for c in codes):
                    time.sleep(0.3)  # let the other ranks' error files and rank 0's last lines land
                    while not lines.empty():
                        item = lines.get_nowait()
                        if item:
                            handle(item)
                    if bad and current is None and all(n in outcomes for n in todo):
                        r, c = bad[0]  # every result is in: a crash while the process ended loses nothing
                        print(f"note: rank {r} exited with {c} after its last method (log: {logs[r]})",
                              file=sys.stderr)
                        return None
                    if bad:
                        r, c = bad[0]
                        failed = current or next(n for n in todo if n not in outcomes)
                        self._fail(failed, slugs, world, ui, outcomes,
                                   f"rank {r} exited with {c}: {_tail(logs[r])} (log: {logs[r]})")
                        return failed
                    missing = [n for n in todo if n not in outcomes]
                    if missing:  # exited cleanly without running everything: should not happen
                        self._fail(missing[0], slugs, world, ui, outcomes, "workers exited early")
                        return missing[0]
                    return None
                if deadline is not None and time.monotonic() > deadline:
                    self._fail(current, slugs, world, ui, outcomes,
                               f"timed out after {timeout_s:.0f} s (raise --timeout); logs in "
                               f"{logs[0].parent}")
                    return current
        finally:
            self._stop(procs)

    def _fail(self, name, slugs, world, ui, outcomes, message) -> None:
        got = self._collect(name, slugs[name], world)
        if got is None or "results" in got:
            got = {"error": message, "unavailable": False}
        else:
            got["error"] = f"{got['error']} ({message})"
        outcomes[name] = got
        ui.end(name, got)

    def _stop(self, procs: list[subprocess.Popen], grace: float = 3.0) -> None:
        live = [p for p in procs if p.poll() is None]
        for p in live:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait()
        for p in procs:
            _signal_group(p, signal.SIGKILL)  # anything the worker left in its process group
            if p.stdout is not None:
                try:
                    p.stdout.close()
                except OSError:
                    pass
            with self._lock:
                if p in self.procs:
                    self.procs.remove(p)

    def stop_all(self) -> None:
        with self._lock:
            procs = list(self.procs)
        self._stop(procs)


def _pump(proc: subprocess.Popen, log_path: Path, lines: queue.Queue[str | None]) -> None:
    try:
        with open(log_path, "a") as log:
            for line in proc.stdout:
                if line.startswith("@@"):
                    lines.put(line[2:])
                else:
                    log.write(line)
                    log.flush()
    except (OSError, ValueError):
        pass


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        if p.poll() is None:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(lines[-n:]) if lines else "(empty log)"
