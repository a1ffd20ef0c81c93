"""Step time of a method: compute + compression + the communication the backward pass cannot hide.

Per collective (ring / pairwise model, cser_hooks/wire.py):

    t_coll = hops · α + wire_bytes · (1 + overhead) / B      (+ σ on a step's first collective)

with B the link rate per worker in bytes/s (full duplex: a rank sends and receives at B at once),
α the per-message latency, σ (``sync_s``, default 0) a fixed cost per step that communicates: the
ranks' arrival skew, paid where they first meet in the step (the collectives after it find them
aligned), which no byte count shows (measured as the step of a method that allreduces a few bytes
every step minus the no-communication floor; docs/plan.md), hops = 2(W−1)
for a ring allreduce, W−1 for a ring allgather and a pairwise all_to_all, and ``overhead`` the
protocol bytes on top of the payload (TCP/IP headers, ACKs, gloo's framing; default 0.056, the
dense row of docs/bench-link-100mbit: veth bytes +5.6 % over the ring model).

Per step (one step plan, collectives.py), with T = compute_s (forward + backward + optimizer, measured
without communication) and T_b = backward_share · T:

* buckets become ready during the backward pass at r_i = T_b · F_i, F_i the share of the gradient
  bytes in buckets 0..i (gradients in reverse layer order, backward time ∝ parameters);
* DDP's hook collectives run one after another on the communication channel: e_i = max(r_i, e_{i−1})
  + Σ t_coll of bucket i (e_{−1} = 0); the part not hidden by the backward pass is
  exposed = max(0, e_last − T_b);
* collectives waited for on the training thread (dist-EF-SGDM's all_to_all inside the hook, every
  model-side sync after ``optimizer.step()``: CSER's reset, Qsparse, QPRSGD) add in full: blocking;
* compression (encode + decode kernels, costs.py, and the hook's host time per bucket, collectives.py)
  runs on the training thread and adds in full;

    step = T + compress + blocking + exposed

and the mean over a period of H steps with one event step (reset / sync / send round):
mean = ((H − 1) · step_regular + step_event) / H. With one bucket ready at the end of the backward
pass (F = 1) nothing overlaps: step = T + compress + Σ t_coll.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..bench import netns
from .collectives import Collective, StepPlan, Traffic
from .costs import Costs

DEFAULT_LATENCY_S = 50e-6
DEFAULT_OVERHEAD = 0.056   # docs/bench-link-100mbit/report.md, dense: veth tx bytes / ring-model bytes − 1


@dataclass(frozen=True)
class Link:
    """One worker's link: ``bandwidth_bps`` bits/s each way, ``latency_s`` per message, ``overhead``:
    protocol bytes per payload byte, ``sync_s``: fixed seconds per communicating step (σ, module
    docstring; :func:`step_time` adds it, not :meth:`seconds`)."""

    bandwidth_bps: float
    latency_s: float = DEFAULT_LATENCY_S
    overhead: float = DEFAULT_OVERHEAD
    sync_s: float = 0.0

    def __post_init__(self):
        if not self.bandwidth_bps > 0 or self.latency_s < 0 or self.overhead < 0 or self.sync_s < 0:
            raise ValueError(f"Link: need bandwidth > 0, latency >= 0, overhead >= 0, sync >= 0, got {self}")

    @classmethod
    def parse(cls, rate: str, latency: str = "50us", overhead: float = DEFAULT_OVERHEAD, sync: str = "0us") -> Link:
        """``Link.parse("100mbit", "50us")``: rates as tc writes them (kbit, mbit, gbit: bits/s)."""
        return cls(netns.parse_rate(rate), parse_duration(latency), overhead, parse_duration(sync, "sync"))

    def describe(self) -> str:
        sync = f", {self.sync_s * 1e3:g} ms sync per step" if self.sync_s else ""
        return f"{rate_text(self.bandwidth_bps)}, {self.latency_s * 1e6:g} us latency, " \
               f"+{100 * self.overhead:g} % protocol bytes{sync}"

    def seconds(self, c: Collective, world: int, rank: int = 0) -> float:
        """t_coll = hops · α + wire_bytes · (1 + overhead) / (B / 8)."""
        if world <= 1:
            return 0.0
        return c.hops(world) * self.latency_s + c.wire_bytes(world, rank) * (1 + self.overhead) * 8 / self.bandwidth_bps


def parse_duration(text: str, what: str = "latency") -> float:
    """Seconds of '50us', '1ms', '0.1s' (``what`` names the input in the error)."""
    m = netns.DELAY_RE.match(text.strip().lower())
    if not m:
        raise ValueError(f"{what} {text!r}: give a duration like 50us, 1ms or 0.1s")
    return float(m[1]) / {"us": 1e6, "ms": 1e3, "s": 1.0}[m[2]]


def rate_text(bps: float) -> str:
    for unit, div in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= div:
            return f"{bps / div:g} {unit}"
    return f"{bps:g} bit/s"


@dataclass(frozen=True)
class StepTime:
    """One step plan's time, split: ``comm_s`` every collective in full (nothing hidden), ``exposed_s``
    the hook collectives the backward pass does not hide, ``blocking_s``, ``compress_s``, ``step_s``."""

    comm_s: float
    exposed_s: float
    blocking_s: float
    compress_s: float
    step_s: float


def step_time(plan: StepPlan, link: Link, world: int, compute_s: float, backward_share: float, costs: Costs,
              rank: int = 0) -> StepTime:
    """step = T + compress + blocking + max(0, e_last − T_b) (module docstring); σ rides on the step's
    first collective."""
    t_back = backward_share * compute_s
    end = blocking = total = 0.0
    sync = link.sync_s if world > 1 else 0.0
    for b in plan.buckets:
        for c in b.collectives:
            t, sync = link.seconds(c, world, rank) + sync, 0.0
            total += t
            if c.blocking:
                blocking += t
            else:
                end = max(end, b.ready * t_back) + t
    for c in plan.post:
        t, sync = link.seconds(c, world, rank) + sync, 0.0
        total += t
        blocking += t
    exposed = max(0.0, end - t_back)
    compress = sum(costs.seconds(op, nbytes, m) for op, m, nbytes in plan.work) + plan.host_s
    return StepTime(total, exposed, blocking, compress, compute_s + compress + blocking + exposed)


@dataclass(frozen=True)
class Prediction:
    """A method's modelled step on one link (means per step over a period, this rank's figures).

    ``regular_s`` / ``event_s``: the step time without / with the periodic event (reset, sync, send
    round; equal when there is none) every ``period`` steps; ``step_s`` their mean;
    ``speedup``: dense's step_s / this step_s."""

    method: str
    world: int
    link: Link
    wire_bytes: float
    wire_by_kind: dict
    dense_wire_bytes: int
    collectives: float
    comm_s: float
    exposed_s: float
    blocking_s: float
    compress_s: float
    compute_s: float
    step_s: float
    regular_s: float
    event_s: float
    period: int
    speedup: float = 1.0
    summary: str = ""

    def window_s(self, traffic: Traffic, start: int, stop: int, warmup: int = 1) -> float:
        """Modelled time of steps [start, stop) (every step post warm-up): the event steps among them at
        event_s, the others at regular_s."""
        k = traffic.events_in(start, stop, warmup)
        return k * self.event_s + (stop - start - k) * self.regular_s


def predict(tr: Traffic, link: Link, compute_s: float, backward_share: float, costs: Costs, rank: int = 0
            ) -> Prediction:
    """The :class:`Prediction` of one method's traffic (speedup filled in by :func:`estimate`)."""
    world = tr.world
    reg = step_time(tr.regular, link, world, compute_s, backward_share, costs, rank)
    ev = step_time(tr.event, link, world, compute_s, backward_share, costs, rank) if tr.event else reg
    h = tr.period if tr.event else 1
    mean = lambda a, b: ((h - 1) * a + b) / h  # noqa: E731
    by_kind: dict[str, float] = {}
    for plan, weight in ((tr.regular, (h - 1) / h if tr.event else 1.0), (tr.event, 1 / h)):
        if plan is None:
            continue
        for k, v in plan.wire_by_kind(world, rank).items():
            by_kind[k] = by_kind.get(k, 0.0) + weight * v
    return Prediction(
        tr.method, world, link, tr.wire_bytes_mean(rank), by_kind, tr.dense_wire,
        tr.mean(lambda p: len(p.collectives)), mean(reg.comm_s, ev.comm_s), mean(reg.exposed_s, ev.exposed_s),
        mean(reg.blocking_s, ev.blocking_s), mean(reg.compress_s, ev.compress_s), compute_s,
        mean(reg.step_s, ev.step_s), reg.step_s, ev.step_s, h, summary=tr.summary)
