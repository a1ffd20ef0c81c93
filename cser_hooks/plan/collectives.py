"""What each method sends per step: its collectives (kind, bytes handed) and its compression work.

Methods are named as in the benchmark (``cser_hooks.bench.methods``: presets such as ``cser-32`` and
parametric forms such as ``cser@1/64:1/4:16``); :func:`cser_hooks.plan.by_method.traffic` reads the
state class and compressor specs from the benchmark's own parsed entry and calls the step plans
below, so the planner models exactly what ``python -m cser_hooks.bench --methods NAME`` runs. Bytes on the wire
come from :mod:`cser_hooks.wire` (the package's ring / pairwise model, the one ``stats()`` reports),
payload sizes from each compressor's own ``wire_bytes``.

Per DDP bucket of n fp32 elements (flag: the 1-element non-finite flag the states send with every
payload, docs/algorithms.md §8), steady state (after the warm-up step, which is a dense allreduce):

==================  =====================================================================================
dense, allreduce    allreduce of 4n
fp16                allreduce of 2n (torch's fp16_compress_hook)
powersgd@r          torch's powerSGD_hook: allreduce of the uncompressed tensors (1-D ones, and those
                    with (rows + cols)·r·2 >= rows·cols), then of all P (rows x r), then of all Q (cols x r)
ef-*, topk          shared-mask C: allreduce of wire_bytes + flag; other C: allgather of 4 + wire_bytes
cser@ρ1:ρ2:H        per step as EF with C1 (C1 = zero: nothing); every H steps after the optimizer step
                    one allreduce of the C2-selected parameters of all buckets, no flag (the reset)
compskip@ρ:K        steps with (s+1) % K == 0 as EF; the others send nothing
dist-ef-sgdm@B      all_to_all of the W sign-compressed chunks (waited for inside the hook: blocking),
                    then allgather of 4 + the largest chunk's payload (docs/algorithms.md §6)
qsparse@ρ:H         nothing per step; every H steps one allgather of 4 + wire_bytes per bucket (after
                    the optimizer step: blocking)
qprsgd@K            nothing per step; every K steps one allgather of 4 + wire_bytes per bucket (blocking)
==================  =====================================================================================

An event "every H steps" runs after the optimizer step of steps s >= 1 with (s + 1) % H == 0; its
bytes are amortised over H steps in the mean figures (``stats()`` counts them in the step after).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from .. import wire
from . import costs as C
from .workload import Workload, numel

# torch's powerSGD_hook settings of the bench (cser_hooks/bench/methods.py, _powersgd)
POWERSGD_MIN_COMPRESSION_RATE = 2
# assumed passes of torch's PowerSGD over a compressed matrix, rank r: error feedback (add, subtract),
# M·Q and Mᵀ·P (r passes each), the reconstruction P·Qᵀ and the copy back: 4 + 2r copy_-speed passes
POWERSGD_PASSES = (4, 2)
# Host (Python) time of a hook per bucket and step, beyond its kernels: rank 0's compress_seconds / steps in
# docs/bench-default/results.json (1-D CNN, 9.6k parameters, one bucket: the kernel work is ~38 kB a pass),
# 4 workers on 2 cores. EF is not in that run: CSER's figure (same exchange code). DDP's own allreduce: 0.
HOOK_OVERHEAD_S = {"dense": 0.0, "allreduce_hook": 0.77e-3, "fp16_compress_hook": 0.77e-3, "powerSGD_hook": 1.56e-3,
                   "EFState": 1.01e-3, "CSERState": 1.01e-3, "CompSkipState": 0.72e-3, "DistEFSGDMState": 5.24e-3,
                   "QsparseLocalSGDState": 0.62e-3, "QPRSGDState": 1.07e-3}
# assumed: each payload received by an allgather or all_to_all is unpacked and decoded by its own Python call
PER_PAYLOAD_S = 20e-6


@dataclass(frozen=True)
class Collective:
    """One collective: ``kind`` (cser_hooks.wire), ``nbytes`` handed by this rank (``pieces``: bytes to
    each rank, for an all_to_all), ``blocking``: waited for on the training thread (not overlapped)."""

    kind: str
    nbytes: int
    pieces: tuple[int, ...] = ()
    blocking: bool = False

    def wire_bytes(self, world: int, rank: int = 0) -> int:
        """Bytes this rank sends, by cser_hooks.wire: allreduce ⌊2(W−1)/W·n⌋, allgather (W−1)·n,
        all_to_all Σ_{j≠rank} n_j."""
        if self.kind == wire.ALLREDUCE:
            return wire.allreduce_bytes(self.nbytes, world)
        if self.kind == wire.ALLGATHER:
            return wire.allgather_bytes(self.nbytes, world)
        if self.kind == wire.ALL_TO_ALL:
            return wire.all_to_all_bytes(self.pieces, rank)
        raise ValueError(f"no wire model for collective kind {self.kind!r}")

    def hops(self, world: int) -> int:
        """Sequential message steps: ring allreduce 2(W−1) (reduce-scatter + allgather), ring allgather
        and pairwise all_to_all W−1; 0 at W = 1."""
        return 2 * (world - 1) if self.kind == wire.ALLREDUCE else world - 1


@dataclass(frozen=True)
class BucketWork:
    """A bucket's hook collectives; ``ready``: the share of the backward pass done when it is ready
    (its gradients and all before it, by parameter bytes)."""

    ready: float
    collectives: tuple[Collective, ...]


@dataclass(frozen=True)
class StepPlan:
    """One kind of step: hook collectives per bucket (ready order), collectives after the optimizer
    step (always blocking), compression work ((op, passes, bucket bytes), see costs.py) and host time
    (Python per bucket and per received payload, seconds)."""

    buckets: tuple[BucketWork, ...]
    post: tuple[Collective, ...] = ()
    work: tuple[tuple[str, float, int], ...] = ()
    host_s: float = 0.0

    @property
    def collectives(self) -> list[Collective]:
        return [c for b in self.buckets for c in b.collectives] + list(self.post)

    def wire_bytes(self, world: int, rank: int = 0) -> int:
        return sum(c.wire_bytes(world, rank) for c in self.collectives)

    def wire_by_kind(self, world: int, rank: int = 0) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.collectives:
            out[c.kind] = out.get(c.kind, 0) + c.wire_bytes(world, rank)
        return out


@dataclass(frozen=True)
class Traffic:
    """A method's steps: ``regular`` ones and, every ``period`` steps, an ``event`` step (CSER's reset,
    a model sync, CompSkip's send round) in its place; ``event`` None: every step is regular."""

    method: str
    world: int
    regular: StepPlan
    event: StepPlan | None = None
    period: int = 1
    dense_wire: int = 0
    summary: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def mean(self, f) -> float:
        """Mean of f(step plan) per step: ((H−1)·f(regular) + f(event)) / H."""
        if self.event is None:
            return float(f(self.regular))
        return ((self.period - 1) * f(self.regular) + f(self.event)) / self.period

    def wire_bytes_mean(self, rank: int = 0) -> float:
        return self.mean(lambda p: p.wire_bytes(self.world, rank))

    def events_in(self, start: int, stop: int, warmup: int = 1) -> int:
        """Steps s in [start, stop) that are event steps (s >= warmup, (s + 1) % period == 0)."""
        if self.event is None:
            return 0
        return sum(1 for s in range(max(start, warmup), stop) if (s + 1) % self.period == 0)


# -- buckets ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Bucket:
    shapes: tuple[tuple[int, ...], ...]
    n: int                  # elements
    segments: tuple[int, ...]
    ready: float


def _buckets(work: Workload) -> list[_Bucket]:
    out, done, total = [], 0, work.params
    for shapes in work.buckets():
        seg = [0]
        for s in shapes:
            seg.append(seg[-1] + numel(s))
        done += seg[-1]
        out.append(_Bucket(tuple(shapes), seg[-1], tuple(seg), done / total))
    return out


def _plan(buckets: list[_Bucket], per_bucket, post=()) -> StepPlan:
    """``per_bucket(b) -> (collectives, work passes)``; work passes are scaled by the bucket's bytes."""
    works, items = [], []
    for b in buckets:
        colls, passes = per_bucket(b)
        works.append(BucketWork(b.ready, tuple(colls)))
        items += [(op, m, 4 * b.n) for op, m in passes]
    post_colls, post_work = post if post else ((), ())
    return StepPlan(tuple(works), tuple(post_colls), tuple(items) + tuple(post_work))


# -- the methods --------------------------------------------------------------------------------

def _dense(buckets, elem_bytes: int = 4, passes=()) -> StepPlan:
    return _plan(buckets, lambda b: ([Collective(wire.ALLREDUCE, elem_bytes * b.n)], passes))


def _compressed_average(comp, b: _Bucket, world: int, feedback: bool, blocking: bool = False):
    """EF's exchange (docs/algorithms.md §2): collectives and passes for one bucket."""
    wb = comp.wire_bytes(b.n, _f32(), list(b.segments))
    # the non-finite check (none where the payload shows every NaN/Inf: top_k, qsgd, sign), EF's e += g
    extra = (0 if comp.nonfinite_in_payload else 1) + (1 if feedback else 0)
    if comp.linear:
        flag = _elem_size(getattr(comp, "wire_dtype", None))
        passes = C.copies(extra + 1) + C.encode_passes(comp, b.n) + C.decode_passes(comp, b.n)  # + zero fill
        return [Collective(wire.ALLREDUCE, wb + flag, blocking=blocking)], passes
    passes = C.copies(extra + 1) + C.encode_passes(comp, b.n) + C.scaled(C.decode_passes(comp, b.n), world)
    return [Collective(wire.ALLGATHER, 4 + wb, blocking=blocking)], passes


def _ef(buckets, world, compressor, error_feedback=True, **_):
    comp = _compressor(compressor)
    return _plan(buckets, lambda b: _compressed_average(comp, b, world, bool(error_feedback))), None, 1


def _cser(buckets, world, c1, c2="identity", period=16, momentum=0.0, **_):
    c1, c2 = _compressor(c1), _compressor(c2)
    mom = C.copies(2) if momentum else ()

    def step(b):
        if c1.sends_nothing:
            return [], C.copies(1) + mom
        if c1.linear:  # overwrite: the selected blocks' average over the local gradient, no zero fill
            wb = c1.wire_bytes(b.n, _f32(), list(b.segments)) + _elem_size(getattr(c1, "wire_dtype", None))
            return ([Collective(wire.ALLREDUCE, wb)],
                    C.copies(2) + mom + C.encode_passes(c1, b.n) + C.decode_passes(c1, b.n))
        colls, passes = _compressed_average(c1, b, world, feedback=False)
        return colls, passes + C.copies(2) + mom  # r = g − C1(g) kept and added back

    regular = _plan(buckets, step)
    reset_bytes = sum(c2.wire_bytes(b.n, _f32(), list(b.segments)) for b in buckets)
    reset_work = tuple((op, m, 4 * b.n) for b in buckets
                       for op, m in C.copies(2) + C.encode_passes(c2, b.n) + C.decode_passes(c2, b.n))
    post = ((Collective(wire.ALLREDUCE, reset_bytes, blocking=True),), reset_work) if reset_bytes else ()
    event = _plan(buckets, step, post)
    return regular, event, int(period)


def _compskip(buckets, world, compressor, send_every=None, **_):
    comp = _compressor(compressor)
    k = int(send_every or 2)
    skip = _plan(buckets, lambda b: ([], C.copies(2)))  # reserve += g ; ĝ = 0
    send = _plan(buckets, lambda b: (lambda cp: (cp[0], cp[1] + C.copies(2)))(
        _compressed_average(comp, b, world, feedback=True)))
    return (send, None, 1) if k == 1 else (skip, send, k)


def chunk_nbytes(n: int, world: int, segments, block: int | None) -> list[int]:
    """dist-EF-SGDM's packed chunk payloads (docs/algorithms.md §6): chunk r = [min(r⌈N/W⌉, N),
    min((r+1)⌈N/W⌉, N)), blocks = the fixed blocks of b or the tensors, cut at the chunk's ends;
    bytes = 4·blocks + ⌈len/8⌉ (an empty chunk: 0). The same figures as
    ``cser_hooks.algorithms.dist_ef_sgdm.chunk_plan(...).nbytes``, counted in O(W log T)."""
    c = math.ceil(n / world)
    cuts = sorted(set(segments)) if segments is not None else [0]
    out = []
    for r in range(world):
        a, b = min(r * c, n), min((r + 1) * c, n)
        if b <= a:
            out.append(0)
            continue
        if block is not None:
            inner = (b - 1) // block - a // block
        else:
            inner = bisect.bisect_left(cuts, b) - bisect.bisect_right(cuts, a)
        out.append(4 * (inner + 1) + (b - a + 7) // 8)
    return out


def _dist_ef_sgdm(buckets, world, compressor="sign_blockwise", **_):
    comp = _compressor(compressor)
    block = comp.block
    ef_op, dec_op = C.sign_rows(block)

    def step(b):
        pieces = tuple(chunk_nbytes(b.n, world, b.segments, block))
        colls = [Collective(wire.ALL_TO_ALL, sum(pieces), pieces, blocking=True),
                 Collective(wire.ALLGATHER, 4 + max(pieces))]
        # m (1), e (2); the encodes of p and of the server's chunk; 2 decodes (the server's accumulates into ẽ)
        passes = C.copies(3) + ((ef_op, 1 + 1 / world), (dec_op, 2.0))
        return colls, passes
    return _plan(buckets, step), None, 1


def _model_sync(buckets, world, comp, period, sync_copies):
    """Qsparse / QPRSGD (all-reduce mode): local steps; every ``period`` steps the hook's 4-byte non-finite
    flag allreduce per bucket (a synchronization follows) and one blocking allgather of [flag, payload]
    per bucket after the optimizer step."""
    local = _plan(buckets, lambda b: ([], C.copies(2)))  # flat_params, non-finite check
    colls = tuple(Collective(wire.ALLGATHER, 4 + comp.wire_bytes(b.n, _f32(), list(b.segments)), blocking=True)
                  for b in buckets)
    work = tuple((op, m, 4 * b.n) for b in buckets for op, m in
                 C.copies(sync_copies) + C.encode_passes(comp, b.n) + C.scaled(C.decode_passes(comp, b.n), world))
    flag = [Collective(wire.ALLREDUCE, 4)]
    return local, _plan(buckets, lambda b: (flag, C.copies(2)), (colls, work)), int(period)


def _qsparse(buckets, world, compressor, period=8, **_):
    if isinstance(period, (list, tuple)):
        raise ValueError("qsparse: only the synchronous schedule (one period) is modelled")
    return _model_sync(buckets, world, _compressor(compressor), period, 7)


def _qprsgd(buckets, world, compressor="qsgd:s=15,block=64", period=4, mode="allreduce", **_):
    if mode != "allreduce":
        raise ValueError("qprsgd: only mode='allreduce' is modelled")
    # the round's passes besides Q and its decodes: the flat copy, x − x_last, ‖x − x_last‖, e += ..., ‖Δ‖,
    # ‖e‖ after Q, the write back
    return _model_sync(buckets, world, _compressor(compressor), period, 7)


def _powersgd(buckets, rank: int):
    def step(b):
        unc = p = q = 0
        for s in b.shapes:
            rows = s[0] if s else 1
            cols = numel(s) // rows if rows else 0
            r = min(rows, cols, rank)
            if (rows + cols) * r * POWERSGD_MIN_COMPRESSION_RATE < rows * cols:
                p, q = p + rows * r, q + cols * r
            else:
                unc += numel(s)
        colls = [Collective(wire.ALLREDUCE, 4 * x) for x in (unc, p, q) if x]
        share = 1 - unc / b.n
        return colls, C.copies((POWERSGD_PASSES[0] + POWERSGD_PASSES[1] * rank) * share + 2 * (1 - share))
    return _plan(buckets, step), None, 1


def _f32():
    import torch

    return torch.float32


def _elem_size(dtype) -> int:
    return 4 if dtype is None else dtype.itemsize


def _compressor(spec):
    from ..compressors import get_compressor

    return get_compressor(spec)
