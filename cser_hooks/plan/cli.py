"""``python -m cser_hooks.plan``: will compression pay on my cluster? (modelled step time per method)

    python -m cser_hooks.plan --model mlp-wide --world-size 4 --bandwidth 100mbit --compute-ms 60
    python -m cser_hooks.plan --params 25000000 -W 64 --bandwidth 10gbit --latency 20us --compute-ms 150
    python -m cser_hooks.plan --buckets 6553600,6553600,1048576 -W 16 --bandwidth 1gbit --compute-ms 80 --extrapolate

Prints, per method (the benchmark's names: python -m cser_hooks.bench --help), the bytes one worker puts on
the wire per step (ring / pairwise model of cser_hooks/wire.py, resets and syncs amortised), the
communication time (every collective, nothing hidden), the part of it the backward pass does not hide,
the compression time, the predicted step time and the speed-up over dense allreduce, then a one-line
recommendation ("dense allreduce is faster here" when no method saves 5 %). The formulas are in
cser_hooks/plan/timing.py and docs/plan.md. The figures are modelled, not measured.
"""
from __future__ import annotations

import argparse
import sys

from ..bench import methods as bench_methods
from ..bench import models
from . import api
from . import costs as costs_mod
from .timing import DEFAULT_OVERHEAD, Link, Prediction, rate_text

HEADER = ("method", "wire MB/step", "collectives/step", "comm ms", "not hidden ms", "compress ms", "step ms",
          "vs dense")
MNIST1D = ((40,), 10)  # the bench's default data: input shape, classes (for --model)
PLAN_MODELS = ("cnn", "mlp", "mlp-wide")  # cser_hooks/bench/models.py


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cser_hooks.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", choices=PLAN_MODELS,
                      help="a benchmark model (cser_hooks/bench/models.py) on MNIST-1D inputs: cnn (~10k "
                           "parameters), mlp, mlp-wide (5.37M)")
    what.add_argument("--params", type=int, help="parameter count only: modelled as 2048 x 2048 tensors "
                      "(16 MiB) plus the remainder, bucketed by --bucket-cap-mb")
    what.add_argument("--buckets", help="comma-separated bucket sizes in elements, in the order DDP reduces them "
                      "(one bucket each; shapes taken as square matrices)")
    p.add_argument("--bucket-cap-mb", type=float, default=25.0,
                   help="DDP's bucket_cap_mb for --model/--params (default 25, as the bench passes it; torch's "
                        "own default, bucket_cap_mb=None, adds a 1 MiB first bucket: Workload(bucket_cap_mb=None))")
    p.add_argument("--world-size", "-W", type=int, default=4, help="number of workers W (default 4)")
    p.add_argument("--bandwidth", default="1gbit",
                   help="link rate per worker, each way, as tc writes it: 100mbit, 1gbit, 10gbit, 500kbit "
                        "(bits/s; default 1gbit)")
    p.add_argument("--latency", default="50us", help="latency per message (one ring hop): 50us, 1ms (default 50us)")
    p.add_argument("--overhead", type=float, default=DEFAULT_OVERHEAD,
                   help=f"protocol bytes per payload byte (default {DEFAULT_OVERHEAD}: +5.6 %% measured on the "
                        f"bench's veths, docs/bench-link-100mbit)")
    p.add_argument("--sync", default="0us",
                   help="fixed cost per step that communicates, beyond --latency: the ranks' arrival skew, paid "
                        "at the step's first collective (default 0). Measure it in your job as the step time of a "
                        "method that allreduces a few bytes each step (bench: ef-rb@1/1000000) minus this "
                        "command's prediction for that method with --sync 0 (the step without communication "
                        "plus its tiny allreduce and its passes over the bucket); 4 workers sharing 2 cores: "
                        "8-45 ms")
    p.add_argument("--compute-ms", type=float, required=True,
                   help="measured forward + backward + optimizer time of one step WITHOUT communication, ms")
    p.add_argument("--backward-share", type=float, default=0.6,
                   help="share of --compute-ms in the backward pass, which bucket communication overlaps "
                        "(default 0.6, an assumption)")
    p.add_argument("--methods", default=",".join(api.DEFAULT_METHODS),
                   help="comma-separated bench method names (presets and parametric forms, e.g. cser@1/64:1/4:16, "
                        "ef-rb@1/16, powersgd@4); dense is always included. Default: %(default)s")
    p.add_argument("--block", type=int, help="random-block size (default: the bench's rule, 256 from 1M "
                   "parameters, else 32)")
    p.add_argument("--kernel-report", help="kernel throughputs: a report of scripts/bench_kernels.py (default: "
                   "docs/bench-kernels/report.md of this checkout, else a built-in copy of it)")
    p.add_argument("--rate", action="append", default=[], metavar="OP=GBPS",
                   help=f"override one kernel throughput in GB/s (repeatable); ops: {', '.join(costs_mod.OPS)}")
    p.add_argument("--compress-slowdown", type=float, default=1.0,
                   help="multiply compression times (fewer cores per worker than the kernel report had; "
                        "default 1)")
    p.add_argument("--rank", type=int, default=0, help="whose bytes (all_to_all differs by rank; default 0, the "
                   "largest chunk)")
    p.add_argument("--extrapolate", action="store_true",
                   help=f"also print a MODELLED grid: W = {', '.join(map(str, api.EXTRAPOLATE_WORLDS))} x "
                        f"{', '.join(api.EXTRAPOLATE_RATES)}, best method and its speed-up per cell")
    return p


def workload_of(args) -> api.wl.Workload:
    kw = {"backward_share": args.backward_share, "block": args.block}
    compute_s = args.compute_ms / 1e3
    if args.model:
        shape, classes = MNIST1D
        module = models.build(args.model, shape, classes)
        return api.wl.from_module(module, compute_s, bucket_cap_mb=args.bucket_cap_mb, **kw)
    if args.params is not None:
        return api.wl.from_params(args.params, compute_s, bucket_cap_mb=args.bucket_cap_mb, **kw)
    try:
        sizes = [int(float(x)) for x in args.buckets.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--buckets {args.buckets!r}: give element counts, e.g. 6553600,1048576") from None
    return api.wl.from_bucket_sizes(sizes, compute_s, **kw)


def costs_of(args) -> costs_mod.Costs:
    overrides = {}
    for item in args.rate:
        op, eq, v = item.partition("=")
        try:
            overrides[op.strip()] = float(v)
        except ValueError:
            raise SystemExit(f"--rate {item!r}: give OP=GBPS, e.g. topk_select=2.5") from None
        if not eq:
            raise SystemExit(f"--rate {item!r}: give OP=GBPS")
    try:
        return costs_mod.load(args.kernel_report, args.compress_slowdown).with_overrides(overrides)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--kernel-report/--rate: {exc}") from None


def table(preds: list[Prediction]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|---|" + "---:|" * (len(HEADER) - 1)]
    for p in preds:
        cells = [p.method, f"{p.wire_bytes / 1e6:.3f}", f"{p.collectives:.2f}", f"{1e3 * p.comm_s:.1f}",
                 f"{1e3 * (p.exposed_s + p.blocking_s):.1f}", f"{1e3 * p.compress_s:.1f}", f"{1e3 * p.step_s:.1f}",
                 f"{p.speedup:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid(cells: list[dict]) -> str:
    rates = list(dict.fromkeys(c["rate"] for c in cells))
    worlds = list(dict.fromkeys(c["world"] for c in cells))
    at = {(c["world"], c["rate"]): c for c in cells}
    lines = ["MODELLED, not measured (on paper: same model, compute time and kernels; only W and the rate change)",
             "| W | " + " | ".join(rate_text(Link.parse(r).bandwidth_bps) for r in rates) + " |",
             "|---:|" + "---|" * len(rates)]
    for w in worlds:
        row = []
        for r in rates:
            b = at[(w, r)]["best"]
            row.append("dense" if b.method == "dense" else f"{b.method} {b.speedup:.2f}x")
        lines.append(f"| {w} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.world_size < 1 or args.compute_ms < 0:
        raise SystemExit("--world-size must be >= 1 and --compute-ms >= 0")
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    for n in names:
        bench_methods.get(n)  # the bench's own error for unknown names
    try:
        link = Link.parse(args.bandwidth, args.latency, args.overhead, args.sync)
        work = workload_of(args)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    costs = costs_of(args)
    preds = api.estimate(work, link, args.world_size, methods=names, costs=costs, rank=args.rank)
    print(f"model: {work.params:,} parameters ({work.nbytes / 1e6:.2f} MB fp32), W = {args.world_size}, "
          f"link {link.describe()}, compute {args.compute_ms:g} ms/step (backward share {work.backward_share:g})")
    print(f"kernel throughputs: {costs.source}" + (f", x{costs.slowdown:g} slowdown" if costs.slowdown != 1 else ""))
    print("MODELLED step times (not measured): step = compute + compress + blocking + max(0, hook comm - backward);"
          " wire bytes per worker, ring model (cser_hooks/wire.py), resets/syncs amortised\n")
    print(table(preds))
    print()
    print(api.recommend(preds)[1])
    if args.extrapolate:
        cells = api.extrapolate(work, latency=args.latency, overhead=args.overhead, sync=args.sync, methods=names,
                                costs=costs, rank=args.rank)
        print()
        print(grid(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
