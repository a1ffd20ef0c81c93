"""Markers, environment checks and shared fixtures of the test suite.

Markers (also listed in pyproject.toml):
    cudasim  Numba CUDA simulator tests. The simulator is chosen when numba is *imported*
             (NUMBA_ENABLE_CUDASIM=1), so these run in their own pytest process:
             ``NUMBA_ENABLE_CUDASIM=1 pytest -m cudasim`` (``pytest -m cudasim`` alone sets the variable
             here, before anything imports numba). scripts/test.sh runs both passes. In a process without
             the simulator they are skipped with that instruction; in a simulator process every
             non-cudasim test that needs real numba.cuda (ptx, gpu) is skipped.
    ptx      real PTX compilation (numba.cuda.compile_ptx) + ptxas. Skipped with the reason when
             numba-cuda / NVVM / ptxas are missing, but *fails* under CI=true (CI installs them).
    gpu      needs a CUDA device: skipped when torch.cuda.is_available() is False (always, here).
    horovod  real horovodrun --gloo jobs: skipped when horovod.torch does not import, *fails* under
             CI=true (scripts/setup.sh installs Horovod).
    slow     longer tests (still run by scripts/test.sh).
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

MARKERS = {
    "cudasim": "runs Numba CUDA kernels in the simulator (NUMBA_ENABLE_CUDASIM=1; pytest -m cudasim)",
    "ptx": "compiles kernels with numba.cuda.compile_ptx and assembles them with ptxas",
    "gpu": "needs a CUDA GPU",
    "horovod": "runs real Horovod jobs (horovodrun --gloo)",
    "slow": "takes more than ~30 s",
}

ON_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def simulator_enabled() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "").strip() not in ("", "0")


def pytest_configure(config: pytest.Config) -> None:
    known = {line.split(":", 1)[0].strip() for line in config.getini("markers")}
    for name, text in MARKERS.items():
        if name not in known:
            config.addinivalue_line("markers", f"{name}: {text}")
    markexpr = (config.option.markexpr or "").strip()
    if markexpr == "cudasim" and not simulator_enabled():
        if "numba" in sys.modules:
            raise pytest.UsageError("-m cudasim: numba was imported before the simulator could be enabled; "
                                    "run NUMBA_ENABLE_CUDASIM=1 pytest -m cudasim")
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    sim = simulator_enabled()
    for item in items:
        marks = {m.name for m in item.iter_markers()}
        if "cudasim" in marks and "ptx" in marks:
            raise pytest.UsageError(f"{item.nodeid}: a test is either cudasim (simulator process) or ptx "
                                    "(real numba.cuda), not both")
        if "cudasim" in marks and not sim:
            item.add_marker(pytest.mark.skip(
                reason="cudasim test: needs NUMBA_ENABLE_CUDASIM=1 before numba is imported; run "
                       "`pytest -m cudasim` (scripts/test.sh runs it as its second pass)"))
        elif sim and "cudasim" not in marks and marks & {"ptx", "gpu"}:
            item.add_marker(pytest.mark.skip(
                reason="this pytest process runs the Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1); "
                       "ptx/gpu tests run in the main pass"))
        elif "gpu" in marks and not _cuda_available():
            item.add_marker(pytest.mark.skip(reason="gpu test: torch.cuda.is_available() is False"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    marks = {m.name for m in item.iter_markers()}
    if "ptx" in marks:
        _require("ptx", ptx_toolchain_problem(),
                 "CI installs numba-cuda[cu13] and nvidia-nvvm (setup.py extra 'test'); ptxas comes from "
                 "the CUDA toolkit on PATH")
    if "horovod" in marks:
        _require("horovod", horovod_problem(),
                 "scripts/setup.sh installs Horovod (scripts/install_horovod.sh)")


def _require(marker: str, problem: str | None, ci_hint: str) -> None:
    if problem is None:
        return
    if ON_CI:
        pytest.fail(f"{marker} test cannot run under CI=true: {problem}. {ci_hint}", pytrace=False)
    pytest.skip(f"{marker} test: {problem}")


@functools.cache
def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------------------
# ptx: numba.cuda.compile_ptx (NVVM from the nvidia-nvvm wheel, found by cuda-pathfinder) and ptxas


def _ptx_probe_kernel(a):
    a[0] = 1.0


def find_ptxas() -> str | None:
    """ptxas on PATH, else in $CUDA_HOME/bin or /usr/local/cuda*/bin."""
    found = shutil.which("ptxas")
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    roots += sorted(str(p) for p in Path("/usr/local").glob("cuda-*"))
    for root in roots:
        if root and (Path(root) / "bin" / "ptxas").is_file():
            return str(Path(root) / "bin" / "ptxas")
    return None


@functools.cache
def ptx_toolchain_problem() -> str | None:
    """None when compile_ptx and ptxas work, else what is missing."""
    if simulator_enabled():
        return "NUMBA_ENABLE_CUDASIM is set in this process, so numba.cuda is the simulator"
    try:
        from numba import cuda

        cuda.compile_ptx(_ptx_probe_kernel, "void(float32[:])", cc=(8, 0))
    except Exception as exc:  # ImportError, missing NVVM, ...
        return f"numba.cuda.compile_ptx does not work ({type(exc).__name__}: {exc})"
    if find_ptxas() is None:
        return "ptxas not found on PATH, $CUDA_HOME/bin or /usr/local/cuda*/bin"
    return None


@dataclass
class PtxasReport:
    """What ``ptxas -v`` says about one entry function."""

    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    text: str


def run_ptxas(ptx: str, arch: str = "sm_90", workdir: Path | None = None) -> PtxasReport:
    """Assemble ``ptx`` with ``ptxas -arch=<arch> -v`` and parse registers / spills of its (only) entry."""
    ptxas = find_ptxas()
    if ptxas is None:
        raise RuntimeError("ptxas not found (install the CUDA toolkit or put its bin/ on PATH)")
    import tempfile

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run([ptxas, f"-arch={arch}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True, timeout=120)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas -arch={arch} failed (exit {proc.returncode}):\n{text}")
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if len(regs) != 1 or len(spills) != 1:
        raise RuntimeError(f"expected one entry function in ptxas -v output, got:\n{text}")
    frame, stores, loads = (int(v) for v in spills[0])
    return PtxasReport(registers=int(regs[0]), spill_stores=stores, spill_loads=loads, stack_frame=frame,
                       text=text)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for a module whose references run tiny ops beside real ranks:
    more threads only fight the rank processes for this machine's 2 cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def ptxas(tmp_path):
    """``ptxas(ptx_text, arch="sm_90") -> PtxasReport`` (registers, spill_stores, spill_loads, ...)."""
    return functools.partial(run_ptxas, workdir=tmp_path)


# --------------------------------------------------------------------------------------------------
# horovod


@functools.cache
def horovod_problem() -> str | None:
    """None when horovod.torch (with gloo) imports and horovodrun sits next to sys.executable."""
    code = "import horovod.torch as hvd; assert hvd.gloo_built(), 'Horovod built without gloo'"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "importing horovod.torch took more than 120 s"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"horovod.torch does not import in {sys.executable} ({last})"
    runner = Path(sys.executable).parent / "horovodrun"
    if not runner.exists():
        return f"{runner} not found"
    return None
