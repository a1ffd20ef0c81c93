"""estimate / recommend / extrapolate / gain_line: the planner's entry points (see the package docstring)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from . import costs as costs_mod
from . import workload as wl
from .by_method import traffic
from .timing import Link, Prediction, predict, rate_text

# dense first (the baseline); the bench's names (cser_hooks/bench/methods.py)
DEFAULT_METHODS = ("dense", "fp16", "powersgd", "ef-topk", "ef-rb", "cser-32", "cser-256", "m-cser",
                   "dist-ef-sgdm", "qsparse", "qprsgd", "compskip")
MARGIN = 0.05          # recommend compression only when it is at least 5 % faster than dense
EXTRAPOLATE_WORLDS = (8, 32, 128, 1024)
EXTRAPOLATE_RATES = ("1gbit", "10gbit", "100gbit")


def as_workload(model, compute_s: float | None = None, **kw) -> wl.Workload:
    """A :class:`~cser_hooks.plan.workload.Workload` from a Workload, an ``nn.Module``, a parameter count
    (int) or a sequence of bucket sizes (elements)."""
    if isinstance(model, wl.Workload):
        return replace(model, **({"compute_s": compute_s} if compute_s is not None else {}), **kw)
    if compute_s is None:
        raise ValueError("estimate: give compute_s, the measured step time without communication (seconds)")
    if hasattr(model, "parameters"):
        return wl.from_module(model, compute_s, **kw)
    if isinstance(model, int):
        return wl.from_params(model, compute_s, **kw)
    if isinstance(model, Sequence):
        return wl.from_bucket_sizes([int(n) for n in model], compute_s, **kw)
    raise TypeError(f"estimate: model must be a Workload, nn.Module, int or bucket sizes, got {type(model).__name__}")


def estimate(model, link: Link | str, world_size: int, compute_s: float | None = None,
             methods: Iterable[str] = DEFAULT_METHODS, costs: costs_mod.Costs | None = None, rank: int = 0,
             **workload_kw) -> list[Prediction]:
    """Predicted step time of each method (dense first, always: the baseline of ``speedup``).

    ``model``: Workload, nn.Module, parameter count or bucket sizes (``as_workload``); ``link``: a
    :class:`Link` or a rate string ('1gbit'); ``compute_s``: forward + backward + optimizer time
    measured without communication; ``workload_kw``: bucket_cap_mb, backward_share, block.
    Each step: compute + compression + blocking collectives + max(0, hook communication − what the
    backward pass hides); see cser_hooks/plan/timing.py for the formulas and docs/plan.md.
    """
    work = as_workload(model, compute_s, **workload_kw)
    link = Link.parse(link) if isinstance(link, str) else link
    costs = costs or costs_mod.load()
    names = ["dense"] + [m for m in dict.fromkeys(methods) if m != "dense"]
    preds = [predict(traffic(n, work, world_size), link, work.compute_s, work.backward_share, costs, rank)
             for n in names]
    base = preds[0].step_s
    return [replace(p, speedup=base / p.step_s if p.step_s else float("inf")) for p in preds]


def recommend(preds: Sequence[Prediction], margin: float = MARGIN) -> tuple[Prediction, str]:
    """The fastest method, unless no compressed one beats dense by ``margin``: then dense."""
    dense = next(p for p in preds if p.method == "dense")
    best = min(preds, key=lambda p: p.step_s)
    where = f"W={dense.world}, {rate_text(dense.link.bandwidth_bps)}"
    if best.method == "dense" or best.step_s > dense.step_s * (1 - margin):
        runner = min((p for p in preds if p.method != "dense"), key=lambda p: p.step_s, default=None)
        alt = f" (best compressed: {runner.method}, {runner.speedup:.2f}x)" if runner else ""
        return dense, (f"recommendation: dense allreduce is faster here ({where}): no method saves "
                       f"{100 * margin:.0f} % of dense's {1e3 * dense.step_s:.1f} ms step{alt}")
    return best, (f"recommendation: {best.method} ({where}): {1e3 * best.step_s:.1f} ms per step vs dense "
                  f"{1e3 * dense.step_s:.1f} ms, {best.speedup:.2f}x faster per step (modelled; compressed "
                  f"methods may need more steps to the same accuracy)")


def extrapolate(model, world_sizes: Iterable[int] = EXTRAPOLATE_WORLDS,
                rates: Iterable[str] = EXTRAPOLATE_RATES, latency: str = "50us",
                overhead: float | None = None, sync: str = "0us", **kw) -> list[dict]:
    """MODELLED ("on paper") grid: for each (W, rate) the predictions of :func:`estimate`; one dict per
    cell: world, rate, predictions, best (the :func:`recommend` choice)."""
    extra = {} if overhead is None else {"overhead": overhead}
    cells = []
    for w in world_sizes:
        for r in rates:
            preds = estimate(model, Link.parse(r, latency, sync=sync, **extra), int(w), **kw)
            best, _ = recommend(preds)
            cells.append({"world": int(w), "rate": r, "predictions": preds, "best": best})
    return cells


def gain_line(stats: Mapping, link: Link | str, compute_s: float, world_size: int | None = None,
              dense_collectives: int = 1) -> str:
    """A one-line log, from a state's ``stats()``: predicted step on ``link`` vs dense allreduce.

    Per step (totals / ``step``): method = compute_s + compress_seconds + wire_bytes·(1+overhead)/B
    + σ · min(1, collectives per step) [+ collectives · 2(W−1) · α when ``world_size`` is given]; dense
    = compute_s + dense_wire_bytes · (1+overhead)/B + σ [+ dense_collectives · 2(W−1) · α]. No overlap
    (conservative for both), wire bytes from the state's own ring model (cser_hooks/wire.py); totals
    include the warm-up step."""
    link = Link.parse(link) if isinstance(link, str) else link
    steps = max(1, int(stats.get("step") or 1))
    bps = link.bandwidth_bps / 8 / (1 + link.overhead)
    hops = 2 * (world_size - 1) * link.latency_s if world_size else 0.0
    wire_b = stats.get("wire_bytes_total", 0) / steps
    dense_b = stats.get("dense_wire_bytes_total", 0) / steps
    comp = (stats.get("compress_seconds") or 0.0) / steps
    t = compute_s + comp + wire_b / bps + hops * stats.get("collectives_total", 0) / steps \
        + link.sync_s * min(1.0, stats.get("collectives_total", 0) / steps)
    t_dense = compute_s + dense_b / bps + hops * dense_collectives + link.sync_s
    gain = t_dense / t if t else float("inf")
    return (f"cser_hooks: predicted on {rate_text(link.bandwidth_bps)}: {1e3 * t:.1f} ms/step vs dense "
            f"{1e3 * t_dense:.1f} ms ({gain:.2f}x; wire {wire_b / 1e6:.3g} MB vs {dense_b / 1e6:.3g} MB per step; "
            f"modelled, no overlap)")

