"""Opt-in: one line, in the user's own job, saying whether the hook pays on their link (``log_gain=``).

    state = CSERState(..., log_gain={"link": "1gbit", "compute_ms": 120})

After ``steps`` compressed steps (default 2H for CSER's period H, else 16) rank 0 prints one line
to stderr (and keeps it as ``state.gain.line``): the state's *measured* per-step figures over those
steps — wire bytes by its own ring model, collectives, time inside the hook — put into the cost
model's per-step formula on ``link`` (:func:`cser_hooks.plan.gain_line`: compute + compress + wire
bytes / bandwidth + hops · latency, no overlap) against DDP's dense ring allreduce of the same
buckets. ``compute_ms`` is the user's measured step time without communication (forward, backward,
optimizer); ``link`` a rate as tc writes it ("100mbit", "10gbit"), optionally ``latency`` ("50us").
The warm-up steps are left out (they are dense). Nothing is communicated for it.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping

_KEYS = {"link", "compute_ms", "latency", "steps"}
_TOTALS = ("wire_bytes_total", "dense_wire_bytes_total", "compress_seconds", "collectives_total")


class GainReport:
    """The ``log_gain`` knob: validated at construction, observed at each step's end."""

    __slots__ = ("link", "compute_s", "steps", "base", "line")

    def __init__(self, who: str, spec, period=0):
        from .plan.timing import Link  # lazy: only when the knob is used

        if not isinstance(spec, Mapping) or not {"link", "compute_ms"} <= set(spec) or set(spec) - _KEYS:
            raise ValueError(f"{who}: log_gain must be None or a dict with 'link' (e.g. '1gbit') and 'compute_ms' "
                             f"(your step time without communication), optionally 'latency' ('50us') and "
                             f"'steps'; got {spec!r}")
        try:
            self.link = Link.parse(str(spec["link"]), str(spec.get("latency", "50us")))
            self.compute_s = float(spec["compute_ms"]) / 1e3
        except (TypeError, ValueError, SystemExit) as e:
            raise ValueError(f"{who}: log_gain: {e}") from None
        steps = spec.get("steps", 2 * period if isinstance(period, int) and period > 0 else 16)
        if not (self.compute_s > 0 and isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
            raise ValueError(f"{who}: log_gain needs compute_ms > 0 and steps an integer >= 1, got {spec!r}")
        self.steps = steps
        self.base: dict | None = None
        self.line: str | None = None

    def observe(self, state) -> None:
        """After ``state.step`` advanced: note the totals at the end of warm-up, report ``steps`` later."""
        if self.line is not None or state.step < state.warmup_steps:
            return
        if self.base is None:
            self.base = _totals(state.stats())
            return
        if state.step - state.warmup_steps < self.steps:
            return
        from .plan.api import gain_line

        now = _totals(state.stats())
        window = {k: now[k] - self.base[k] for k in _TOTALS}
        window["step"] = self.steps
        self.line = gain_line(window, self.link, self.compute_s, state.comm.world_size) + \
            f" [measured over steps {state.warmup_steps}..{state.step - 1}]"
        if state.comm.rank == 0:
            print(self.line, file=sys.stderr, flush=True)


def _totals(stats: Mapping) -> dict:
    return {k: stats.get(k) or 0 for k in _TOTALS}
