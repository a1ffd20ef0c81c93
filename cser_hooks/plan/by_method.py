"""Bench method name → its modelled :class:`~cser_hooks.plan.collectives.Traffic` (the dispatch).

:func:`traffic` reads the benchmark's own parsed entry (``cser_hooks.bench.methods``) — the state class
and compressor specs from the closure of its ``make`` — and hands them to the per-algorithm step plans
of :mod:`cser_hooks.plan.collectives`, adding the hook's host time per bucket.
"""
from __future__ import annotations

import inspect
from dataclasses import replace

from .. import wire
from ..bench import methods as bench_methods
from . import costs as C
from .collectives import (
    HOOK_OVERHEAD_S,
    PER_PAYLOAD_S,
    StepPlan,
    Traffic,
    _buckets,
    _compskip,
    _cser,
    _dense,
    _dist_ef_sgdm,
    _ef,
    _powersgd,
    _qprsgd,
    _qsparse,
)
from .workload import Workload


def with_host_time(plan: StepPlan, per_bucket_s: float, world: int) -> StepPlan:
    """host_s = buckets · per_bucket_s + W · PER_PAYLOAD_S per allgather / all_to_all (0 for DDP's own)."""
    if not per_bucket_s:
        return plan
    gathers = sum(1 for c in plan.collectives if c.kind in (wire.ALLGATHER, wire.ALL_TO_ALL))
    return replace(plan, host_s=len(plan.buckets) * per_bucket_s + gathers * world * PER_PAYLOAD_S)


OURS = {"EFState": _ef, "CSERState": _cser, "CompSkipState": _compskip, "DistEFSGDMState": _dist_ef_sgdm,
        "QsparseLocalSGDState": _qsparse, "QPRSGDState": _qprsgd}



def describe(method: bench_methods.Method, block: int) -> tuple[str, dict]:
    """(state class name or torch hook kind, resolved keyword arguments) of a bench method entry:
    read from the closure of its ``make`` (cser_hooks/bench/methods.py), the callables of the block
    size resolved with ``block``."""
    if method.make is bench_methods._dense:
        return "dense", {}
    free = inspect.getclosurevars(method.make).nonlocals
    if "state_name" in free:
        kw = {k: (v(block) if callable(v) else v) for k, v in free.get("kwargs", {}).items()}
        return free["state_name"], kw
    if "hook_name" in free:
        return free["hook_name"], {}
    if set(free) == {"rank"}:
        return "powerSGD_hook", {"rank": int(free["rank"])}
    raise ValueError(f"method {method.name!r}: no traffic model (unrecognised bench entry)")


def traffic(name: str, work: Workload, world: int) -> Traffic:
    """The modelled traffic of bench method ``name`` on ``work`` with ``world`` ranks."""
    method = bench_methods.get(name)
    if method.bucket_cap_mb is not None:
        work = work.with_cap(method.bucket_cap_mb)
    buckets = _buckets(work)
    kind, kw = describe(method, work.random_block)
    event, period = None, 1
    if kind in ("dense", "allreduce_hook"):
        regular = _dense(buckets)
    elif kind == "fp16_compress_hook":
        regular = _dense(buckets, 2, C.copies(0) + (("fp16", 2.0),))
    elif kind == "powerSGD_hook":
        regular, event, period = _powersgd(buckets, kw["rank"])
    elif kind in OURS:
        regular, event, period = OURS[kind](buckets, world, **kw)
    else:
        raise ValueError(f"method {name!r}: no traffic model for {kind}")
    regular = with_host_time(regular, HOOK_OVERHEAD_S[kind], world)
    event = with_host_time(event, HOOK_OVERHEAD_S[kind], world) if event is not None else None
    dense_wire = wire.dense_allreduce_bytes(4 * sum(b.n for b in buckets), world)  # as stats() reports it
    notes = ("buckets: " + ", ".join(f"{b.n:,}" for b in buckets) + " elements",)
    return Traffic(name, world, regular, event, period, dense_wire, method.summary, notes)
