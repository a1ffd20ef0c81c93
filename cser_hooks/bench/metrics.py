"""The evaluation metric of a benchmark run, and its direction (no torch import: the CLI and report use it).

    acc       test accuracy of the classification models (cnn, mlp, mlp-wide): higher is better; the
              target is an accuracy (``--target``, default per model and data set).
    val_loss  validation loss of the language model (gpt): mean next-byte cross-entropy in nats over a
              fixed set of validation windows, lower is better, also shown as bits per byte (loss / ln 2);
              the target is dense's final validation loss + ``--target-margin`` (or ``--target`` nats).

Everything that compares a value with a target, picks the best value or labels a column or an axis
goes through :class:`Metric`, so the report and the worker need no per-model branches.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    """One metric column of the main table: ``header``, the row key it shows, a scale and a format."""

    header: str
    key: str
    scale: float = 1.0
    fmt: str = "{:.1f}"


@dataclass(frozen=True)
class Metric:
    key: str                                 # curve-point / result key: curve[i][key], row[f"{key}_final"]
    name: str                                # "accuracy", "validation loss" (the report's "Target <name>")
    higher_is_better: bool
    axis_label: str                          # plot axis
    axis_scale: float                        # plotted value = value * axis_scale
    columns: tuple[Column, ...]              # the metric's columns of the main table
    derived: tuple[tuple[str, float], ...] = ()  # (name, factor): row[f"{name}_{x}"] = row[f"{key}_{x}"] * factor
    unit: str = ""                           # of value * axis_scale
    value_fmt: str = "{:.1f}"

    def reached(self, value: float | None, target: float | None) -> bool:
        """Whether ``value`` is at or beyond ``target`` in the metric's direction."""
        if value is None or target is None:
            return False
        return value >= target if self.higher_is_better else value <= target

    def best(self, values: Iterable[float | None]) -> float | None:
        vals = [v for v in values if v is not None]
        if not vals:
            return None
        return max(vals) if self.higher_is_better else min(vals)

    def format(self, value: float | None) -> str:
        """``value`` as the report prints a target: ``90.0 %`` or ``2.345 nats (3.383 bits/byte)``."""
        if value is None:
            return "n/a"
        extra = "".join(f" ({self.value_fmt.format(value * f)} {n})" for n, f in self.derived)
        return f"{self.value_fmt.format(value * self.axis_scale)} {self.unit}{extra}"

    def plot_names(self) -> tuple[str, ...]:
        return (f"{self.key}_vs_step.png", f"{self.key}_vs_time.png", "bytes_per_step.png")


ACC_KEY = "acc"
BITS_PER_NAT = 1 / math.log(2)

ACCURACY = Metric(ACC_KEY, "accuracy", True, "test accuracy (%)", 100.0,
                  (Column("final acc %", "acc_final", 100.0), Column("avg-model acc %", "acc_avg", 100.0)),
                  unit="%")
VAL_LOSS = Metric("val_loss", "validation loss", False, "validation loss (nats/byte)", 1.0,
                  (Column("final val loss", "val_loss_final", fmt="{:.3f}"),
                   Column("final bpb", "bpb_final", fmt="{:.3f}"),
                   Column("best val loss", "val_loss_best", fmt="{:.3f}"),
                   Column("avg-model val loss", "val_loss_avg", fmt="{:.3f}")),
                  derived=(("bpb", BITS_PER_NAT),), unit="nats", value_fmt="{:.3f}")
METRICS = {m.key: m for m in (ACCURACY, VAL_LOSS)}
MODEL_METRIC = {"gpt": VAL_LOSS}  # every other model: ACCURACY


def for_model(model: str) -> Metric:
    return MODEL_METRIC.get(model, ACCURACY)


def get(key: str | None) -> Metric:
    """The metric named ``key`` (``None``: accuracy, what reports written before metrics existed used)."""
    return METRICS[key or ACC_KEY]
