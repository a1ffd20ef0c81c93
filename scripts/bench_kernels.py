"""CPU throughput of the compressor kernels next to this machine's copy bandwidth.

For each size (MB of fp32 gradient) and operation, prints GB/s of *gradient processed* (gradient
bytes / time) next to two copy bandwidths measured in the same run on the same tensor and the
ratios: ``torch.clone`` (allocates the destination: includes the page faults of fresh memory) and
``copy_`` into a preallocated tensor (the pure memory copy, the stricter baseline), as a markdown
table, also written to a file (default reports/bench_kernels.md).

    python scripts/bench_kernels.py [out.md] [--sizes 1,16,64,256] [--min-time 0.3]

Operations (docs/algorithms.md §1-2; all through cser_hooks.kernels, CPU tensors):

* sign compress+EF: ``sign_compress_ef`` (p = g + e, bits + scales, e <- p - C(p)) with blocks of 64
  (dist-EF-SGDM's: one scale per 64 elements), of 4096 (each block inside one cache-sized tile: one
  read of g and e) and with one block per 2**20 elements (like per-parameter blocks of 4 MB tensors: a
  block's scale is known only after reading all of it, so g and e are read twice); sign decompress:
  ``sign_decompress`` (blocks of 64 and 2^20).
* qsgd compress+EF: ``qsgd_compress`` with s = 15 (4-bit levels), blocks of 4096 and of 64 (QPRSGD's:
  one norm per 64 elements), residual written in place into p; the rounding uniforms are drawn
  inside the kernel (a counter hash per element), so the row is the whole compress; qsgd decompress,
  for both block sizes.
* random_block gather+zero: ``block_gather_zero`` at ratio 1/4, b = 256 (the EF residual update in
  one pass); random_block scatter: ``block_scatter`` of that payload.
* top-k select: ``topk_select`` at k = numel/64 next to ``torch.topk(x.abs(), k)``;
  top-k scatter-add: ``scatter_add_indices`` of that payload.
* baselines: ``torch.clone``, ``copy_`` into a preallocated tensor, fp16 cast into a preallocated
  buffer.

Each row is the best of several repetitions (at least 3, and at least ``--min-time`` seconds).

torch and Numba each run an OpenMP thread pool (two runtimes); by default both spin after a
parallel region and steal the 2 cores from each other. Unless OMP_WAIT_POLICY is already set, this
script sets it to PASSIVE before importing them (the header says which policy was in force).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402
import torch  # noqa: E402

import cser_hooks.kernels as K  # noqa: E402


def best_time(fn, min_time: float, min_reps: int = 3) -> float:
    fn()  # warm-up (compilation happens here)
    best = float("inf")
    spent = 0.0
    reps = 0
    while reps < min_reps or spent < min_time:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best = min(best, dt)
        spent += dt
        reps += 1
        if reps >= 50:
            break
    return best


def bench_size(mb: int, min_time: float):
    n = mb * (1 << 18)
    gen = torch.Generator().manual_seed(mb)
    g = torch.randn(n, generator=gen)
    e = torch.randn(n, generator=gen) * 0.01
    p = torch.randn(n, generator=gen)
    rows = []

    def add(name, fn):
        rows.append((name, best_time(fn, min_time)))

    add("copy (torch.clone)", lambda: g.clone())
    dst = torch.empty_like(g)
    add("copy (copy_ into preallocated)", lambda: dst.copy_(g))
    half = torch.empty(n, dtype=torch.float16)
    add("fp16 cast (baseline)", lambda: half.copy_(g))

    bits = torch.empty((n + 7) // 8, dtype=torch.uint8)
    out = torch.empty(n)
    for blk, label in ((64, "blocks of 64"), (4096, "blocks of 4096"), (1 << 20, "blocks of 2^20")):
        offsets = torch.arange(0, n + 1, blk, dtype=torch.int64)
        if offsets[-1] != n:
            offsets = torch.cat([offsets, torch.tensor([n])])
        scales = torch.empty(offsets.numel() - 1)
        add(f"sign compress+EF ({label})", lambda o=offsets, sc=scales: K.sign_compress_ef(g, e, o, bits, sc))
        if blk != 4096:  # 64: dist-EF-SGDM's blocks; 2^20: per-tensor scales
            add(f"sign decompress ({label})", lambda o=offsets, sc=scales: K.sign_decompress(bits, sc, o, out))

    s = 15
    nbits = K.qsgd_level_bits(s)
    signs = torch.empty((n + 7) // 8, dtype=torch.uint8)
    levels = torch.empty((n * nbits + 7) // 8, dtype=torch.uint8)
    for block in (4096, 64):  # 64: QPRSGD's blocks (one norm per 64 elements)
        norms = torch.empty((n + block - 1) // block)
        add(f"qsgd compress+EF (s=15, blocks of {block})",
            lambda b=block, nm=norms: K.qsgd_compress(p, 12345, s, b, signs, levels, nm, residual_out=p))
        add(f"qsgd decompress (blocks of {block})",
            lambda b=block, nm=norms: K.qsgd_decompress(signs, levels, nm, s, b, out))

    b = 256
    nblocks = (n + b - 1) // b
    k = min(nblocks, -(-n // 4 // b))
    blocks = torch.randperm(nblocks, generator=gen)[:k].sort().values
    payload = torch.empty(k * b)
    add("random_block gather+zero (1/4)", lambda: K.block_gather_zero(p, blocks, b, payload))
    add("random_block scatter (1/4)", lambda: K.block_scatter(payload, blocks, b, out))

    kk = max(1, n // 64)
    add("top-k select (1/64)", lambda: K.topk_select(g, kk))
    add("torch.topk(|x|) (baseline, 1/64)", lambda: torch.topk(g.abs(), kk))
    vals, idx = K.topk_select(g, kk)
    add("top-k scatter-add (1/64)", lambda: K.scatter_add_indices(vals, idx, out))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default="reports/bench_kernels.md")
    ap.add_argument("--sizes", default="1,16,64,256", help="MB of fp32 gradient, comma separated")
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds of repetitions per row")
    args = ap.parse_args(argv)
    sizes = [int(v) for v in args.sizes.split(",")]

    start = time.time()
    lines = [
        "# cser_hooks kernel throughput (CPU)",
        "",
        f"machine: {platform.machine()}, {os.cpu_count()} logical cores, load average "
        f"{', '.join(f'{v:.1f}' for v in os.getloadavg())} at start; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), numba {numba.__version__} ({numba.get_num_threads()} threads), "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
        "",
        "GB/s = fp32 gradient bytes processed per second (best of repetitions). clone = torch.clone of the",
        "same tensor in the same run (allocates its output), copy_ = copy into a preallocated tensor;",
        "ratios = op GB/s / those GB/s.",
        "",
        "| op | MB | ms | GB/s | clone GB/s | ratio vs clone | copy_ GB/s | ratio vs copy_ |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mb in sizes:
        rows = bench_size(mb, args.min_time)
        clone_gbs = mb / 1024 / rows[0][1]
        copy_gbs = mb / 1024 / rows[1][1]
        for name, t in rows:
            gbs = mb / 1024 / t
            lines.append(f"| {name} | {mb} | {t * 1e3:.2f} | {gbs:.2f} | {clone_gbs:.2f} | {gbs / clone_gbs:.2f} "
                         f"| {copy_gbs:.2f} | {gbs / copy_gbs:.2f} |")
        print(f"[{mb} MB done, {time.time() - start:.0f} s]", file=sys.stderr)
    lines += ["", f"threading layer: {numba.threading_layer()}; total bench time {time.time() - start:.0f} s", ""]
    text = "\n".join(lines)
    print(text)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
