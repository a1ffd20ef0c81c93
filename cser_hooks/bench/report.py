"""Summaries, the markdown report, the PNG plots, and the ``--quick`` self-check of the output.

Per method (from the W ``rank<R>.json`` of :mod:`cser_hooks.bench.worker`):
  * final / rank-averaged-model test accuracy (rank 0's model; the average differs for local methods);
  * steps and training seconds to the first evaluation at or above ``--target``;
  * bytes per worker per step over the steady-state window, averaged over ranks, two ways: *handed*
    (``stats()["bytes_sent_total"]``, the payload given to the collectives) and *wire*
    (``stats()["wire_bytes_total"]``: what the rank puts on the network under the ring / pairwise
    model of :mod:`cser_hooks.wire`, 2(W-1)/W x payload for an allreduce, (W-1) x payload for an
    allgather). The ratio columns are dense over this: ``handed ratio`` = dense bytes / handed bytes,
    ``wire ratio (ring model)`` = DDP's dense ring allreduce on the wire (2(W-1)/W x dense) / wire
    bytes. The handed ratio flatters allgather methods by about W/2; the wire ratio is the honest one;
  * compress % and comm %: ``compress_seconds`` and ``comm_seconds`` of rank 0 over its training time
    (communication overlaps the backward pass, so the shares are not additive);
  * with ``--link``: veth ``tx_bytes`` per worker per step beside the modelled wire bytes (the same
    ``wire_bytes_total``: one model, cser_hooks/wire.py): the excess is protocol overhead (TCP/IP
    headers, ACKs, gloo's framing).
"""
from __future__ import annotations

import math
from pathlib import Path

MAIN_HEADER = ("method", "final acc %", "avg-model acc %", "steps to target", "time to target s",
               "train time s", "handed kB/step/worker", "wire kB/step/worker", "handed ratio",
               "wire ratio (ring model)", "compress %", "comm %")
LINK_HEADER = ("method", "handed kB/step", "wire model kB/step (ring)", "veth kB/step", "veth vs model")
NOT_REACHED = "not reached"
NA = "n/a"
PLOTS = ("acc_vs_step.png", "acc_vs_time.png", "bytes_per_step.png")


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _window_bytes(r: dict, key: str = "bytes_sent_total") -> float | None:
    """Per-step mean of counter ``key`` over the steady-state window (all steps if it is empty)."""
    end, start = r["stats_end"], r.get("stats_window_start")
    if end.get(key) is None:
        return None
    steps, w0 = r["steps"], r["window_start"]
    if start is None or start.get(key) is None or steps <= w0:
        return end[key] / max(1, end.get("step") or steps)
    return (end[key] - start[key]) / (steps - w0)


def _ratio(dense, this):
    return dense / this if dense and this else None


def summarize(name: str, summary: str, results: list[dict], target: float | None, world: int) -> dict:
    r0 = results[0]
    curve = r0["curve"]
    hit = next((p for p in curve if target is not None and p["acc"] >= target), None)
    bytes_step = _mean(_window_bytes(r) for r in results)
    wire_step = _mean(_window_bytes(r, "wire_bytes_total") for r in results)
    end = r0["stats_end"]
    dense_step = end.get("dense_bytes_last_step") or None
    dense_wire_step = _window_bytes(r0, "dense_wire_bytes_total") or None
    tt = r0["train_time"] or float("nan")
    share = lambda k: (end[k] / tt) if end.get(k) is not None else None  # noqa: E731
    out = {
        "method": name, "summary": summary, "status": "ok", "params": r0["params"], "steps": r0["steps"],
        "target": target,
        "acc_final": r0["acc_final"], "acc_avg": r0["acc_avg"], "train_time": r0["train_time"],
        "steps_to_target": hit["step"] if hit else None, "time_to_target": hit["time"] if hit else None,
        "bytes_per_step": bytes_step, "dense_bytes_per_step": dense_step,
        "wire_bytes_per_step": wire_step, "dense_wire_bytes_per_step": dense_wire_step,
        "handed_ratio": _ratio(dense_step, bytes_step), "wire_ratio": _ratio(dense_wire_step, wire_step),
        "compress_share": share("compress_seconds"), "comm_share": share("comm_seconds"),
        "protocol": r0["protocol"], "curve": curve, "stats_rank0": end,
    }
    veth = [r.get("veth_tx_window") for r in results]
    if all(v is not None for v in veth):
        n = max(1, r0["steps"] - r0["window_start"])
        out["veth_bytes_per_step"] = _mean(v / n for v in veth)
        out["wire_model_bytes_per_step"] = wire_step  # the states' own model: cser_hooks/wire.py
        if wire_step:
            out["veth_vs_model"] = out["veth_bytes_per_step"] / wire_step - 1
    return out


def failed(name: str, summary: str, message: str, unavailable: bool) -> dict:
    status = ("unavailable: " if unavailable else "failed: ") + message
    return {"method": name, "summary": summary, "status": status}


# -- formatting ------------------------------------------------------------------------------------

def _num(x, fmt="{:.1f}", none=NA) -> str:
    if x is None:
        return none
    return fmt.format(x)


def _pct(x) -> str:
    return _num(None if x is None else 100 * x)


def _kb(x) -> str:
    return _num(None if x is None else x / 1e3, "{:.2f}")


def main_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(MAIN_HEADER) + " |", "|" + "---|" * len(MAIN_HEADER)]
    for s in rows:
        if s["status"] != "ok":
            cells = [s["method"], s["status"].replace("|", "/")] + [""] * (len(MAIN_HEADER) - 2)
        else:
            miss = NOT_REACHED if s.get("target") is not None else NA
            cells = [s["method"], _pct(s["acc_final"]), _pct(s["acc_avg"]),
                     _num(s["steps_to_target"], "{:d}", miss),
                     _num(s["time_to_target"], "{:.1f}", miss), _num(s["train_time"]),
                     _kb(s["bytes_per_step"]), _kb(s.get("wire_bytes_per_step")), _num(s.get("handed_ratio")),
                     _num(s.get("wire_ratio")), _pct(s["compress_share"]), _pct(s["comm_share"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speedups(rows: list[dict], baselines=("dense", "powersgd")) -> list[str]:
    """One line per method: how many times shorter its time to target is than each baseline's
    (a ratio below 1 means the method is behind: the line says by how much)."""
    ok = {s["method"]: s for s in rows if s["status"] == "ok"}
    base = {b: ok[b]["time_to_target"] for b in baselines if b in ok and ok[b].get("time_to_target")}
    lines = []
    for s in ok.values():
        if s["method"] == baselines[0]:
            continue
        t = s.get("time_to_target")
        parts = []
        for b, tb in base.items():
            if b == s["method"]:
                continue
            if t is None:
                parts.append(f"target not reached ({b} reached it in {tb:.1f} s)")
            elif t <= tb:
                parts.append(f"{tb / t:.2f}x shorter than {b}")
            else:
                parts.append(f"behind {b} by {t / tb:.2f}x ({t - tb:.1f} s)")
        if parts:
            lines.append(f"- `{s['method']}`: " + "; ".join(parts))
    return lines


def link_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(LINK_HEADER) + " |", "|" + "---|" * len(LINK_HEADER)]
    for s in rows:
        if s["status"] != "ok" or "veth_bytes_per_step" not in s:
            continue
        vs = s.get("veth_vs_model")
        cells = [s["method"], _kb(s["bytes_per_step"]), _kb(s.get("wire_model_bytes_per_step")),
                 _kb(s["veth_bytes_per_step"]), NA if vs is None else f"{100 * vs:+.1f} %"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(rows: list[dict], meta: dict) -> str:
    info = meta["data_info"]
    target = (f"Target accuracy: {_pct(meta['target'])} %." if meta["target"] is not None
              else "No target accuracy (pass --target).")
    stop = " Each method stopped at its first evaluation at or above the target." \
        if meta.get("stop_at_target") else ""
    out = [f"# cser_hooks benchmark ({meta['started']})", "",
           f"Command: `{meta['command']}`", "",
           f"Data {meta['data']} ({info['train']} train / {info['test']} test, input {info['input_shape']}), "
           f"model {meta['model']} ({meta['params']:,} parameters), {meta['world']} workers (gloo), "
           f"{meta['steps']} steps of batch {meta['batch']} per worker, SGD lr {meta['lr']} momentum "
           f"{meta['momentum']} weight decay {meta['weight_decay']} (warm-up + cosine), seed {meta['seed']}, "
           f"network: {meta['network']}. {target}{stop}", "",
           main_table(rows), ""]
    faster = speedups(rows)
    if faster:
        out += ["Time to target, compared:", "", *faster, ""]
    if any("veth_bytes_per_step" in s for s in rows if s["status"] == "ok"):
        out += ["Bytes on the emulated link (per worker per step, steady-state window). The wire model is "
                "the states' own ring model (cser_hooks/wire.py: 2(W-1)/W x payload per allreduce, (W-1) x "
                "payload per allgather, the pieces for other ranks per all_to_all); the veth's tx_bytes also "
                "carry TCP/IP headers, ACKs and gloo's framing (a few kB per collective, so small payloads "
                "show a large relative overhead):", "",
                link_table(rows), ""]
    out += ["Ratios: dense over this. `handed ratio` counts the bytes handed to the collectives (an "
            "allgather's payload once, although it reaches W-1 ranks); `wire ratio (ring model)` compares "
            "the bytes each rank puts on the wire under the ring model (cser_hooks/wire.py) with DDP's dense "
            "ring allreduce, 2(W-1)/W x dense: the like-for-like figure (allgather methods look about W/2 "
            "better by the handed ratio).", ""]
    out += ["Plots: " + ", ".join(f"[{p}]({p})" for p in PLOTS), "", "Methods:", ""]
    out += [f"- `{s['method']}`: {s['summary']}" for s in rows]
    out += ["", "Notes: accuracy is rank 0's own model (avg-model: the rank-averaged parameters after "
            "training); times exclude evaluation and the one-time loading of Numba kernels; bytes are counted "
            "over the steps after the 2 warm-up steps and averaged over workers; compress/comm % are rank 0's "
            "time in the hook before it returns / "
            "until its result is ready, over its training time (communication overlaps the backward pass; "
            "n/a for DDP's built-in allreduce, which Python cannot time).", ""]
    return "\n".join(out)


# -- plots ----------------------------------------------------------------------------------------

def plots(rows: list[dict], out_dir: Path, target: float | None = None) -> list[Path]:
    """acc_vs_step.png, acc_vs_time.png (rank 0's test accuracy) and bytes_per_step.png (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [s for s in rows if s["status"] == "ok"]
    paths = []
    for fname, key, xlabel in (("acc_vs_step.png", "step", "step"),
                               ("acc_vs_time.png", "time", "training wall time (s, evaluation excluded)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for s in ok:
            ax.plot([p[key] for p in s["curve"]], [100 * p["acc"] for p in s["curve"]], label=s["method"],
                    marker=".", markersize=4)
        if target is not None:
            ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1, label="target")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
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

def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def validate(out_dir: Path, methods: list[str]) -> list[str]:
    """Problems with the written report (empty list = well formed).

    Reads ``report.md`` back: the main table must have one row per method, every numeric cell a
    finite number (time-to-target may be 'not reached', time shares 'n/a'); the PNGs must exist and
    be PNG files.
    """
    problems = []
    report = out_dir / "report.md"
    if not report.exists():
        return [f"{report} missing"]
    lines = report.read_text().splitlines()
    head = next((i for i, line in enumerate(lines) if _cells(line) == list(MAIN_HEADER)), None)
    if head is None:
        return [f"{report}: no results table with header {' | '.join(MAIN_HEADER)}"]
    rows = {}
    for line in lines[head + 2:]:
        if not line.startswith("|"):
            break
        cells = _cells(line)
        rows[cells[0]] = cells
    optional = {"steps to target": (NOT_REACHED, NA), "time to target s": (NOT_REACHED, NA),
                "compress %": (NA,), "comm %": (NA,), "handed ratio": (NA,),
                "wire ratio (ring model)": (NA,), "wire kB/step/worker": (NA,)}
    for m in methods:
        cells = rows.get(m)
        if cells is None:
            problems.append(f"method {m} has no row in the table")
            continue
        if cells[1].startswith(("failed:", "unavailable:")):
            problems.append(f"method {m} did not run: {cells[1]}")
            continue
        if len(cells) != len(MAIN_HEADER):
            problems.append(f"method {m}: {len(cells)} cells, expected {len(MAIN_HEADER)} "
                            f"({' | '.join(cells)})")
            continue
        for col, cell in zip(MAIN_HEADER[1:], cells[1:]):
            if cell in optional.get(col, ()):
                continue
            try:
                ok = math.isfinite(float(cell))
            except ValueError:
                ok = False
            if not ok:
                problems.append(f"method {m}: column '{col}' is {cell!r}, not a finite number")
    for p in PLOTS:
        path = out_dir / p
        if not path.exists() or path.stat().st_size < 1000:
            problems.append(f"plot {path} missing or empty")
        elif path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
            problems.append(f"plot {path} is not a PNG file")
    return problems
