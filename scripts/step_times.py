"""Mean step times of each method on the communication-bound MLP, against the no-communication floor and dense.

    sudo .venv/bin/python scripts/step_times.py                          # 100mbit + unshaped (~12 min)
    .venv/bin/python scripts/step_times.py --from-results docs/bench-mlp-steps   # report only

Per link one ``python -m cser_hooks.bench --model mlp-wide --batch 64 --steps 68 --eval-every 4`` run
(``--link RATE``: network namespaces + tc tbf, needs root; ``none``: loopback, unshaped). Step time =
rank 0's training clock (time@68 − time@4) / 64: 64 steps hold two whole periods of CSER ≈1/256 (H = 32)
and four of CSER ≈1/32 (H = 16), so the resets are in the mean. Two references run in the same workers:

* ``local-sgd@100000`` — the floor: CSER with C1 = zero, no collective in the window at all;
* ``ef-rb@1/1000000`` — the sync floor: one allreduce of a few bytes per step, i.e. what any method that
  talks every step pays for the collective itself (latency, the ranks waiting for each other) before
  its bytes.

The report checks issue 15's bars: at 100 Mbit/s CSER ≈1/256 (``cser-256-paper``) <= 1.15x the floor and
CSER ≈1/32 (``cser-32``) <= 1.4x; unshaped, every hook <= 1.0x dense.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cser_hooks.bench import curves, report_dir  # noqa: E402

FLOOR, SYNC_FLOOR = "local-sgd@100000", "ef-rb@1/1000000"
STEPS, W0, EVAL_EVERY, BATCH = 68, 4, 4, 64
METHODS = {
    "100mbit": ("cser-256-paper", "cser-spread@1/512:1/16:32", "cser-32", "cser-spread@1/64:1/4:16",
                "powersgd"),
    "none": ("dense", "fp16", "powersgd", "cser-32", "cser-256-paper", "m-cser", "ef-rb", "ef-topk",
             "dist-ef-sgdm", "qsparse", "qprsgd", "compskip"),
}
BARS = {("100mbit", "cser-256-paper"): 1.15, ("100mbit", "cser-32"): 1.4}  # x the floor
DENSE_BAR = {"none": 1.0}  # every hook x dense


def analyse(results: dict[str, dict]) -> list[dict]:
    rows = []
    for link, res in results.items():
        by = {r["method"]: r for r in res["methods"] if r.get("status") == "ok"}
        t = {m: curves.step_time(r, W0, STEPS) for m, r in by.items()}
        floor, dense = t.get(FLOOR), t.get("dense")
        for m, r in by.items():
            if t[m] is None:
                continue
            vs_floor = t[m] / floor if floor else None
            vs_dense = t[m] / dense if dense and m not in (FLOOR, SYNC_FLOOR) else None
            bar = BARS.get((link, m))
            dbar = DENSE_BAR.get(link) if m not in ("dense", FLOOR, SYNC_FLOOR) else None
            checks = [x for x in ((vs_floor, bar), (vs_dense, dbar)) if x[1] is not None and x[0] is not None]
            rows.append({"link": link, "method": m, "summary": r.get("summary", ""), "step_s": t[m],
                         "vs_floor": vs_floor, "vs_dense": vs_dense, "bar_floor": bar, "bar_dense": dbar,
                         "wire_ratio": r.get("wire_ratio"),
                         "pass": all(v <= b for v, b in checks) if checks else None})
    return rows


def _x(v) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def report(rows: list[dict], meta: dict) -> str:
    out = ["# MLP step times: each method against the floor and dense", "",
           f"Measured {meta.get('date', '?')} on {meta.get('machine', '?')}; 4 gloo workers on those cores. "
           f"Command: `{meta.get('command', '?')}` ({meta.get('wall_s', 0):.0f} s wall). mlp-wide (5.4 M "
           f"parameters, one DDP bucket), batch {BATCH} per worker; step = rank 0's training clock (time@{STEPS} "
           f"− time@{W0}) / {STEPS - W0}, resets included. `{FLOOR}` is the floor (no collective), "
           f"`{SYNC_FLOOR}` the sync floor (one tiny allreduce per step).", ""]
    for link in dict.fromkeys(r["link"] for r in rows):
        out += [f"## {link}", "", "| method | wire ratio | ms/step | x floor | x dense | bar | meets it |",
                "|---|---:|---:|---:|---:|---|---|"]
        for r in (r for r in rows if r["link"] == link):
            bar = (f"<= {r['bar_floor']}x floor" if r["bar_floor"] else
                   f"<= {r['bar_dense']}x dense" if r["bar_dense"] else "")
            verdict = "" if r["pass"] is None else ("yes" if r["pass"] else "**no**")
            wr = "n/a" if r["wire_ratio"] is None else f"{r['wire_ratio']:.0f}"
            out.append(f"| {r['method']} | {wr} | {1e3 * r['step_s']:.1f} | {_x(r['vs_floor'])} | "
                       f"{_x(r['vs_dense'])} | {bar} | {verdict} |")
        out.append("")
    return "\n".join(out + meta.get("discussion", [])) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--links", default="100mbit,none", help="comma-separated: a --link rate or none (loopback)")
    ap.add_argument("--methods", help="comma-separated methods for every link (default: the table above)")
    ap.add_argument("--out", default=str(REPO / "reports" / "step-times"))
    ap.add_argument("--from-results", metavar="DIR", help="re-analyse DIR/bench-<link>/results.json")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark run")
    args = ap.parse_args(argv)
    links = [x.strip() for x in args.links.split(",") if x.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(args.from_results) if args.from_results else out
    meta = report_dir.load_meta(src, "step_times.json") if args.from_results else {}
    t0 = time.monotonic()
    if not args.from_results:
        for link in links:
            chosen = args.methods.split(",") if args.methods else METHODS.get(link, METHODS["none"])
            cmd = [sys.executable, "-m", "cser_hooks.bench", "--model", "mlp-wide", "--batch", str(BATCH),
                   "--steps", str(STEPS), "--eval-every", str(EVAL_EVERY), "--timeout", str(int(args.timeout)),
                   "--methods", ",".join((FLOOR, SYNC_FLOOR, *chosen)), "--out", str(out / f"bench-{link}")]
            cmd += ["--link", link] if link != "none" else []
            print("$ " + " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, cwd=REPO, check=False, timeout=args.timeout * (len(chosen) + 2))
            shutil.rmtree(out / f"bench-{link}" / "logs", ignore_errors=True)
            for png in (out / f"bench-{link}").glob("*.png"):
                png.unlink()
        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": report_dir.machine(),
                "wall_s": time.monotonic() - t0,
                "load_after": os.getloadavg()[0], "command": "python scripts/step_times.py " + " ".join(argv)}
    results = {x: json.loads(p.read_text()) for x in links if (p := src / f"bench-{x}" / "results.json").exists()}
    rows = analyse(results)
    meta["discussion"] = report_dir.discussion(src)
    report_dir.write(out, report(rows, meta), "step_times.json", meta, rows=rows)
    for r in rows:
        print(f"{r['link']:>8} {r['method']:>28} {1e3 * r['step_s']:8.1f} ms  floor {_x(r['vs_floor'])}  "
              f"dense {_x(r['vs_dense'])}  {'' if r['pass'] is None else ('ok' if r['pass'] else 'MISS')}")
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
