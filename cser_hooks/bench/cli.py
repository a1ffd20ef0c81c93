"""``python -m cser_hooks.bench``: train one model with each method on W gloo workers and compare.

    python -m cser_hooks.bench                           # default methods, MNIST-1D, 1-D CNN, 4 workers
    python -m cser_hooks.bench --methods dense,powersgd,cser-32 --model mlp-wide --link 100mbit
    python -m cser_hooks.bench --quick                   # 1-2 minute smoke run that checks its output
    python -m cser_hooks.bench --model gpt --methods dense,powersgd,cser-32,ef-rb --steps 200
                                                         # byte-level transformer on the stdlib's sources

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
from . import metrics, plots, report
from .bars import BarUI

GPT_LR, GPT_STEPS = 0.3, 300  # SGD with momentum, gradient-norm clipping at 0.25, 10 % warm-up (README)
MODELS = ("cnn", "mlp", "mlp-wide", "gpt")  # cser_hooks.bench.models.MODELS (imported lazily: it imports torch)
TEXT_MODELS = ("gpt",)  # trained on a text corpus (data.prepare_text), the others on data.prepare's arrays

# per-model defaults: data, learning rate, steps, batch, evaluations per run, target (an accuracy on
# MNIST-1D for the classifiers; gpt's default target is dense's final validation loss + --target-margin),
# gradient-norm clipping (None: none) and the warm-up share of the steps
_CLASSIFIER = {"data": "mnist1d", "batch": 32, "evals": 50, "clip_grad": None, "warmup": 0.05}
MODEL_DEFAULTS = {"cnn": {**_CLASSIFIER, "lr": 0.1, "steps": 1000, "target": 0.9},
                  "mlp": {**_CLASSIFIER, "lr": 0.05, "steps": 600, "target": 0.5},
                  "mlp-wide": {**_CLASSIFIER, "lr": 0.05, "steps": 300, "target": 0.5},
                  "gpt": {"data": "stdlib", "lr": GPT_LR, "steps": GPT_STEPS, "batch": 8, "evals": 10,
                          "target": None, "clip_grad": 0.25, "warmup": 0.1}}
QUICK = {"steps": 150, "eval_every": 25}
TARGET_MARGIN = 0.05  # nats: gpt's default target is dense's final validation loss + this


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
    p.add_argument("--data",
                   help="classifiers: mnist1d (default, generated offline and cached), digits, or a PATH: .npz "
                        "with x_train,y_train,x_test,y_test, or an ImageFolder directory (needs torchvision). "
                        "gpt: stdlib (default: this interpreter's standard-library .py sources) or a PATH: a "
                        "text file or a directory of .txt/.py files")
    p.add_argument("--model", default="cnn", choices=MODELS,
                   help="cnn (default, ~10k params on MNIST-1D), mlp, mlp-wide (5.4M params: "
                        "communication-bound), gpt (byte-level transformer, 10.9M params by default; metric: "
                        "validation loss / bits per byte)")
    p.add_argument("--steps", type=int,
                   help=f"training steps per method (default: cnn 1000, mlp 600, mlp-wide 300, gpt {GPT_STEPS}; "
                        f"--quick 150)")
    p.add_argument("--batch", type=int,
                   help="batch size per worker (default 32; gpt: 8 windows of --context bytes)")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default: cnn 0.1, mlp 0.05, gpt {GPT_LR})")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--clip-grad", type=float,
                   help="clip the global gradient norm (what the optimizer gets) at this value; 0: off "
                        "(default: off; gpt 0.25)")
    p.add_argument("--warmup", type=float, help="linear warm-up share of the steps (default 0.05; gpt 0.1)")
    p.add_argument("--eval-every", type=int,
                   help="evaluate rank 0's model every N steps (default steps/50; gpt steps/10)")
    p.add_argument("--target", type=float,
                   help="target for steps/time-to-target: a test accuracy, 0-1 or percent (default: MNIST-1D "
                        "cnn 0.9, mlp/mlp-wide 0.5; digits 0.9); gpt: a validation loss in nats (default: "
                        "dense's final validation loss + --target-margin)")
    p.add_argument("--target-margin", type=float, default=TARGET_MARGIN,
                   help=f"gpt: the default target is dense's final validation loss + this many nats "
                        f"(default {TARGET_MARGIN})")
    p.add_argument("--stop-at-target", action="store_true",
                   help="end each method at its first evaluation at or beyond --target (for slow --link runs)")
    g = p.add_argument_group("gpt (--model gpt)")
    g.add_argument("--gpt-layers", type=int, help="transformer blocks (default 6)")
    g.add_argument("--gpt-dim", type=int, help="model width (default 384)")
    g.add_argument("--gpt-heads", type=int, help="attention heads (default 6)")
    g.add_argument("--context", type=int, help="context length in bytes (default 128)")
    g.add_argument("--eval-windows", type=int, default=64,
                   help="validation windows of --context bytes in each evaluation (default 64)")
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


def _resolve_target(args, metric: metrics.Metric, d: dict, data: str) -> float | None:
    """The target given or defaulted before the run (None: none, or for gpt dense's + margin, set later)."""
    target = args.target
    if not metric.higher_is_better:  # a validation loss in nats, as given
        if target is not None and not target > 0:
            raise SystemExit(f"--target {target}: give a validation loss in nats (> 0)")
        return target
    if target is not None and target > 1:
        target = target / 100
    if target is None:
        target = {"mnist1d": d["target"], "digits": 0.9}.get(data)
    if target is not None and not 0 < target <= 1:
        raise SystemExit(f"--target {args.target}: give an accuracy in (0, 1] or a percentage")
    return target


def resolve(args, metric: metrics.Metric | None = None) -> dict:
    metric = metric or metrics.for_model(args.model)
    d = MODEL_DEFAULTS[args.model]
    steps = args.steps or (QUICK["steps"] if args.quick else d["steps"])
    batch = args.batch if args.batch is not None else d["batch"]
    if steps < 1 or batch < 1 or args.workers < 1:
        raise SystemExit("--steps, --batch and --workers must be >= 1")
    eval_every = args.eval_every or (QUICK["eval_every"] if args.quick else max(1, steps // d["evals"]))
    data = args.data or d["data"]
    target = _resolve_target(args, metric, d, data)
    if args.stop_at_target and target is None:
        later = (" (gpt's default target, dense's final loss + margin, is only known after the run)"
                 if not metric.higher_is_better else "")
        raise SystemExit(f"--stop-at-target needs --target (there is no default target for this data set){later}")
    clip = args.clip_grad if args.clip_grad is not None else d["clip_grad"]
    warmup = args.warmup if args.warmup is not None else d["warmup"]
    if (clip is not None and clip < 0) or not 0 <= warmup < 1:
        raise SystemExit("--clip-grad must be >= 0 and --warmup in [0, 1)")
    return {"steps": steps, "eval_every": eval_every, "target": target, "batch": batch, "data": data,
            "lr": args.lr if args.lr is not None else d["lr"], "clip_grad": clip or None, "warmup": warmup}


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
    metric = metrics.for_model(args.model)
    plan = resolve(args, metric)
    text = args.model in TEXT_MODELS
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
        print(f"preparing data {plan['data']} ...", file=sys.stderr, flush=True)
        data_path = (data_mod.prepare_text if text else data_mod.prepare)(plan["data"], session.work_dir)
        info = data_mod.describe(data_path)
        from . import models

        model_kw = gpt_config(args, models.GPT_DEFAULTS) if text else {}
        check_data(info, args.workers, plan["batch"], model_kw.get("context"))
        model = models.build(args.model, info.get("input_shape", ()), info.get("classes", 0), **model_kw)
        params = models.count_parameters(model)
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
               "batch": plan["batch"], "lr": plan["lr"], "momentum": args.momentum, "gpt": model_kw,
               "eval_windows": args.eval_windows, "clip_grad": plan["clip_grad"], "warmup": plan["warmup"],
               "weight_decay": args.weight_decay, "eval_every": plan["eval_every"], "seed": args.seed,
               "block": block, "bucket_cap_mb": args.bucket_cap_mb, "window_start": 2,
               "timeout_s": min(args.timeout, 600),
               "stop_at": plan["target"] if args.stop_at_target else None}
        print(f"{len(chosen)} method(s), {args.workers} workers, model {args.model} ({params:,} parameters), "
              f"{plan['steps']} steps; report in {out_dir}", file=sys.stderr, flush=True)
        ui = BarUI(plan["steps"], metric)
        outcomes = launcher.run_methods([m.name for m in chosen], cfg, ui, args.timeout)
        target, target_rule = final_target(plan["target"], metric, outcomes, args.target_margin)
        for m in chosen:
            got = outcomes.get(m.name, {"error": "not run", "unavailable": False})
            if "results" in got:
                rows.append(report.summarize(m.name, m.summary, got["results"], target, args.workers, metric))
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
    meta = {"started": started, "command": f"python -m cser_hooks.bench {command}".strip(), "data": plan["data"],
            "data_info": info, "model": args.model, "params": params, "world": args.workers,
            "steps": plan["steps"], "batch": plan["batch"], "lr": plan["lr"], "momentum": args.momentum,
            "weight_decay": args.weight_decay, "seed": args.seed, "network": network,
            "target": target, "stop_at_target": bool(args.stop_at_target), "block": block,
            "metric": metric.key, "target_rule": target_rule}
    if plan["clip_grad"] or plan["warmup"] != 0.05:
        meta.update(clip_grad=plan["clip_grad"], warmup=plan["warmup"])
    if text:
        meta.update(gpt=model_kw, eval_windows=args.eval_windows, eval_every=plan["eval_every"],
                    model_text=models.describe(args.model, model),
                    batch_text=f"batch {plan['batch']} windows of {model_kw['context']} bytes",
                    data_info=write_file_list(info, out_dir))
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "methods": rows}, indent=1, default=str))
    md = report.markdown(rows, meta)
    plots.plots(rows, out_dir, target, metric)
    (out_dir / "report.md").write_text(md)
    print(report.main_table(rows, metric))
    if args.link:
        print("\nbytes on the emulated link (per worker per step):\n" + report.link_table(rows))
    print(f"\nreport: {out_dir / 'report.md'} (plots: {', '.join(metric.plot_names())})")
    code = 0 if all(r["status"] == "ok" for r in rows) else 1
    if args.quick:
        problems = report.validate(out_dir, [m.name for m in chosen], metric)
        if problems:
            print("--quick self-check FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 2
        print("--quick self-check passed: every method has a row of finite numbers; plots written",
              file=sys.stderr)
    return code


def gpt_config(args, defaults: dict) -> dict:
    """``layers``, ``dim``, ``heads``, ``context`` of ``--model gpt`` (the flags over ``defaults``)."""
    given = {"layers": args.gpt_layers, "dim": args.gpt_dim, "heads": args.gpt_heads, "context": args.context}
    cfg = {k: int(v if v is not None else defaults[k]) for k, v in given.items()}
    if min(cfg.values()) < 1 or args.eval_windows < 1:
        raise SystemExit("--gpt-layers, --gpt-dim, --gpt-heads, --context and --eval-windows must be >= 1")
    return cfg


def check_data(info: dict, workers: int, batch: int, context: int | None) -> None:
    """Enough data for the run: samples for every worker's batch, or bytes for a context window."""
    if info.get("kind") == "text":
        if min(info["train"], info["test"]) <= context:
            raise SystemExit(f"--data {info['source']}: {info['train']} training / {info['test']} validation "
                             f"bytes; both must exceed --context {context}")
    elif info["train"] // workers < batch:
        raise SystemExit(f"{info['train']} training samples over {workers} workers leave fewer than "
                         f"--batch {batch} per worker: lower --batch or --workers")


def final_target(target, metric: metrics.Metric, outcomes: dict, margin: float) -> tuple[float | None, str | None]:
    """The target the report uses, and how it was set: as given, or dense's final value + ``margin``."""
    if target is not None or metric.higher_is_better:
        return target, None
    results = {n: o["results"] for n, o in outcomes.items() if "results" in o}
    target = report.loss_target(results, margin)
    if target is None:
        return None, None
    return target, f"dense's final {metric.name} {target - margin:.3f} + margin {margin:g} {metric.unit}"


def write_file_list(info: dict, out_dir: Path) -> dict:
    """Write the corpus's file list to ``out_dir/corpus_files.txt``; the description without the list."""
    (out_dir / "corpus_files.txt").write_text("".join(f + "\n" for f in info["files"]))
    return {**{k: v for k, v in info.items() if k != "files"}, "file_list": "corpus_files.txt"}
