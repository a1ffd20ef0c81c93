"""Time to quality on emulated links: measured steps to target x measured step time under each link.

    .venv/bin/python scripts/time_to_quality.py --model gpt --steps 250 --eval-every 10 \\
        --methods dense,powersgd-r1,powersgd-r4,cser-32 --links 100mbit,1gbit -- --batch 4 --eval-windows 32
    .venv/bin/python scripts/time_to_quality.py --from-results docs/ttq-gpt       # report only, no runs
    sudo .venv/bin/python scripts/time_to_quality.py --model mlp-wide --methods dense,cser-32 \\
        --links 100mbit --steps 300 --validate                                    # + the end-to-end check

A 2-core machine cannot afford a full training run under a 100 Mbit/s link for every method (dense on
the gpt model needs ~6.6 s per step there), so time to quality is assembled from two measurements:

1. **convergence** — one full ``python -m cser_hooks.bench`` run of ``--steps`` on loopback. Gloo's
   collectives are deterministic, so the losses per step do not depend on the link; the run gives each
   method's *steps to target* S (target = dense's final validation loss + the bench's margin, or
   ``--target``).
2. **step time** — per link a short bench run of ``--link-steps`` under ``--link RATE`` (network
   namespaces + tc tbf, needs root); T = (time@N − time@4) / (N − 4) from rank 0's training clock
   (evaluation is outside it). The window spans at least two periods of every periodic method given (``Method.period``),
   so the resets' cost is in the mean.

``--longer-schedule N`` adds a second loopback convergence run with an N-step schedule (of
``--longer-methods``), scored against the main run's target (read off its curve): a method whose quality needs a longer
warm-up and decay shows its time to target there; dense is compared at its best schedule.

Time to target (estimated) = S x T, labelled as such in the report. A method that does not reach the
target in the run gets a lower bound, > steps x T. ``--validate`` checks the estimate once end to end:
per link, a full run under the link with ``--stop-at-target`` whose measured time to target must be
within 15 % of S x T.

Arguments after ``--`` go to every bench run unchanged (``--batch``, ``--eval-windows``, ``--gpt-*``...).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cser_hooks.bench import curves, report_dir  # noqa: E402
from cser_hooks.bench import methods as bench_methods  # noqa: E402
from cser_hooks.bench import metrics as bench_metrics  # noqa: E402

W0 = 4                 # the step-time window starts after DDP's bucket rebuild and the first steps
MIN_LINK_STEPS = 36    # W0 + 32: two periods of cser-32 (H = 16)
TOLERANCE = 0.15       # --validate: measured end-to-end time to target vs the estimate
POWERSGD = re.compile(r"powersgd")


def period_of(method: str) -> int:
    """The method's period (``Method.period``: CSER's H, local SGD's averaging, CompSkip's send), 0 for
    methods whose steps are all alike."""
    return bench_methods.get(method).period


MAX_LINK_STEPS = 2000  # a link run longer than this is a mistake (e.g. the floor local-sgd@100000)


def link_steps(methods, asked: int | None) -> int:
    """Steps of each link run: W0 + two periods of the longest method period, at least MIN_LINK_STEPS, a
    multiple of W0 (the curve has a point every W0 steps)."""
    need = max([MIN_LINK_STEPS, *(W0 + 2 * period_of(m) for m in methods)])
    if need > MAX_LINK_STEPS:
        longest = max(methods, key=period_of)
        raise SystemExit(f"{longest} has a period of {period_of(longest)} steps: its link run would need {need} "
                         f"steps (> {MAX_LINK_STEPS}); leave it out or choose a shorter period")
    n = max(asked or 0, need)
    return -(-n // W0) * W0


def step_time(row: dict) -> float | None:
    """Mean step time over [W0, the last curve point] from rank 0's training clock."""
    return curves.step_time(row, W0)


def ok_rows(results: dict) -> dict[str, dict]:
    return {r["method"]: r for r in results["methods"] if r.get("status") == "ok"}


def estimate(conv: dict, step_s: float | None) -> dict:
    """Time to target from a convergence row and a step time: S x T, or a lower bound steps x T."""
    s = conv.get("steps_to_target")
    if step_s is None:
        return {"steps": s, "time_s": None, "bound": False}
    if s is not None:
        return {"steps": s, "time_s": s * step_s, "bound": False}
    return {"steps": conv["steps"], "time_s": conv["steps"] * step_s, "bound": True}


def speedup(base: dict, this: dict) -> tuple[float | None, str]:
    """base time / this time, and how to read it: '=' exact, '<' an upper bound (this one a lower bound),
    '>' a lower bound (base a lower bound), '?' both bounds: unknown."""
    if not base["time_s"] or not this["time_s"]:
        return None, "?"
    r = base["time_s"] / this["time_s"]
    kind = {(False, False): "=", (False, True): "<", (True, False): ">", (True, True): "?"}
    return r, kind[(base["bound"], this["bound"])]


def rescored(row: dict, target: float) -> dict:
    """A convergence row with its steps to target read off its curve against ``target`` (another run's
    target: the first evaluated step whose value reaches it, in the metric's direction)."""
    metric = bench_metrics.get(row.get("metric"))
    hit = next((p["step"] for p in row.get("curve", []) if metric.reached(p.get(metric.key), target)), None)
    return {**row, "steps_to_target": hit}


def schedule_rows(conv: dict, extra: dict[int, dict] | None = None) -> dict[str, dict]:
    """The convergence rows by label: the main run's under the method's name, each longer schedule's
    (``extra``: steps -> results) as "METHOD (N-step schedule)", rescored against the main run's target,
    with ``base`` the bench method whose step time it takes (the per-step work does not depend on the
    schedule) and ``schedule`` its steps."""
    target = conv["meta"]["target"]
    out = {m: {**r, "base": m, "schedule": r["steps"]} for m, r in ok_rows(conv).items()}
    for n, res in sorted((extra or {}).items()):
        out.update({f"{m} ({n}-step schedule)": {**rescored(r, target), "base": m, "schedule": n}
                    for m, r in ok_rows(res).items()})
    return out


def _best(est: dict[str, dict], labels) -> dict | None:
    """The fastest of the given rows' estimates: a reached target before any bound, then the time."""
    return min((est[k] for k in labels if est[k]["time_s"]), key=lambda e: (e["bound"], e["time_s"]), default=None)


def analyse(conv: dict, links: dict[str, dict], extra: dict[int, dict] | None = None) -> list[dict]:
    """One row per (link, method and schedule): steps to target, step time, estimated time to target, and
    the speedups against dense's best schedule and against the best PowerSGD (any rank, any schedule)."""
    crows = schedule_rows(conv, extra)
    rows = []
    for link, res in links.items():
        lrows = ok_rows(res)
        t = {k: step_time(lrows[c["base"]]) if c["base"] in lrows else None for k, c in crows.items()}
        est = {k: estimate(c, t[k]) for k, c in crows.items()}
        best_dense = _best(est, [k for k, c in crows.items() if c["base"] == "dense"])
        best_ps = _best(est, [k for k, c in crows.items() if POWERSGD.search(c["base"])])
        for k, c in crows.items():
            e = est[k]
            row = {"link": link, "method": k, "schedule": c["schedule"], "steps_to_target": c.get("steps_to_target"),
                   "steps": c["steps"], "final": c.get(f"{c['metric']}_final"), "step_s": t[k],
                   "ttq_s": e["time_s"], "bound": e["bound"], "wire_ratio": c.get("wire_ratio")}
            row["vs_dense"], row["vs_dense_kind"] = speedup(best_dense, e) if best_dense else (None, "?")
            row["vs_powersgd"], row["vs_powersgd_kind"] = (speedup(best_ps, e) if best_ps and not
                                                           POWERSGD.search(c["base"]) else (None, "?"))
            rows.append(row)
    return rows


def validate(conv: dict, links: dict[str, dict], full: dict[str, dict]) -> list[dict]:
    """Estimated (S x T) vs measured (full run under the link) time to target, per link and method."""
    out = []
    for link, res in full.items():
        if link not in links:
            continue
        lrows, crows = ok_rows(links[link]), ok_rows(conv)
        for m, f in ok_rows(res).items():
            if m not in crows or m not in lrows:
                continue
            est = estimate(crows[m], step_time(lrows[m]))
            meas = f.get("time_to_target")
            err = (est["time_s"] - meas) / meas if meas and est["time_s"] and not est["bound"] else None
            out.append({"link": link, "method": m, "steps_full": f.get("steps_to_target"),
                        "steps_conv": crows[m].get("steps_to_target"), "estimated_s": est["time_s"],
                        "measured_s": meas, "error": err,
                        "within": err is not None and abs(err) <= TOLERANCE})
    return out


def _t(x, bound=False) -> str:
    return "n/a" if x is None else (">" if bound else "") + f"{x:,.0f}"


def _ratio(r, kind) -> str:
    if r is None or kind == "?":
        return "n/a"
    return {"=": "", "<": "< ", ">": "> "}[kind] + f"{r:.2f}x"


def report(conv: dict, rows: list[dict], checks: list[dict], meta: dict) -> str:
    cm = conv["meta"]
    metric = cm.get("metric", "val_loss")
    out = ["# Time to quality on emulated links", "",
           f"Measured {meta.get('date', '?')} on {meta.get('machine', '?')} (4 workers share the cores: compute, "
           f"not only bytes, sets the step times). Command: `{meta.get('command', '?')}` "
           f"({meta.get('wall_s', 0):.0f} s wall).", "",
           f"Convergence: `{cm['command']}` on loopback. Target {metric} {cm['target']:.3f} "
           f"({cm.get('target_rule') or 'given'}). Step times: one `--link RATE` bench run per link of "
           f"{meta.get('link_steps', '?')} steps, T = (time@N − time@{W0}) / (N − {W0}) from rank 0's training "
           f"clock (resets included).", "",
           "**time to target (estimated) = measured steps to target (loopback run) x measured step time under "
           "the link.** `>` marks a lower bound (target not reached in the run: steps run x T); a speedup "
           "against a bound is marked `<` (at most) or `>` (at least).", ""]
    if any("schedule)" in r["method"] for r in rows):
        out += ["Rows marked *(N-step schedule)* come from a second loopback run of those methods with an N-step "
                "warm-up + cosine schedule (`converge-<N>steps*/`), scored against the same target; each takes its "
                "method's step time (the work per step does not depend on the schedule). `dense / this` divides "
                "dense's best time over its schedules; `best PowerSGD` is the fastest PowerSGD row of any rank and "
                "schedule.", ""]
    for link in dict.fromkeys(r["link"] for r in rows):
        out += [f"## {link}", "",
                f"| method | wire ratio | final {metric} | steps to target | step time s | time to target s "
                "(estimated) | dense / this | best PowerSGD / this |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in rows if r["link"] == link):
            steps = str(r["steps_to_target"]) if r["steps_to_target"] is not None else f"not in {r['steps']}"
            fin = "n/a" if r["final"] is None else f"{r['final']:.3f}"
            wr = "n/a" if r["wire_ratio"] is None else f"{r['wire_ratio']:.1f}"
            st = "n/a" if r["step_s"] is None else f"{r['step_s']:.3f}"
            out.append(f"| {r['method']} | {wr} | {fin} | {steps} | {st} | {_t(r['ttq_s'], r['bound'])} | "
                       f"{_ratio(r['vs_dense'], r['vs_dense_kind'])} | "
                       f"{_ratio(r['vs_powersgd'], r['vs_powersgd_kind'])} |")
        out.append("")
    if checks:
        ok = sum(c["within"] for c in checks)
        out += ["## End-to-end check (`--validate`)", "",
                f"Full runs under the link with `--stop-at-target`: **{ok} of {len(checks)} within "
                f"±{100 * TOLERANCE:.0f} %** of the estimate.", "",
                "| link | method | steps to target (full / loopback) | estimated s | measured s | error |",
                "|---|---|---:|---:|---:|---:|"]
        for c in checks:
            err = "n/a" if c["error"] is None else f"{100 * c['error']:+.1f} %"
            out.append(f"| {c['link']} | {c['method']} | {c['steps_full']} / {c['steps_conv']} | "
                       f"{_t(c['estimated_s'])} | {_t(c['measured_s'])} | {err} |")
        out.append("")
    return "\n".join(out + meta.get("discussion", [])) + "\n"


def run_bench(args_list: list[str], out: Path, timeout: float) -> None:
    cmd = [sys.executable, "-m", "cser_hooks.bench", *args_list, "--out", str(out)]
    print("$ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=False, timeout=timeout)
    shutil.rmtree(out / "logs", ignore_errors=True)
    if not out.name.startswith("converge"):  # the link runs' plots show 36 steps of one method's clock: nothing to read
        for png in out.glob("*.png"):
            png.unlink()


def load(path: Path) -> dict | None:
    p = path / "results.json"
    return json.loads(p.read_text()) if p.exists() else None


SCHEDULE_DIR = re.compile(r"^converge-(\d+)steps(-[\w.-]+)?$")


def load_schedules(src: Path) -> dict[int, dict]:
    """The longer-schedule convergence runs under ``src``: ``converge-<N>steps[-suffix]/results.json``,
    the runs of one N merged (their method rows together, the first run's meta)."""
    out: dict[int, dict] = {}
    for d in sorted(src.glob("converge-*steps*")):
        m = SCHEDULE_DIR.match(d.name)
        res = load(d) if m and d.is_dir() else None
        if res is None:
            continue
        n = int(m.group(1))
        if n in out:
            out[n] = {"meta": out[n]["meta"], "methods": out[n]["methods"] + res["methods"]}
        else:
            out[n] = res
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt", help="the bench's --model (default gpt)")
    p.add_argument("--methods", default="dense,powersgd-r1,powersgd-r4,cser-32",
                   help="bench method names; dense must be one of them (default: %(default)s)")
    p.add_argument("--links", default="100mbit,1gbit", help="comma-separated --link rates (default: %(default)s)")
    p.add_argument("--steps", type=int, help="steps of the convergence run (default: the bench's for --model)")
    p.add_argument("--eval-every", type=int, help="evaluations of the convergence run (the bench's default)")
    p.add_argument("--target", type=float, help="the bench's --target (default: the bench's rule)")
    p.add_argument("--link-steps", type=int,
                   help=f"steps of each link run (default: {W0} + two periods of the longest method period, "
                        f">= {MIN_LINK_STEPS})")
    p.add_argument("--validate", action="store_true",
                   help="also a full run under each link with --stop-at-target, compared with the estimate")
    p.add_argument("--out", default=str(REPO / "reports" / "ttq"), help="report directory (default %(default)s)")
    p.add_argument("--reuse-converge", action="store_true",
                   help="keep OUT/converge/results.json of an earlier run (it does not depend on the link) and "
                        "run only the link runs")
    p.add_argument("--from-results", metavar="DIR",
                   help="re-analyse DIR/converge, DIR/link-<rate> (and DIR/full-<rate>) without running")
    p.add_argument("--longer-schedule", type=int, metavar="N",
                   help="also a loopback convergence run with an N-step schedule (into OUT/converge-<N>steps), scored "
                        "against the main run's target; its rows are added to the tables")
    p.add_argument("--longer-methods", metavar="LIST",
                   help="the methods of the --longer-schedule run (default: all of --methods)")
    p.add_argument("--timeout", type=float, default=7200, help="seconds per bench run (default %(default)s)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then arguments for every bench run")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    extra = [a for a in args.bench_args if a != "--"]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    links = [x.strip() for x in args.links.split(",") if x.strip()]
    if "dense" not in methods:
        raise SystemExit("--methods must include dense: its final loss sets the target and its time the baseline")
    out = Path(args.out)
    src = Path(args.from_results) if args.from_results else out
    out.mkdir(parents=True, exist_ok=True)
    n_link = link_steps(methods, args.link_steps)
    t0 = time.monotonic()
    meta = report_dir.load_meta(src, "ttq.json") if args.from_results else {}
    if not args.from_results:
        common = ["--model", args.model, "--methods", ",".join(methods), *extra]
        conv_args = [*common, *(["--steps", str(args.steps)] if args.steps else []),
                     *(["--eval-every", str(args.eval_every)] if args.eval_every else []),
                     *(["--target", str(args.target)] if args.target is not None else [])]
        if not (args.reuse_converge and load(out / "converge") is not None):
            run_bench(conv_args, out / "converge", args.timeout)
        conv = load(out / "converge")
        if conv is None:
            raise SystemExit("the convergence run wrote no results.json")
        longer = out / f"converge-{args.longer_schedule}steps"
        if args.longer_schedule and not (args.reuse_converge and load(longer) is not None):
            lm = args.longer_methods or ",".join(methods)
            run_bench(["--model", args.model, "--methods", lm, *extra, "--steps", str(args.longer_schedule),
                       *(["--eval-every", str(args.eval_every)] if args.eval_every else []),
                       "--target", str(conv["meta"]["target"])],
                      longer, args.timeout)
        for link in links:
            run_bench([*common, "--steps", str(n_link), "--eval-every", str(W0), "--link", link],
                      out / f"link-{link}", args.timeout)
            if args.validate:
                target = conv["meta"]["target"]
                run_bench([*conv_args, "--link", link, "--stop-at-target", "--target", str(target)],
                          out / f"full-{link}", args.timeout)
        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": report_dir.machine(),
                "wall_s": time.monotonic() - t0,
                "link_steps": n_link, "command": "python scripts/time_to_quality.py " + " ".join(argv)}
    conv = load(src / "converge")
    if conv is None:
        raise SystemExit(f"no {src / 'converge' / 'results.json'}")
    link_res = {x: r for x in links if (r := load(src / f"link-{x}")) is not None}
    full_res = {x: r for x in links if (r := load(src / f"full-{x}")) is not None}
    extra = load_schedules(src)
    rows = analyse(conv, link_res, extra)
    checks = validate(conv, link_res, full_res)
    meta["discussion"] = report_dir.discussion(src)
    report_dir.write(out, report(conv, rows, checks, meta), "ttq.json", meta, rows=rows, checks=checks)
    for r in rows:
        print(f"{r['link']:>8} {r['method']:>16}  S={r['steps_to_target']}  T={r['step_s']}  "
              f"ttq={_t(r['ttq_s'], r['bound'])} s  dense/this={_ratio(r['vs_dense'], r['vs_dense_kind'])}")
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
