"""cser_hooks: communication-efficient data-parallel training for PyTorch DDP and Horovod.

Front ends: :mod:`cser_hooks.ddp` (comm hooks) and :mod:`cser_hooks.horovod` (compression classes).
Algorithms (written once): :mod:`cser_hooks.algorithms`. Compressors: :mod:`cser_hooks.compressors`.
"""
__version__ = "0.1.0"
