"""Every CUDA kernel of cser_hooks.kernels compiles to PTX for sm_80 and sm_90 and assembles with
``ptxas -v`` without register spills (no GPU needed).

The PTX comes from ``python scripts/ptx_check.py`` run once per compute capability in a
subprocess (numba-cuda caches device functions per argument types, not per target, so each target
gets a fresh process); the two compilations run in parallel. The ptxas report is parsed by the
``ptxas`` fixture of tests/conftest.py.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ptx

ARCHS = {"sm_80": "8.0", "sm_90": "9.0"}
PTX_CHECK = Path(__file__).resolve().parents[1] / "scripts" / "ptx_check.py"


def load_ptx_check():
    """scripts/ptx_check.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("ptx_check", PTX_CHECK)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ptx_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ptx")
    procs = {}
    for arch, cc in ARCHS.items():
        cmd = [sys.executable, str(PTX_CHECK), "--cc", cc, "--out", str(root / arch)]
        procs[arch] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"PTX compilation for {arch} failed:\n{err[-4000:]}"
    return {arch: root / arch for arch in ARCHS}


def test_every_kernel_is_compiled():
    """The PTX list covers every @cuda.jit kernel (not device function) the kernel modules define."""
    from numba.cuda.dispatcher import CUDADispatcher

    from cser_hooks.kernels import cuda_bits, cuda_blocks, cuda_qsgd, cuda_segments, cuda_sign, cuda_topk

    ptx_check = load_ptx_check()

    defined = set()
    for mod in (cuda_bits, cuda_blocks, cuda_qsgd, cuda_segments, cuda_sign, cuda_topk):
        for obj in vars(mod).values():
            if isinstance(obj, CUDADispatcher) and not obj.targetoptions.get("device"):
                defined.add(obj.py_func)
    compiled = {fn for _, _, fn, _ in ptx_check.kernel_specs()}
    missing = sorted(fn.__qualname__ for fn in defined - compiled)
    assert not missing, f"kernels missing from ptx_check.kernel_specs: {missing}"
    assert len(defined) >= 18


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_kernels_assemble_without_spills(ptx_dirs, ptxas, arch):
    files = sorted(ptx_dirs[arch].glob("*.ptx"))
    assert len(files) >= 25
    rows, bad = [], []
    for path in files:
        rep = ptxas(path.read_text(), arch=arch)
        rows.append(f"{path.stem:40s} {rep.registers:4d} regs  spill st {rep.spill_stores} ld {rep.spill_loads}"
                    f"  stack {rep.stack_frame}")
        if rep.spill_stores or rep.spill_loads:
            bad.append(path.stem)
    print(f"\nptxas -arch={arch} -v\n" + "\n".join(rows))
    assert not bad, f"kernels spilling registers on {arch}: {bad}"
