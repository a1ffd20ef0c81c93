"""The benchmark's PNG plots (matplotlib, imported when they are drawn): the metric against steps and
against training time per method, and the bytes per step."""
from __future__ import annotations

from pathlib import Path

from .metrics import ACCURACY, Metric


def plots(rows: list[dict], out_dir: Path, target: float | None = None, metric: Metric = ACCURACY) -> list[Path]:
    """<metric>_vs_step.png, <metric>_vs_time.png (rank 0's metric: acc_vs_step.png, ... for accuracy) and
    bytes_per_step.png (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [s for s in rows if s["status"] == "ok"]
    paths = []
    by_step, by_time, _ = metric.plot_names()
    scale = metric.axis_scale
    for fname, key, xlabel in ((by_step, "step", "step"),
                               (by_time, "time", "training wall time (s, evaluation excluded)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for s in ok:
            pts = [p for p in s["curve"] if p.get(metric.key) is not None]
            ax.plot([p[key] for p in pts], [scale * p[metric.key] for p in pts], label=s["method"],
                    marker=".", markersize=4)
        if target is not None:
            ax.axhline(scale * target, color="grey", linestyle="--", linewidth=1, label="target")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric.axis_label)
        ax.grid(alpha=0.3)
        if ok:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=100)
        plt.close(fig)
        paths.append(out_dir / fname)
    fig, ax = plt.subplots(figsize=(7, 1.0 + 0.4 * max(1, len(ok))))
    names = [s["method"] for s in ok]
    vals = [max(s.get("wire_bytes_per_step") or s["bytes_per_step"] or 0, 1) / 1e3 for s in ok]
    ax.barh(names, vals)
    ax.set_xscale("log")
    if vals:
        ax.set_xlim(min(vals) / 2, max(vals) * 8)
    ax.invert_yaxis()
    ax.set_xlabel("kB on the wire per worker per step (ring model, log scale)")
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:,.1f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "bytes_per_step.png", dpi=100)
    plt.close(fig)
    paths.append(out_dir / "bytes_per_step.png")
    return paths


# -- self-check ----------------------------------------------------------------------------------
