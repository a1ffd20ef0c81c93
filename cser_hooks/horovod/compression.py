"""The ``compression=`` objects that keep state: each builds one core algorithm and a :class:`HorovodDriver`.

Only shared-mask compressors fit Horovod's ``compression=`` path: Horovod *averages* what
``compress`` returns, which is only correct when every rank's payload holds the same coordinates
(docs/algorithms.md §1). Non-linear ones go through :mod:`cser_hooks.horovod.allgather`.
"""
from __future__ import annotations

from ..algorithms.cser import CSER
from ..algorithms.ef import ErrorFeedback
from ..compressors import get_compressor
from .driver import HorovodDriver, require_allreducible


class RandomBlockCompression(HorovodDriver):
    """``compression=RandomBlockCompression(1/64, 256, named_parameters=model.named_parameters())``.

    Each gradient tensor is cut into blocks of ``block`` elements and ⌈ratio·numel/block⌉ blocks are
    chosen from a seed shared by all ranks (seed, step, parameter name): Horovod allreduces only those
    values, indices never travel. Without error feedback the rest of the gradient is dropped (plain
    compressed SGD, the core ``ErrorFeedback`` with ``error_feedback=False``: no residual is kept); use
    :class:`EFCompression` or :class:`CSERCompression` to keep it. ``scaled=True`` makes C unbiased
    (values × numel/sent).
    """

    def __init__(self, ratio: float, block: int = 256, *, named_parameters=None, seed: int = 0,
                 warmup_steps: int = 0, scaled: bool = False, check_finite: bool = True,
                 min_compress_numel: int = 0):
        spec = f"random_block:ratio={float(ratio)!r},block={int(block)}" + (",scaled=1" if scaled else "")
        super().__init__(type(self).__name__, named_parameters, ErrorFeedback, spec, error_feedback=False,
                         seed=seed, warmup_steps=warmup_steps, check_finite=check_finite,
                         min_compress_numel=min_compress_numel)


class RandomKCompression(RandomBlockCompression):
    """``compression=RandomKCompression(1/64, named_parameters=...)``: 1-element blocks."""

    def __init__(self, ratio: float, *, named_parameters=None, seed: int = 0, warmup_steps: int = 0,
                 scaled: bool = False, check_finite: bool = True,
                 min_compress_numel: int = 0):
        super().__init__(ratio, 1, named_parameters=named_parameters, seed=seed, warmup_steps=warmup_steps,
                         scaled=scaled, check_finite=check_finite,
                         min_compress_numel=min_compress_numel)


class EFCompression(HorovodDriver):
    """Error feedback (docs/algorithms.md §2) as a Horovod compression; the knobs are those of
    :class:`~cser_hooks.algorithms.ef.ErrorFeedback`.

    ``compressor`` must be shared-mask (random_block, random_k; identity/fp16 also work); for top_k,
    sign_blockwise, qsgd or compose use :class:`~cser_hooks.horovod.AllgatherEF`. Pass
    ``optimizer=`` to rescale the residual when the learning rate changes and to close each step
    right after ``optimizer.step()``.
    """

    def __init__(self, named_parameters, compressor="random_block:ratio=1/32", *, seed: int = 0,
                 warmup_steps: int = 1, optimizer=None, error_feedback: bool = True, check_finite: bool = True,
                 min_compress_numel: int = 0):
        require_allreducible(get_compressor(compressor), "EFCompression", "AllgatherEF")
        super().__init__("EFCompression", named_parameters, ErrorFeedback, compressor,
                         error_feedback=error_feedback, seed=seed, warmup_steps=warmup_steps, optimizer=optimizer,
                         check_finite=check_finite, min_compress_numel=min_compress_numel)


class CSERCompression(HorovodDriver):
    """CSER (docs/algorithms.md §3) as a Horovod compression; the knobs are those of
    :class:`~cser_hooks.algorithms.cser.CSER`.

    The gradient part goes through Horovod's allreduce of the C1-selected values; the error reset
    averages the C2-selected blocks of the parameters in one grouped Horovod allreduce, right after
    ``optimizer.step()`` when the optimizer is attached (``optimizer=`` or :meth:`attach_optimizer`,
    the inner optimizer or the ``hvd.DistributedOptimizer``), else at the next step's ``compress`` of
    each parameter (one-step shift, as the DDP hook without optimizer). ``c1`` must be shared-mask
    (or ``zero`` for CSER-PL); for non-linear C1 use :class:`~cser_hooks.horovod.AllgatherCSER`.
    """

    def __init__(self, named_parameters, c1="random_block:ratio=1/64", c2="identity", period: int = 16, *,
                 seed: int = 0, warmup_steps: int = 1, optimizer=None, check_finite: bool = True,
                 min_compress_numel: int = 0):
        require_allreducible(get_compressor(c1), "CSERCompression", "AllgatherCSER")
        super().__init__("CSERCompression", named_parameters, CSER, c1, c2, period, seed=seed,
                         warmup_steps=warmup_steps, optimizer=optimizer, check_finite=check_finite,
                         min_compress_numel=min_compress_numel)
