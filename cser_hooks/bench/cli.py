"""``python -m cser_hooks.bench``: train one model with each method on W gloo workers and compare.

    python -m cser_hooks.bench                           # default methods, MNIST-1D, 1-D CNN, 4 workers
    python -m cser_hooks.bench --methods dense,powersgd,cser-32 --model mlp-wide --link 100mbit
    python -m cser_hooks.bench --quick                   # 1-2 minute smoke run that checks its output

One set of W worker processes runs the methods in turn (same seed, data, model and schedule for
each); a method that fails is reported and the others still run (in fresh workers). The launcher
prints a progress bar per method, then the markdown table (also in ``--out``/report.md, with
results.json and PNG plots). Exit status: 0 every method ran, 1 some failed, 2 the ``--quick``
self-check found malformed output, 130 interrupted (143 on SIGTERM).
"""
from __future__ import annotations

import argparse
import atexit
import json
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from . import data as data_mod
from . import methods as methods_mod
from . import report

MODELS = ("cnn", "mlp", "mlp-wide")  # cser_hooks.bench.models.MODELS (imported lazily: it imports torch)

# per-model defaults: learning rate, steps, target accuracy on MNIST-1D
MODEL_DEFAULTS = {"cnn": {"lr": 0.1, "steps": 1000, "target": 0.9},
                  "mlp": {"lr": 0.05, "steps": 600, "target": 0.5},
                  "mlp-wide": {"lr": 0.05, "steps": 300, "target": 0.5}}
QUICK = {"steps": 150, "eval_every": 25}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cser_hooks.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    known = ", ".join(methods_mod.PRESETS)
    default, quick = ",".join(methods_mod.DEFAULT), ",".join(methods_mod.QUICK_DEFAULT)
    p.add_argument("--methods", help=f"comma-separated method names (default: {default}; with --quick: "
                   f"{quick}). Known: {known}, and the parametric cser@R1:R2:H, m-cser@R1:R2:H, ef-topk@R, "
                   f"ef-rb@R, ef-sign@B, topk@R, local-sgd@H, powersgd@R, dist-ef-sgdm@B, qsparse@R:H, "
                   f"qprsgd@H, compskip@R:K; any name + ~lrS scales the peak lr by S")
    p.add_argument("--workers", "-W", type=int, default=4, help="number of worker processes (default 4)")
    p.add_argument("--data", default="mnist1d",
                   help="mnist1d (default, generated offline and cached), digits, or a PATH: .npz with "
                        "x_train,y_train,x_test,y_test, or an ImageFolder directory (needs torchvision)")
    p.add_argument("--model", default="cnn", choices=MODELS,
                   help="cnn (default, ~10k params on MNIST-1D), mlp, mlp-wide (5.4M params: "
                        "communication-bound)")
    p.add_argument("--steps", type=int,
                   help="training steps per method (default: cnn 1000, mlp 600, mlp-wide 300; --quick 150)")
    p.add_argument("--batch", type=int, default=32, help="batch size per worker (default 32)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: cnn 0.1, mlp 0.05)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--eval-every", type=int, help="evaluate rank 0's model every N steps (default steps/50)")
    p.add_argument("--target", type=float,
                   help="target test accuracy for steps/time-to-target, 0-1 or percent (default: MNIST-1D "
                        "cnn 0.9, mlp/mlp-wide 0.5; digits 0.9)")
    p.add_argument("--stop-at-target", action="store_true",
                   help="end each method at its first evaluation at or above --target (for slow --link runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bucket-cap-mb", type=float, default=25.0,
                   help="DDP bucket cap in MB (default 25; PowerSGD always uses one bucket)")
    p.add_argument("--block", type=int,
                   help="random-block size of the shared-mask compressors (default: 256 for models with "
                        ">= 1M parameters, 32 below)")
    p.add_argument("--link", metavar="RATE",
                   help="emulate a link of RATE per worker (100mbit, 1gbit, ...) with network namespaces, "
                        "veths, a bridge and tc tbf (needs root)")
    p.add_argument("--delay", help="with --link: one-way delay per link (e.g. 1ms; needs the netem qdisc)")
    p.add_argument("--out", help="report directory (default reports/bench-<timestamp>)")
    p.add_argument("--quick", action="store_true",
                   help=f"1-2 minute smoke run ({QUICK['steps']} steps) that checks its own output and "
                        f"exits 2 if it is malformed")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per method (default 1800)")
    p.add_argument("--cleanup", action="store_true",
                   help="remove network namespaces left by killed --link runs, then exit")
    return p


def resolve(args) -> dict:
    d = MODEL_DEFAULTS[args.model]
    steps = args.steps or (QUICK["steps"] if args.quick else d["steps"])
    if steps < 1 or args.batch < 1 or args.workers < 1:
        raise SystemExit("--steps, --batch and --workers must be >= 1")
    eval_every = args.eval_every or (QUICK["eval_every"] if args.quick else max(1, steps // 50))
    target = args.target
    if target is not None and target > 1:
        target = target / 100
    if target is None:
        target = {"mnist1d": d["target"], "digits": 0.9}.get(args.data)
    if target is not None and not 0 < target <= 1:
        raise SystemExit(f"--target {args.target}: give an accuracy in (0, 1] or a percentage")
    if args.stop_at_target and target is None:
        raise SystemExit("--stop-at-target needs --target (there is no default target for this data set)")
    return {"steps": steps, "eval_every": eval_every, "target": target,
            "lr": args.lr if args.lr is not None else d["lr"]}


class Session:
    """Owns everything a run creates; :meth:`close` (idempotent) removes it in the right order."""

    def __init__(self):
        self.launcher = None
        self.lab = None
        self.work_dir: Path | None = None
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            if self.launcher is not None:
                self.launcher.stop_all()
            if self.lab is not None:
                left = self.lab.cleanup()
                if left:
                    print(f"warning: could not delete namespaces {left}; run `python -m cser_hooks.bench "
                          f"--cleanup` as root", file=sys.stderr)
            if self.work_dir is not None:
                shutil.rmtree(self.work_dir, ignore_errors=True)
            self.closed = True
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _raise_exit(signum, frame):
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.cleanup:
        from . import netns
        netns.require_tools()
        removed = netns.cleanup_stale()
        print(f"removed {len(removed)} stale namespace(s){': ' + ', '.join(removed) if removed else ''}")
        return 0
    if args.delay and not args.link:
        raise SystemExit("--delay needs --link RATE")
    plan = resolve(args)
    chosen = methods_mod.parse_list(args.methods or ",".join(
        methods_mod.QUICK_DEFAULT if args.quick else methods_mod.DEFAULT))
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    out_dir = Path(args.out or f"reports/bench-{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "logs").mkdir(exist_ok=True)

    session = Session()
    atexit.register(session.close)
    handlers = {s: signal.signal(s, _raise_exit) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    rows = []
    try:
        lab = None
        if args.link:
            from . import netns
            lab = netns.NetLab(args.workers, args.link, args.delay)  # validates rate/delay first
            netns.require_tools()
            stale = netns.cleanup_stale()
            if stale:
                print(f"removed stale namespaces of killed runs: {', '.join(stale)}", file=sys.stderr)
        session.work_dir = Path(tempfile.mkdtemp(prefix="cser_bench_"))
        print(f"preparing data {args.data} ...", file=sys.stderr, flush=True)
        data_path = data_mod.prepare(args.data, session.work_dir)
        info = data_mod.describe(data_path)
        if info["train"] // args.workers < args.batch:
            raise SystemExit(f"{info['train']} training samples over {args.workers} workers leave fewer than "
                             f"--batch {args.batch} per worker: lower --batch or --workers")
        from . import models

        params = models.count_parameters(models.build(args.model, info["input_shape"], info["classes"]))
        block = args.block or (256 if params >= 1_000_000 else 32)
        if lab is not None:
            session.lab = lab
            try:
                lab.setup()
            except netns.NetLabError as exc:
                raise SystemExit(f"--link: could not build the emulated network: {exc}") from None
            print(f"network: {lab.describe()}", file=sys.stderr, flush=True)
        from .launch import Launcher

        launcher = session.launcher = Launcher(session.work_dir, out_dir / "logs", lab)
        cfg = {"world": args.workers, "data": str(data_path), "model": args.model, "steps": plan["steps"],
               "batch": args.batch, "lr": plan["lr"], "momentum": args.momentum,
               "weight_decay": args.weight_decay, "eval_every": plan["eval_every"], "seed": args.seed,
               "block": block, "bucket_cap_mb": args.bucket_cap_mb, "window_start": 2,
               "timeout_s": min(args.timeout, 600),
               "stop_at": plan["target"] if args.stop_at_target else None}
        print(f"{len(chosen)} method(s), {args.workers} workers, model {args.model} ({params:,} parameters), "
              f"{plan['steps']} steps; report in {out_dir}", file=sys.stderr, flush=True)
        ui = BarUI(plan["steps"])
        outcomes = launcher.run_methods([m.name for m in chosen], cfg, ui, args.timeout)
        for m in chosen:
            got = outcomes.get(m.name, {"error": "not run", "unavailable": False})
            if "results" in got:
                rows.append(report.summarize(m.name, m.summary, got["results"], plan["target"], args.workers))
            else:
                rows.append(report.failed(m.name, m.summary, got["error"], got["unavailable"]))
    except KeyboardInterrupt:
        session.close()
        print("\ninterrupted: workers stopped, namespaces removed", file=sys.stderr)
        return 130
    finally:
        session.close()
        for s, h in handlers.items():
            signal.signal(s, h)

    if args.link:
        network = f"emulated {args.link} per worker" + (f", {args.delay} delay" if args.delay else "")
        network += " (network namespaces, veths, bridge, tc tbf)"
    else:
        network = "loopback (127.0.0.1)"
    command = " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    meta = {"started": started, "command": f"python -m cser_hooks.bench {command}".strip(), "data": args.data,
            "data_info": info, "model": args.model, "params": params, "world": args.workers,
            "steps": plan["steps"], "batch": args.batch, "lr": plan["lr"], "momentum": args.momentum,
            "weight_decay": args.weight_decay, "seed": args.seed, "network": network,
            "target": plan["target"], "stop_at_target": bool(args.stop_at_target), "block": block}
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "methods": rows}, indent=1, default=str))
    text = report.markdown(rows, meta)
    report.plots(rows, out_dir, plan["target"])
    (out_dir / "report.md").write_text(text)
    print(report.main_table(rows))
    if args.link:
        print("\nbytes on the emulated link (per worker per step):\n" + report.link_table(rows))
    print(f"\nreport: {out_dir / 'report.md'} (plots: {', '.join(report.PLOTS)})")
    code = 0 if all(r["status"] == "ok" for r in rows) else 1
    if args.quick:
        problems = report.validate(out_dir, [m.name for m in chosen])
        if problems:
            print("--quick self-check FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 2
        print("--quick self-check passed: every method has a row of finite numbers; plots written",
              file=sys.stderr)
    return code


class BarUI:
    """A tqdm bar per method (on stderr), updated from rank 0's progress lines."""

    def __init__(self, steps: int):
        self.steps = steps
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
        if msg.get("acc") is not None:
            bar.set_postfix_str(f"acc {100 * msg['acc']:.1f}%")

    def end(self, name, outcome):
        bar = self._bar(name)
        if "results" in outcome:
            acc = outcome["results"][0]["acc_final"]
            bar.set_postfix_str(f"acc {100 * acc:.1f}%, {time.monotonic() - self.t0[name]:.0f} s")
        else:
            bar.set_postfix_str("unavailable" if outcome.get("unavailable") else "FAILED")
        bar.close()
        if "results" not in outcome:
            bar.write(f"{name}: {outcome['error']}", file=sys.stderr)
