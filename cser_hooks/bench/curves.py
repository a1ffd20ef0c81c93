"""Reading a method's results.json row: the mean training step time over a window of its curve.

The curve has a point at every evaluation: ``{"step", "time", <metric>}`` where ``time`` is rank 0's
training clock (evaluation is outside it). A window [start, end) that starts after the first steps
leaves out DDP's bucket rebuild and the first-call costs; one that spans whole reset periods puts the
resets' cost into the mean.
"""
from __future__ import annotations


def step_time(row: dict, start: int, end: int | None = None) -> float | None:
    """(time@end − time@start) / (end − start); end defaults to the last point. None where the curve has
    no point at start or end."""
    at = {p["step"]: p["time"] for p in row.get("curve", [])}
    end = max(at, default=None) if end is None else end
    if start not in at or end not in at or end <= start:
        return None
    return (at[end] - at[start]) / (end - start)
