"""Run a function on W real torch.distributed ranks (spawned processes on 127.0.0.1).

``run_ranks(fn, world_size, *args, timeout=120, backend="gloo", **kwargs)`` calls the module-level
function ``fn(rank, world_size, *args, **kwargs)`` in ``world_size`` freshly spawned processes that
share one initialised process group, and returns the ranks' return values ordered by rank.

The harness is how the tests check docs/algorithms.md §8 ("every rank issues the same collectives in the
same order") on a real gloo group: a mismatch makes a rank raise or stall, and the harness turns both
into a test failure that names the rank, never a hang.

* The rendezvous store is a TCPStore served by the calling process on 127.0.0.1 (an OS-chosen free
  port, so parallel runs cannot collide); the ranks connect to it as clients.
* Two clocks. Start-up (spawn, imports, connecting to the store) may take :data:`STARTUP_TIMEOUT`;
  once every rank has started, the parent releases them together and ``timeout`` starts for the
  group initialisation and ``fn``. A loaded machine (4 ranks importing torch on 2 cores) therefore
  does not eat into ``timeout``.
* The process group's own timeout expires a few seconds (:func:`pg_margin`) before that deadline,
  so a rank stuck in a collective raises inside the rank, and is reported with its traceback,
  before the harness gives up.
* A rank that raises -> :class:`RankError` with the rank number and its full traceback text.
* A rank that dies without a result (``os._exit``, a signal) or a run that does not finish in time
  -> :class:`RankError` naming the ranks still running, with their Python stacks
  (dumped by faulthandler just before they are killed). All ranks are always killed and reaped,
  also on KeyboardInterrupt or a pytest-timeout in the caller.
* Each rank runs with one intra-op/inter-op thread (OMP_NUM_THREADS=1 etc.: the machine has 2 cores
  shared by up to 4 ranks). The harness seeds nothing: ``torch.manual_seed`` & co. are up to ``fn``.
* Return values travel as ordinary pickles, so tensors are fine (no shared memory is involved).

``fn`` must be importable by name in the children (defined at module level of a module on
``sys.path``; test modules are, because the spawned children inherit the parent's ``sys.path``).
A call can take up to STARTUP_TIMEOUT + ``timeout`` + a few seconds: keep that below the test's
pytest-timeout (300 s by default, pyproject.toml) or mark the test ``@pytest.mark.timeout(...)``.
Process groups that ``fn`` creates itself (``dist.new_group``) keep torch's default timeout unless
given one.
"""
from __future__ import annotations

import datetime
import faulthandler
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

__all__ = ["RankError", "run_ranks"]

# Environment of every rank. Thread caps first: two cores shared by up to four ranks.
RANK_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "NUMBA_NUM_THREADS": "1",
    # gloo picks its transport address from the hostname unless told; loopback is always right here.
    "GLOO_SOCKET_IFNAME": "lo",
    "TP_SOCKET_IFNAME": "lo",
    "PYTHONFAULTHANDLER": "1",
}
STARTUP_TIMEOUT = 120.0  # seconds for all ranks to spawn, import and reach the store (before `timeout`)
GRACE_AFTER_ERROR = 2.0  # seconds to collect further rank errors once one rank has failed
STACK_DUMP_WAIT = 1.0  # seconds to let faulthandler write the stacks of stuck ranks
GO_KEY = "run_ranks/go"  # store key the parent sets once every rank has started


class RankError(RuntimeError):
    """A rank raised, died, or the run did not finish in time. The message says which and why.

    ``failed_ranks``: ranks that raised or died; ``running_ranks``: ranks the harness had to kill;
    ``run_seconds``: time from the common start of ``fn`` to the verdict (None: failed in start-up).
    """

    def __init__(self, message: str, failed_ranks: list[int], running_ranks: list[int],
                 run_seconds: float | None = None):
        super().__init__(message)
        self.failed_ranks = failed_ranks
        self.running_ranks = running_ranks
        self.run_seconds = run_seconds


def pg_margin(timeout: float) -> float:
    """How long before the harness deadline the ranks' process-group timeout expires."""
    return max(1.0, min(5.0, 0.15 * timeout))


def run_ranks(fn, world_size: int, *args, timeout: float = 120, backend: str = "gloo", **kwargs) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` ranks; return results by rank.

    ``timeout`` limits the run of ``fn`` (counted from the moment every rank has started); spawning
    the processes and importing torch has its own limit, :data:`STARTUP_TIMEOUT`, so a loaded
    machine does not eat into ``timeout``.
    """
    _check_fn(fn)
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"run_ranks: world_size must be a positive int, got {world_size!r}")
    if timeout <= 0:
        raise ValueError(f"run_ranks: timeout must be > 0 seconds, got {timeout!r}")

    import torch.distributed as dist  # the store lives in this process

    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT),
                          wait_for_workers=False)
    ctx = multiprocessing.get_context("spawn")
    procs: list = []
    conns: list = []
    with tempfile.TemporaryDirectory(prefix="run_ranks_") as tmp:
        try:
            with _env(RANK_ENV):
                for rank in range(world_size):
                    recv, send = ctx.Pipe(duplex=False)
                    stack_file = str(Path(tmp) / f"rank{rank}.stack")
                    spec = _RankSpec(rank, world_size, backend, store.port, stack_file)
                    p = ctx.Process(target=_rank_main, args=(spec, fn, args, kwargs, send),
                                    name=f"run_ranks-rank{rank}", daemon=False)  # ranks may fork
                    p.start()
                    send.close()  # the child holds the write end; EOF here means it is gone
                    procs.append(p)
                    conns.append(recv)
            return _Run(procs, conns, store, timeout, fn, tmp).collect()
        finally:
            _kill_all(procs)
            for c in conns:
                c.close()
            del store


# ---------------------------------------------------------------------------------------------------
# parent side


def _check_fn(fn) -> None:
    qualname = getattr(fn, "__qualname__", "")
    if not callable(fn) or "<locals>" in qualname or "<lambda>" in qualname:
        raise TypeError(
            f"run_ranks needs a module-level function (picklable by name for the spawned ranks), "
            f"got {fn!r}; define it at the top level of the test module")


class _Run:
    """The parent's bookkeeping: start-up phase, then the run of ``fn``, then the verdict."""

    def __init__(self, procs, conns, store, timeout, fn, tmp):
        self.procs, self.conns, self.store = procs, conns, store
        self.timeout, self.fn, self.tmp = timeout, fn, tmp
        self.world_size = len(procs)
        self.started: set[int] = set()
        self.results: dict[int, object] = {}
        self.errors: dict[int, str] = {}
        self.go_at = None  # monotonic time at which fn started on every rank
        self.first_error_at = None

    def collect(self) -> list:
        pending = set(range(self.world_size))
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while pending:
            now = time.monotonic()
            limit = deadline
            if self.first_error_at is not None:
                limit = min(limit, self.first_error_at + GRACE_AFTER_ERROR)
            if now >= limit:
                break
            waitables = {self.conns[r]: r for r in pending}
            waitables.update({self.procs[r].sentinel: r for r in pending})
            for obj in multiprocessing.connection.wait(list(waitables), timeout=limit - now):
                r = waitables[obj]
                if r in pending and self._consume(r):
                    pending.discard(r)
            if self.go_at is None and len(self.started) == self.world_size and not self.errors:
                # Everybody is up: start the clock of fn and tell the ranks their collective deadline.
                self.go_at = time.monotonic()
                deadline = self.go_at + self.timeout
                pg_deadline = time.time() + self.timeout - pg_margin(self.timeout)
                self.store.set(GO_KEY, repr(pg_deadline))
        if not pending and not self.errors:
            return [self.results[r] for r in range(self.world_size)]
        self._fail(sorted(pending))

    def _consume(self, r) -> bool:
        """Read what rank r sent (or learn that it died). True once the rank is finished."""
        conn, proc = self.conns[r], self.procs[r]
        while conn.poll():
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                proc.join(timeout=5)  # the write end closed: the process is exiting
                break
            try:
                kind, payload = pickle.loads(data)
            except Exception:  # report anything that breaks unpickling
                kind, payload = "error", (f"rank {r}: its message could not be unpickled in the parent:\n"
                                          f"{traceback.format_exc()}")
            if kind == "started":
                self.started.add(r)
                continue
            if kind == "ok":
                self.results[r] = payload
            else:
                self._error(r, payload)
            return True
        if proc.is_alive():
            return False
        proc.join()
        code = proc.exitcode
        how = (f"was killed by signal {-code} ({_signame(-code)})" if code is not None and code < 0
               else f"exited with code {code}")
        self._error(r, f"rank {r}: the process {how} without returning a result or raising "
                       f"(os._exit, crash?)")
        return True

    def _error(self, r, text) -> None:
        self.errors[r] = text
        if self.first_error_at is None:
            self.first_error_at = time.monotonic()

    def _fail(self, running: list[int]):
        verdict_at = time.monotonic()
        stacks = _dump_stacks(self.procs, running, self.tmp)
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        head = f"run_ranks({name}, world_size={self.world_size})"
        if self.errors:
            parts = [f"{head}: rank(s) {sorted(self.errors)} failed"]
        elif self.go_at is None:
            parts = [f"{head}: the ranks did not all start within {STARTUP_TIMEOUT:g} s "
                     f"(spawn + imports); started: {sorted(self.started)}"]
        else:
            parts = [f"{head}: timed out after {self.timeout:g} s"]
        starting = [r for r in running if r not in self.started]
        if running:
            parts.append(f"ranks still running (killed by the harness): {running}")
        if starting:
            parts.append(f"  of which still starting up (before init_process_group): {starting}")
        if self.results:
            parts.append(f"ranks that returned normally: {sorted(self.results)}")
        for r in sorted(self.errors):
            parts.append(f"--- rank {r} ---\n{self.errors[r].rstrip()}")
        for r in running:
            if stacks.get(r):
                parts.append(f"--- rank {r} (still running) Python stacks at kill time ---\n"
                             f"{stacks[r].rstrip()}")
        run_seconds = None if self.go_at is None else verdict_at - self.go_at
        raise RankError("\n".join(parts), failed_ranks=sorted(self.errors), running_ranks=running,
                        run_seconds=run_seconds)


def _signame(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return "unknown"


def _dump_stacks(procs, ranks, tmp) -> dict[int, str]:
    """Ask the still-running ranks to write their Python stacks (faulthandler on SIGUSR1)."""
    signalled = []
    for r in ranks:
        if procs[r].is_alive() and procs[r].pid:
            try:
                os.kill(procs[r].pid, signal.SIGUSR1)
                signalled.append(r)
            except ProcessLookupError:
                pass
    if signalled:
        time.sleep(STACK_DUMP_WAIT)
    out = {}
    for r in ranks:
        path = Path(tmp) / f"rank{r}.stack"
        try:
            text = path.read_text(errors="replace")
        except OSError:
            text = ""
        out[r] = text[-8000:]
    return out


def _kill_all(procs) -> None:
    for p in procs:
        if p.is_alive():
            try:
                p.kill()
            except (ProcessLookupError, AttributeError):
                pass
    for p in procs:
        p.join(timeout=10)


@contextmanager
def _env(values: dict):
    """Set environment variables while the ranks are spawned (they inherit them), then restore."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------------
# rank side


class _RankSpec:
    def __init__(self, rank, world_size, backend, port, stack_file):
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.port = port
        self.stack_file = stack_file


def _watch_parent() -> None:
    """Exit this rank if the parent process disappears (e.g. pytest was SIGKILLed)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(70)

    threading.Thread(target=watch, name="run_ranks-parent-watch", daemon=True).start()


def _rank_main(spec: _RankSpec, fn, args, kwargs, conn) -> None:
    stack_file = open(spec.stack_file, "w")  # stays open: faulthandler writes here on SIGUSR1
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    _watch_parent()
    dist = None
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass  # already set by something imported earlier; harmless
        store = dist.TCPStore("127.0.0.1", spec.port, None, False,
                              timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT))
        _send(conn, pickle.dumps(("started", None)), close=False)
        store.wait([GO_KEY])  # every rank is up; the parent started the clock
        pg_deadline = float(store.get(GO_KEY).decode())
        timeout = datetime.timedelta(seconds=max(1.0, pg_deadline - time.time()))
        dist.init_process_group(spec.backend, store=store, rank=spec.rank, world_size=spec.world_size,
                                timeout=timeout)
        result = fn(spec.rank, spec.world_size, *args, **kwargs)
        try:
            data = pickle.dumps(("ok", result), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise TypeError(f"rank {spec.rank}: the return value of {fn.__qualname__} is not picklable: "
                            f"{exc}") from exc
        dist.destroy_process_group()
    except BaseException:  # everything a rank raises goes to the parent, first of all
        _send(conn, pickle.dumps(("error", f"rank {spec.rank} raised:\n{traceback.format_exc()}")))
        if dist is not None:
            try:
                if dist.is_initialized():
                    dist.destroy_process_group()
            except Exception:
                pass  # teardown after a failure must not mask it
        return
    _send(conn, data)


def _send(conn, data: bytes, close: bool = True) -> None:
    try:
        conn.send_bytes(data)
        if close:
            conn.close()
    except OSError:
        pass  # the parent is gone or gave up on this rank
    sys.stdout.flush()
    sys.stderr.flush()
