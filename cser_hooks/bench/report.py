"""Summaries, the markdown report, the PNG plots, and the ``--quick`` self-check of the output.

Per method (from the W ``rank<R>.json`` of :mod:`cser_hooks.bench.worker`):
  * the run's metric (:mod:`cser_hooks.bench.metrics`): final / rank-averaged-model test accuracy for
    the classifiers, final / best / rank-averaged-model validation loss and bits per byte for ``gpt``
    (rank 0's model; the average differs for local methods);
  * steps and training seconds to the first evaluation at or beyond the target (``--target``; for a
    lower-is-better metric by default dense's final value + ``--target-margin``: :func:`loss_target`);
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

from .metrics import ACCURACY, BITS_PER_NAT, Metric
from .metrics import get as get_metric

COMMON_HEADER = ("steps to target", "time to target s", "train time s", "handed kB/step/worker",
                 "wire kB/step/worker", "handed ratio", "wire ratio (ring model)", "compress %", "comm %")


def main_header(metric: Metric = ACCURACY) -> tuple[str, ...]:
    """The main table's header: method, the metric's columns, then the columns every run has."""
    return ("method", *(c.header for c in metric.columns), *COMMON_HEADER)


MAIN_HEADER = main_header(ACCURACY)
LINK_HEADER = ("method", "handed kB/step", "wire model kB/step (ring)", "veth kB/step", "veth vs model")
NOT_REACHED = "not reached"
NA = "n/a"
PLOTS = ACCURACY.plot_names()  # ("acc_vs_step.png", "acc_vs_time.png", "bytes_per_step.png")


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


def loss_target(rows_or_results: dict[str, list[dict]], margin: float, baseline: str = "dense") -> float | None:
    """A lower-is-better target: ``baseline``'s final value (rank 0's) + ``margin``; None without a baseline run.

    ``rows_or_results``: ``{method: [rank results]}`` (the launcher's outcomes), final value under
    ``<metric>_final``."""
    results = rows_or_results.get(baseline)
    if not results:
        return None
    r0 = results[0]
    final = r0.get(f"{r0.get('metric')}_final")
    return None if final is None else final + margin


def _metric_values(r0: dict, metric: Metric) -> dict:
    """``<key>_final``, ``<key>_avg``, ``<key>_best`` and the derived ``<name>_<...>`` of rank 0's result."""
    vals = {f"{metric.key}_final": r0.get(f"{metric.key}_final"), f"{metric.key}_avg": r0.get(f"{metric.key}_avg"),
            f"{metric.key}_best": metric.best(p.get(metric.key) for p in r0["curve"])}
    for name, factor in metric.derived:
        for which in ("final", "avg", "best"):
            v = vals[f"{metric.key}_{which}"]
            vals[f"{name}_{which}"] = None if v is None else v * factor
    return vals


def summarize(name: str, summary: str, results: list[dict], target: float | None, world: int,
              metric: Metric = ACCURACY) -> dict:
    r0 = results[0]
    curve = r0["curve"]
    hit = next((p for p in curve if metric.reached(p.get(metric.key), target)), None)
    bytes_step = _mean(_window_bytes(r) for r in results)
    wire_step = _mean(_window_bytes(r, "wire_bytes_total") for r in results)
    end = r0["stats_end"]
    dense_step = end.get("dense_bytes_last_step") or None
    dense_wire_step = _window_bytes(r0, "dense_wire_bytes_total") or None
    tt = r0["train_time"] or float("nan")
    share = lambda k: (end[k] / tt) if end.get(k) is not None else None  # noqa: E731
    out = {
        "method": name, "summary": summary, "status": "ok", "params": r0["params"], "steps": r0["steps"],
        "target": target, "metric": metric.key, **_metric_values(r0, metric), "train_time": r0["train_time"],
        "steps_to_target": hit["step"] if hit else None, "time_to_target": hit["time"] if hit else None,
        "bytes_per_step": bytes_step, "dense_bytes_per_step": dense_step,
        "wire_bytes_per_step": wire_step, "dense_wire_bytes_per_step": dense_wire_step,
        "handed_ratio": _ratio(dense_step, bytes_step), "wire_ratio": _ratio(dense_wire_step, wire_step),
        "compress_share": share("compress_seconds"), "comm_share": share("comm_seconds"),
        "protocol": r0["protocol"], "curve": curve, "stats_rank0": end, "ddp_buckets": r0.get("ddp_buckets"),
        "bucket_cap_mb": r0.get("bucket_cap_mb"),
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


def _metric_cells(s: dict, metric: Metric) -> list[str]:
    return [_num(None if s.get(c.key) is None else s[c.key] * c.scale, c.fmt) for c in metric.columns]


def main_table(rows: list[dict], metric: Metric = ACCURACY) -> str:
    header = main_header(metric)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in rows:
        if s["status"] != "ok":
            cells = [s["method"], s["status"].replace("|", "/")] + [""] * (len(header) - 2)
        else:
            miss = NOT_REACHED if s.get("target") is not None else NA
            cells = [s["method"], *_metric_cells(s, metric),
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


def _data_text(meta: dict) -> str:
    """The data set, as the report's run line names it (a text corpus: rule, files, bytes, sha256)."""
    info = meta["data_info"]
    if info.get("kind") != "text":
        return f"Data {meta['data']} ({info['train']} train / {info['test']} test, input {info['input_shape']})"
    h = info.get("unigram_entropy_bits")
    unigram = "" if h is None else (f"; unigram entropy of the training bytes {h:.3f} bits/byte "
                                    f"({h / BITS_PER_NAT:.3f} nats)")
    return (f"Data {meta['data']}: {info['file_count']:,} files under {info['root']} ({info['rule']}), "
            f"{info['bytes']:,} bytes, sha256 {info['sha256']}; {info['train']:,} training / {info['test']:,} "
            f"validation bytes{unigram}")


def _model_text(meta: dict) -> str:
    """``cnn (9,610 parameters)``, or for gpt its description (models.describe), parameters included."""
    return meta.get("model_text") or f"{meta['model']} ({meta['params']:,} parameters)"


def _target_text(meta: dict, metric: Metric) -> str:
    if meta["target"] is None:
        return f"No target {metric.name} (pass --target)."
    rule = f" = {meta['target_rule']}" if meta.get("target_rule") else ""
    return f"Target {metric.name}: {metric.format(meta['target'])}{rule}."


def _optimizer_text(meta: dict) -> str:
    """``SGD lr 0.1 momentum 0.9 weight decay 0.0001 (warm-up + cosine)``, with clipping/warm-up when set."""
    warm = f"{meta['warmup']:.0%} warm-up" if meta.get("warmup") is not None else "warm-up"
    clip = f", gradient norm clipped at {meta['clip_grad']:g}" if meta.get("clip_grad") else ""
    return (f"SGD lr {meta['lr']} momentum {meta['momentum']} weight decay {meta['weight_decay']} "
            f"({warm} + cosine){clip}")


def _buckets_text(rows: list[dict]) -> str | None:
    got = [f"{s['method']} {s['ddp_buckets']}" for s in rows if s["status"] == "ok" and s.get("ddp_buckets")]
    if not got:
        return None
    return ("DDP buckets per step (after DDP's bucket rebuild following the first steps; PowerSGD runs with a "
            "4096 MB cap: one bucket): " + ", ".join(got) + ".")


def markdown(rows: list[dict], meta: dict) -> str:
    metric = get_metric(meta.get("metric"))
    target = _target_text(meta, metric)
    direction = "at or above" if metric.higher_is_better else "at or below"
    stop = f" Each method stopped at its first evaluation {direction} the target." \
        if meta.get("stop_at_target") else ""
    batch = meta.get("batch_text") or f"batch {meta['batch']}"
    out = [f"# cser_hooks benchmark ({meta['started']})", "",
           f"Command: `{meta['command']}`", "",
           f"{_data_text(meta)}, model {_model_text(meta)}, {meta['world']} workers (gloo), {meta['steps']} steps "
           f"of {batch} per worker, {_optimizer_text(meta)}, seed {meta['seed']}, network: {meta['network']}. "
           f"{target}{stop}", "",
           main_table(rows, metric), ""]
    buckets = _buckets_text(rows)
    if buckets:
        out += [buckets, ""]
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
    out += ["Plots: " + ", ".join(f"[{p}]({p})" for p in metric.plot_names()), "", "Methods:", ""]
    out += [f"- `{s['method']}`: {s['summary']}" for s in rows]
    out += ["", f"Notes: {metric.name} is rank 0's own model (avg-model: the rank-averaged parameters after "
            "training); times exclude evaluation and the one-time loading of Numba kernels; bytes are counted "
            "over the steps after the 2 warm-up steps and averaged over workers; compress/comm % are rank 0's "
            "time in the hook before it returns / "
            "until its result is ready, over its training time (communication overlaps the backward pass; "
            "n/a for DDP's built-in allreduce, which Python cannot time).", ""]
    return "\n".join(out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def validate(out_dir: Path, methods: list[str], metric: Metric = ACCURACY) -> list[str]:
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
    header = main_header(metric)
    head = next((i for i, line in enumerate(lines) if _cells(line) == list(header)), None)
    if head is None:
        return [f"{report}: no results table with header {' | '.join(header)}"]
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
        if len(cells) != len(header):
            problems.append(f"method {m}: {len(cells)} cells, expected {len(header)} "
                            f"({' | '.join(cells)})")
            continue
        for col, cell in zip(header[1:], cells[1:]):
            if cell in optional.get(col, ()):
                continue
            try:
                ok = math.isfinite(float(cell))
            except ValueError:
                ok = False
            if not ok:
                problems.append(f"method {m}: column '{col}' is {cell!r}, not a finite number")
    for p in metric.plot_names():
        path = out_dir / p
        if not path.exists() or path.stat().st_size < 1000:
            problems.append(f"plot {path} missing or empty")
        elif path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
            problems.append(f"plot {path} is not a PNG file")
    return problems
