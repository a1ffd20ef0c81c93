"""Compile every CUDA kernel of cser_hooks.kernels to PTX for a given compute capability, without a GPU.

    python scripts/ptx_check.py --cc 9.0 --out DIR [--all]

writes one ``<kernel>[<variant>].ptx`` per kernel specialisation into DIR (tests/test_kernels_ptx.py
assembles them with ``ptxas -v`` and checks registers and spills). Without ``--all`` each kernel is
compiled for float32 plus the 16-bit variants of the kernels that do the most arithmetic.

numba-cuda 0.30 compiles a *device* function for the compute capability of the current device
(``numba.cuda.dispatcher.get_current_device``), even inside ``compile_ptx(..., cc=...)``; with no
GPU that lookup fails. :func:`target_device` stands in a device of the requested capability for
the duration of the compilation, so device functions are built for the same target as the kernel.
Run one capability per process: device functions are cached per argument types, not per target.

A development tool, not part of the installed package: it imports ``cser_hooks.kernels`` from the
checkout it sits in when run as a script (the repository root goes first on ``sys.path``), installed
or not; tests/test_kernels_ptx.py also loads it as a module for :func:`kernel_specs`.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def target_device(cc: tuple[int, int]):
    """Make numba-cuda's device-function compiler see a device of compute capability ``cc``."""
    from numba.cuda import dispatcher

    class _Target:
        compute_capability = cc

    saved = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: _Target()
    try:
        yield
    finally:
        dispatcher.get_current_device = saved


def kernel_specs(full: bool = False):
    """[(name, variant, python function, argument types)] of every kernel."""
    from numba import types as nt

    from cser_hooks.kernels import cuda_bits, cuda_blocks, cuda_qsgd, cuda_segments, cuda_sign, cuda_topk

    def arr(t):
        return nt.Array(t, 1, "C")

    f32, f64, u8, u16, i16, i32, i64 = (arr(nt.float32), arr(nt.float64), arr(nt.uint8), arr(nt.uint16),
                                        arr(nt.int16), arr(nt.int32), arr(nt.int64))
    I, B, F = nt.int64, nt.boolean, nt.float32
    data = {"f32": f32, "f16": u16, "bf16": i16}
    outs = {"f32": f32, "f16": u16, "bf16": i16, "f64": f64}
    heavy = ("f32", "f16", "bf16")
    light = ("f32",) if not full else heavy
    specs = [("finalize_kernel", "", cuda_segments.finalize_kernel, (i64, I, I, I, I, I, f32, f32))]
    for v in heavy:
        g = data[v]
        specs += [("sign_tile", v, cuda_sign.sign_tile, (g, I, f32, B, i64, I, I, I, u8, f32, f32, f32, B)),
                  ("qsgd_tile", v, cuda_qsgd.qsgd_tile,
                   (g, I, f32, B, I, I, i64, I, I, I, I, F, I, u8, u8, f32, f32, f32, B))]
    for v in light:
        g = data[v]
        specs += [("sign_edges", v, cuda_sign.sign_edges, (g, I, f32, B, i64, I, I, I, f32, f32)),
                  ("qsgd_edges", v, cuda_qsgd.qsgd_edges, (g, I, f32, B, I, I, i64, I, I, I, I, F, I, u8, f32, f32, B)),
                  ("topk_hist", v, cuda_topk.topk_hist, (g, I, I, i64, I, I, i32)),
                  ("topk_count", v, cuda_topk.topk_count, (g, I, I, i64, I, i64))]
    for v in ("f32", "bf16") if not full else heavy:
        g = data[v]
        specs += [("topk_compact", v, cuda_topk.topk_compact, (g, I, I, i64, I, I, i64, g, i32))]
    for v in ("f32", "bf16") if not full else tuple(outs):
        o = outs[v]
        specs += [("sign_decompress_kernel", v, cuda_sign.sign_decompress_kernel, (u8, f32, i64, I, I, o, I, B, F)),
                  ("qsgd_decompress_kernel", v, cuda_qsgd.qsgd_decompress_kernel,
                   (u8, u8, f32, F, I, I, I, o, I, B, F)),
                  ("scatter_kernel add", v, cuda_blocks.scatter_kernel, (o, i64, I, I, o, B, I)),
                  ("scatter_indices_kernel", v, cuda_blocks.scatter_indices_kernel, (o, i32, o, I))]
    for v, raw in (("i32", i32),) if not full else (("i16", i16), ("i32", i32), ("i64", i64)):
        specs += [("gather_kernel", v, cuda_blocks.gather_kernel, (raw, i64, I, I, raw, B)),
                  ("scatter_kernel", v, cuda_blocks.scatter_kernel, (raw, i64, I, I, raw, B, I))]
    specs += [("topk_init", "", cuda_topk.topk_init, (i64, i32, I)),
              ("topk_pick", "", cuda_topk.topk_pick, (i64, I, I, i32)),
              ("topk_scan", "", cuda_topk.topk_scan, (i64, I, i64)),
              ("pack_codes_kernel", "", cuda_bits.pack_codes_kernel, (u8, I, I, u8)),
              ("unpack_codes_kernel", "", cuda_bits.unpack_codes_kernel, (u8, I, I, u8))]
    return [(name, variant, disp.py_func, sig) for name, variant, disp, sig in specs]


def compile_all(cc: tuple[int, int], out: Path, full: bool = False) -> list[Path]:
    from numba import cuda

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with target_device(cc):
        for name, variant, fn, sig in kernel_specs(full):
            ptx, _ = cuda.compile_ptx(fn, sig, cc=cc)
            path = out / f"{name.replace(' ', '_')}[{variant}].ptx"
            path.write_text(ptx)
            paths.append(path)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="compile the cser_hooks CUDA kernels to PTX")
    ap.add_argument("--cc", default="9.0", help="compute capability, e.g. 8.0 or 9.0")
    ap.add_argument("--out", required=True, help="directory for the .ptx files")
    ap.add_argument("--all", action="store_true", help="every dtype specialisation")
    args = ap.parse_args(argv)
    major, minor = (int(v) for v in args.cc.split("."))
    for path in compile_all((major, minor), Path(args.out), args.all):
        print(path.name)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # this checkout's cser_hooks, installed or not
    sys.exit(main())
