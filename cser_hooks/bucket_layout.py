"""The state's own bucket layout, independent of the one DDP uses in a given iteration.

Masks, residuals and block statistics are functions of offsets into a flat bucket, so they are only
meaningful for one assignment of parameters to buckets. DDP changes that assignment: a fresh
``DistributedDataParallel`` runs its first iteration with an initial layout (parameters in
registration order, one bucket for a small model) and rebuilds it from the gradient-ready order
after that iteration; ``bucket_cap_mb`` changes it too. A job that restarts from a checkpoint would
therefore apply its saved residuals and masks to other coordinates in its first iteration.

:class:`BucketLayout` fixes the layout once — during the first compressed step of a fresh state,
or from the checkpoint — as the *canonical* buckets: key → the parameters (by stable id, with their
sizes) in flat order. The DDP front end then presents every algorithm with canonical buckets only:

* a DDP bucket that *is* a canonical bucket (same parameters, same order) goes straight through
  (the usual case: no copy);
* otherwise each DDP bucket's gradients are copied into per-canonical-bucket staging tensors; a
  canonical bucket runs the algorithm (and launches its collective, from the hook call) as soon as
  all its parameters have arrived, and the DDP bucket's Future completes once every canonical
  bucket it overlaps has been decoded and copied back. Every rank sees the same DDP layout, so
  every rank launches the same collectives in the same order.

Stable parameter ids: the parameter names when the state was given ``named_parameters``; otherwise
the position of the parameter in the first layout the process sees (DDP's initial layout, the
registration order, the same in every process of the same model). The checkpoint keeps each id's
size, and a fingerprint of each parameter's values at save time, so a model loaded at the wrong
moment (before ``DDP(model)``, whose constructor broadcasts rank 0's parameters) is caught at the
first step instead of silently diverging.
"""
from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

Future = torch.futures.Future


def fingerprint(t: torch.Tensor) -> int:
    """Exact, order-independent digest of a tensor's bits: the integer sum of its words (int64, wraps)."""
    flat = t.detach().reshape(-1)
    words = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    return int(flat.contiguous().view(words).sum(dtype=torch.int64))


class _Staging:
    """One iteration's remapping: staging tensors, arrivals and the DDP buckets waiting on them."""

    __slots__ = ("missing", "launched", "done", "waiters", "lock")

    def __init__(self, layout: BucketLayout):
        self.missing = {k: {pid for pid, _ in ids} for k, ids in layout.canonical.items()}
        self.launched: set = set()
        self.done: dict[Any, torch.Tensor | BaseException] = {}
        self.waiters: dict[Any, list] = {}
        self.lock = threading.Lock()


class _Waiter:
    """A DDP bucket's Future, completed when all its pieces have come back."""

    __slots__ = ("fut", "buf", "unclaimed", "pending", "finished")

    def __init__(self, buf: torch.Tensor, keys: set):
        self.fut: Future = torch.futures.Future()
        self.buf = buf
        self.unclaimed = set(keys)  # keys whose values nobody copies yet
        self.pending = set(keys)    # keys whose values are not copied yet
        self.finished = False


class BucketLayout:
    """The canonical buckets of one state (see the module docstring); owned by the state, saved with it."""

    __slots__ = ("ids", "params", "canonical", "where", "frozen", "fixed_at", "expected", "checking",
                 "mismatched", "iterations", "_warned", "_staging", "_stage_bufs", "_seen")

    def __init__(self):
        self.ids: dict[int, Any] = {}             # id(param) -> stable id
        self.params: dict[Any, torch.Tensor] = {}  # stable id -> the parameter tensor
        self.canonical: dict[Any, tuple] = {}     # key -> ((pid, numel), ...) in flat order
        self.where: dict[Any, tuple] = {}         # pid -> (key, offset in the key's flat bucket, numel)
        self.frozen = False
        self.fixed_at: int | None = None          # the step whose DDP layout became canonical
        self.expected: dict[Any, int] = {}        # pid -> fingerprint at save time (until checked)
        self.checking = False                     # a load happened: verdict() due at the next step's end
        self.mismatched: list = []
        self.iterations = 0                       # DDP iterations this process has run (DDP's first is special)
        self._warned = False
        self._staging: tuple[int, _Staging] | None = None
        self._stage_bufs: dict = {}
        self._seen = 0

    # -- ids -------------------------------------------------------------------------------
    def ids_of(self, params: Sequence[torch.Tensor], names: Sequence[str] | None) -> list:
        out = []
        for i, p in enumerate(params):
            pid = self.ids.get(id(p))
            if pid is None:
                pid = names[i] if names is not None else self._seen
                self._seen += 1
                self.ids[id(p)] = pid
                self.params[pid] = p
                hit = self.where.get(pid)
                if hit is not None and hit[2] != p.numel():
                    raise ValueError(f"cser_hooks: parameter {pid!r} has {p.numel()} elements here but {hit[2]} in "
                                     f"the checkpoint: restore into the same model.")
            out.append(pid)
        return out

    # -- the canonical layout ------------------------------------------------------------------
    def observe(self, key, pids: list, params, step: int) -> None:
        """During the first compressed step of a fresh state, the DDP layout becomes canonical."""
        if self.frozen:
            return
        if self.fixed_at is None:
            self.fixed_at = step
        if step != self.fixed_at:
            self.freeze()
            return
        self._add(key, [(pid, p.numel()) for pid, p in zip(pids, params)])

    def _add(self, key, ids) -> None:
        self.canonical[key] = tuple(ids)
        o = 0
        for pid, n in ids:
            self.where[pid] = (key, o, n)
            o += n

    def freeze(self) -> None:
        self.frozen = True

    def matches(self, key, pids: list) -> bool:
        ids = self.canonical.get(key)
        return ids is not None and len(ids) == len(pids) and all(a == b for (a, _), b in zip(ids, pids))

    def key_params(self, key) -> list:
        try:
            return [self.params[pid] for pid, _ in self.canonical[key]]
        except KeyError as e:
            raise ValueError(f"cser_hooks: the checkpoint's bucket {key!r} holds parameter {e.args[0]!r}, which this "
                             f"model's DDP buckets do not contain. Restore into the same model (same parameters, "
                             f"same order of registration, or the same named_parameters).") from None

    def numel(self, key) -> int:
        return sum(n for _, n in self.canonical[key])

    # -- fingerprints (load order check) -----------------------------------------------------------
    def fingerprints(self) -> dict:
        return {pid: fingerprint(p) for pid, p in self.params.items()}

    def note_fingerprints(self, pids: list) -> None:
        """After a load: compare each parameter, when first seen, with its fingerprint at save time
        (before any model-side work of the step changes it); :meth:`verdict` reports at the step's end."""
        for pid in pids:
            want = self.expected.pop(pid, None)
            if want is not None and fingerprint(self.params[pid]) != want:
                self.mismatched.append(pid)

    def verdict(self, comm) -> None:
        """At DDP's last bucket of the first step after a load: one small collective, every rank raises together."""
        if not self.checking:
            return
        self.checking = False
        self.expected = {}
        everyone = comm.all_gather_object(list(self.mismatched))
        self.mismatched = []
        bad = {r: m for r, m in enumerate(everyone) if m}
        if bad:
            where = "; ".join(f"rank {r}: {', '.join(map(repr, m[:3]))}{' ...' if len(m) > 3 else ''}"
                              for r, m in bad.items())
            raise ValueError(
                f"cser_hooks: the model's parameters are not those the state was saved with ({where}). Restore "
                f"in this order: build the model, wrap it in DDP, then load the model's, the optimizer's and the "
                f"state's state_dict (each rank its own, all from the same step), before the first step. "
                f"Loading the model before DDP(model) does not work: DDP's constructor broadcasts rank 0's "
                f"parameters over the other ranks' (which CSER, QPRSGD and Qsparse keep different between "
                f"synchronizations).")

    # -- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"canonical": {k: list(v) for k, v in self.canonical.items()}, "fingerprints": self.fingerprints(),
                "named": any(isinstance(pid, str) for pid in self.params)}

    def load_state_dict(self, sd: dict | None) -> None:
        self.canonical, self.where = {}, {}
        self._staging = None
        self.expected, self.checking, self.mismatched = {}, False, []
        if not sd or not sd.get("canonical"):
            self.frozen, self.fixed_at = False, None
            return
        for k, ids in sd["canonical"].items():
            self._add(k, [(pid, int(n)) for pid, n in ids])
        for pid, (_, _, n) in self.where.items():
            p = self.params.get(pid)
            if p is not None and p.numel() != n:
                raise ValueError(f"cser_hooks: parameter {pid!r} has {p.numel()} elements here but {n} in the "
                                 f"checkpoint: restore into the same model.")
        self.expected = dict(sd.get("fingerprints", {}))
        self.checking, self.mismatched = bool(self.expected), []
        self.frozen, self.fixed_at = True, None

    # -- remapping one DDP bucket ----------------------------------------------------------------
    def _stage_buf(self, key, like: torch.Tensor) -> torch.Tensor:
        ck = (key, like.dtype, like.device)
        t = self._stage_bufs.get(ck)
        if t is None:
            t = self._stage_bufs[ck] = torch.empty(self.numel(key), dtype=like.dtype, device=like.device)
        return t

    def remap(self, iteration: int, grad: torch.Tensor, pids: list, run: Callable[[Any, torch.Tensor], Future]
              ) -> Future:
        """Copy this DDP bucket's gradients into the canonical buckets; run every canonical bucket that
        is now complete (``run(key, flat)`` launches its collective and returns the Future of the
        gradient to apply); return a Future that completes when this bucket's values are back."""
        if self._staging is None or self._staging[0] != iteration:  # per iteration: a skipped step reruns its number
            self._staging = (iteration, _Staging(self))
            if self.iterations > 0 and not self._warned:
                self._warned = True
                warnings.warn("cser_hooks: DDP's bucket layout differs from the state's (fixed at its first "
                              "compressed step, or by the checkpoint: another bucket_cap_mb, or warmup_steps=0 "
                              "before DDP rebuilt its buckets), so every step copies the gradients into the state's "
                              "buckets and back. Results are exact; to avoid the copies keep warmup_steps >= 1 and "
                              "the checkpoint's DDP settings, or start a fresh state.", stacklevel=2)
        st = self._staging[1]
        pieces, keys, o = [], set(), 0
        for pid in pids:
            hit = self.where.get(pid)
            if hit is None:
                raise ValueError(f"cser_hooks: parameter {pid!r} is in no bucket of this state's layout (fixed at "
                                 f"its first compressed step or by the checkpoint): the set of parameters that "
                                 f"DDP reduces changed. Construct a fresh state for the new model.")
            key, co, n = hit
            self._stage_buf(key, grad)[co:co + n].copy_(grad[o:o + n])
            st.missing[key].discard(pid)
            pieces.append((o, key, co, n))
            keys.add(key)
            o += n
        waiter = _Waiter(grad, keys)
        with st.lock:
            for key in keys:
                st.waiters.setdefault(key, []).append((waiter, pieces))
        for key in sorted(keys, key=repr):
            if not st.missing[key] and key not in st.launched:
                st.launched.add(key)
                fut = run(key, self._stage_buf(key, grad))
                fut.then(lambda f, key=key: self._deliver(st, key, f))
        # keys already decoded before this waiter registered are delivered here
        with st.lock:
            ready = [k for k in keys if k in st.done]
        for key in ready:
            self._deliver_one(st, key, waiter, pieces)
        return waiter.fut

    def _deliver(self, st: _Staging, key, f: Future) -> None:
        try:
            value: torch.Tensor | BaseException = f.value()
        except BaseException as e:  # noqa: BLE001 (handed on to DDP's Future)
            value = e
        with st.lock:
            st.done[key] = value
            waiting = list(st.waiters.get(key, ()))
        for waiter, pieces in waiting:
            self._deliver_one(st, key, waiter, pieces)

    def _deliver_one(self, st: _Staging, key, waiter: _Waiter, pieces) -> None:
        with st.lock:
            if key not in waiter.unclaimed:
                return
            waiter.unclaimed.discard(key)
            value = st.done[key]
        if not isinstance(value, BaseException):
            for o, k, co, n in pieces:
                if k == key:
                    waiter.buf[o:o + n].copy_(value[co:co + n])
        with st.lock:
            waiter.pending.discard(key)
            if waiter.finished or (waiter.pending and not isinstance(value, BaseException)):
                return
            waiter.finished = True
        if isinstance(value, BaseException):
            waiter.fut.set_exception(value)
        else:
            waiter.fut.set_result(waiter.buf)

    def unlaunched(self, iteration: int) -> list:
        """Canonical keys not run in this iteration (at DDP's last bucket: a parameter never arrived)."""
        if self._staging is None or self._staging[0] != iteration:
            return []
        st = self._staging[1]
        return [k for k in self.canonical if k not in st.launched]
