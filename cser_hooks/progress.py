"""An opt-in progress check for the collectives of one state (``progress_timeout=`` of the DDP states).

A peer that stops answering — stopped (SIGSTOP), swapped out, hung in its own code — holds every
other rank inside the collective until the process group's timeout (30 minutes by default), and
gloo's ``abort`` does not release a waiting collective. With ``progress_timeout=T`` seconds a
daemon thread watches the collectives this state launched; when one has been in flight for more
than T seconds it prints which rank, step and bucket waited, and what to look at, to stderr and ends
the process with exit code :data:`EXIT_CODE` (75, EX_TEMPFAIL: a launcher such as torchrun sees a
failed worker and stops or restarts the group). Choose T above the longest legitimate wait: the
slowest rank's compute of one step plus the collective's own time. Cost when on: a dict insert and
delete per collective and one thread that wakes ``min(1, T/4)`` times a second.
"""
from __future__ import annotations

import os
import sys
import threading
import time

EXIT_CODE = 75


class ProgressWatch:
    __slots__ = ("timeout", "rank", "_open", "_next", "_lock", "_thread")

    def __init__(self, timeout: float, rank: int):
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"progress_timeout must be a number of seconds > 0 (or None: off), got {timeout!r}")
        self.timeout = float(timeout)
        self.rank = rank
        self._open: dict[int, tuple[float, str]] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def begin(self, label: str) -> int:
        with self._lock:
            token = self._next
            self._next += 1
            self._open[token] = (time.monotonic(), label)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cser_hooks-progress", daemon=True)
            self._thread.start()
        return token

    def end(self, token: int) -> None:
        with self._lock:
            self._open.pop(token, None)

    def oldest(self) -> tuple[float, str] | None:
        with self._lock:
            return min(self._open.values(), default=None)

    def _run(self) -> None:
        tick = min(1.0, self.timeout / 4)
        while True:
            time.sleep(tick)
            hit = self.oldest()
            if hit is not None and time.monotonic() - hit[0] > self.timeout:
                self.expire(time.monotonic() - hit[0], hit[1])

    def expire(self, waited: float, label: str) -> None:
        sys.stderr.write(
            f"cser_hooks: rank {self.rank}: the collective of {label} has not completed after {waited:.1f} s "
            f"(progress_timeout={self.timeout:g} s): a peer rank is not answering (stopped, swapped out, hung or "
            f"much slower; see the other ranks' logs). Exiting with code {EXIT_CODE} so that the launcher can "
            f"stop or restart the job instead of waiting for the process group's timeout.\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)
