"""Progress bars of a benchmark run: one tqdm bar per method on stderr, fed by rank 0's progress lines."""
from __future__ import annotations

import sys
import time

from . import metrics


class BarUI:
    """A tqdm bar per method (on stderr), updated from rank 0's progress lines."""

    def __init__(self, steps: int, metric: metrics.Metric = metrics.ACCURACY):
        self.steps = steps
        self.metric = metric
        self.bars = {}
        self.t0 = {}

    def _bar(self, name):
        from tqdm import tqdm

        if name not in self.bars:
            self.bars[name] = tqdm(total=self.steps, desc=f"{name:>12}", unit="step", file=sys.stderr,
                                   mininterval=0.5, dynamic_ncols=True, leave=True)
            self.t0[name] = time.monotonic()
        return self.bars[name]

    def start(self, name):
        self._bar(name)

    def progress(self, name, msg):
        bar = self._bar(name)
        if "step" in msg:
            bar.update(max(0, msg["step"] - bar.n))
        if msg.get(self.metric.key) is not None:
            bar.set_postfix_str(f"{self.metric.key} {self.metric.format(msg[self.metric.key])}")

    def end(self, name, outcome):
        bar = self._bar(name)
        if "results" in outcome:
            value = outcome["results"][0][f"{self.metric.key}_final"]
            bar.set_postfix_str(f"{self.metric.key} {self.metric.format(value)}, "
                                f"{time.monotonic() - self.t0[name]:.0f} s")
        else:
            bar.set_postfix_str("unavailable" if outcome.get("unavailable") else "FAILED")
        bar.close()
        if "results" not in outcome:
            bar.write(f"{name}: {outcome['error']}", file=sys.stderr)
