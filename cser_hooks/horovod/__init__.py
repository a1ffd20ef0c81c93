"""Horovod front end: compression objects for ``hvd.DistributedOptimizer`` and an allgather path.

One line to adopt (the compression object needs the parameter *names*: Horovod hands ``compress``
a bare tensor, horovod#3312)::

    cser = CSERCompression(model.named_parameters(), c1="random_block:ratio=1/64",
                           c2="random_block:ratio=1/4", period=16, optimizer=opt)
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), compression=cser)

The package holds no algorithm: every class builds one of ``cser_hooks.algorithms`` and drives it
(composition, :mod:`.driver`). Where things are:

* :mod:`.casts`: :class:`FP16Compression`, :class:`BF16Compression` (stateless, any tensor).
* :mod:`.compression`: :class:`RandomBlockCompression`, :class:`RandomKCompression` (avg_j C(g_j)
  with a shared-seed mask), :class:`EFCompression` (docs/algorithms.md §2) and
  :class:`CSERCompression` (§3) over shared-mask compressors.
* :mod:`.allgather`: :class:`AllgatherEF`, :class:`AllgatherCSER` for any compressor (top_k,
  sign_blockwise, qsgd, compose) through ``hvd.allgather``; they replace ``hvd.DistributedOptimizer``.
* :mod:`.names`: gradient tensor -> parameter name; :mod:`.comm`: :class:`HorovodCommunicator`.

Limits (clear errors): ``op=hvd.Adasum``; tensors that are not gradients of the named parameters
(``hvd.allreduce(t, compression=...)``: use the casts there); Horovod elastic (refused); ``op``
must be ``hvd.Average`` (the default) and the process set the global one.
"""
from .allgather import AllgatherCSER, AllgatherEF
from .casts import BF16Compression, FP16Compression
from .comm import HorovodCommunicator
from .compression import CSERCompression, EFCompression, RandomBlockCompression, RandomKCompression

__all__ = ["FP16Compression", "BF16Compression", "RandomBlockCompression", "RandomKCompression", "EFCompression",
           "CSERCompression", "AllgatherEF", "AllgatherCSER", "HorovodCommunicator"]
