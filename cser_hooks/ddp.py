"""DDP front end: one state + one comm hook per algorithm, in torch's own convention.

    state = CSERState(process_group=None, c1="random_block:ratio=1/64", c2="random_block:ratio=1/4",
                      period=16, optimizer=opt)
    ddp_model.register_comm_hook(state, cser_hook)

The adapter is thin: it turns a ``GradBucket`` into (key = ``bucket.index()``, the flat gradient,
the parameter offsets), runs warm-up / agreement / the algorithm's ``encode``, launches the one
collective from the hook call itself (docs/algorithms.md §8: never from a Future callback, so ranks
cannot interleave buckets differently on gloo), and decodes in the Future's callback (local math
only). The step counter advances on ``bucket.is_last()``.
"""
import torch
import torch.distributed as dist

from .algorithms.compskip import CompSkip
from .algorithms.cser import CSER
from .algorithms.dist_ef_sgdm import DistEFSGDM
from .algorithms.ef import ErrorFeedback
from .algorithms.qprsgd import QPRSGD
from .algorithms.qsparse import QsparseLocalSGD
from .comm import TorchDistCommunicator
from .exchange import StepContext, launch
from .nonfinite import nonfinite_flag
from .state import AlgorithmState

__all__ = ["EFState", "ef_hook", "CSERState", "cser_hook", "CompSkipState", "compskip_hook", "run_hook",
           "DistEFSGDMState", "dist_ef_sgdm_hook", "QsparseLocalSGDState", "qsparse_local_sgd_hook",
           "QPRSGDState", "qprsgd_hook"]


def _segments(state: AlgorithmState, key, params) -> list:
    """Element offsets of the bucket's parameters (block boundaries for sign_blockwise), cached per key.

    Recomputed when the sizes differ (DDP rebuilds its buckets after the first step)."""
    sizes = [p.numel() for p in params]
    hit = state.seg_cache.get(key)
    if hit is None or len(hit) != len(sizes) + 1 or any(b - a != n for a, b, n in zip(hit, hit[1:], sizes)):
        hit = [0]
        for n in sizes:
            hit.append(hit[-1] + n)
        state.seg_cache[key] = hit
    return hit


def run_hook(state: AlgorithmState, bucket: dist.GradBucket) -> torch.futures.Future:
    """The generic DDP comm hook body shared by every algorithm's hook.

    The algorithm always sees the state's canonical buckets (cser_hooks/bucket_layout.py): a DDP
    bucket equal to one goes straight through; other layouts (a fresh DDP's first iteration after a
    restart, another ``bucket_cap_mb``) are remapped, so results never depend on DDP's layout."""
    grad = bucket.buffer()
    layout = state.buckets
    try:
        params = bucket.parameters()
        pids = layout.ids_of(params, state.names_of(params))
        if layout.checking:
            layout.note_fingerprints(pids)
        if not state.agreed:
            state.check_agreement()
        state.begin_iteration(layout.iterations)
        state.count_dense(grad)
        if state.step < state.warmup_steps:
            state.comm.label = f"step {state.step} (warm-up), bucket {bucket.index()!r}"
            return state.comm.allreduce_mean_async(grad)
        key = bucket.index()
        layout.observe(key, pids, params, state.step)
        if layout.matches(key, pids):
            return _run_key(state, key, grad, list(params))
        return layout.remap(layout.iterations, grad, pids,
                            lambda k, flat: _run_key(state, k, flat, layout.key_params(k)))
    finally:
        if bucket.is_last():
            _check_all_launched(state)
            layout.verdict(state.comm)
            layout.iterations += 1
            state.finish_step()


def _run_key(state: AlgorithmState, key, grad: torch.Tensor, params: list) -> torch.futures.Future:
    """One canonical bucket: model-side work, encode, launch (from the hook call), decode in the callback."""
    ctx = StepContext(key, state.step, grad.numel(), _segments(state, key, params), state.names_of(params))
    where = f"step {ctx.step}, bucket {key!r}"
    state.comm.label = where
    if grad.numel() < state.min_compress_numel:
        return _dense_key(state, ctx, grad)
    state.before_key(key)
    state.before_bucket(ctx, params)
    ex = state.encode(grad, ctx)
    ctx.exchange = ex
    if state.guard is not None and ex.flag is not None:
        state.guard.expect()
    return _collective(state, where, lambda: launch(state.comm, ex), lambda got: state.decode(grad, got, ctx))


def _collective(state: AlgorithmState, where: str, start, then) -> torch.futures.Future:
    """``start()`` a collective from the hook call and ``then(value)`` in its callback; a failure in either
    becomes the error that names rank, step and bucket (``collective_failure``)."""
    try:
        fut = start()
    except RuntimeError as e:
        raise state.collective_failure(where, e) from e

    def done(f):
        try:
            value = f.value()
        except RuntimeError as e:
            raise state.collective_failure(where, e) from e
        return then(value)
    return fut.then(done)


def _dense_key(state: AlgorithmState, ctx: StepContext, grad: torch.Tensor) -> torch.futures.Future:
    """A bucket below ``min_compress_numel``: a plain average, no state. Its non-finite flag is taken from the
    average (a NaN/Inf on any rank reaches every rank's average), so both policies still see it."""
    state.counters.count_uncompressed(ctx.key, grad)
    if state.check_finite and state.guard is not None:
        state.guard.expect()
    def checked(avg):
        if state.check_finite:
            state.check_flag(nonfinite_flag(avg), ctx)
        return avg
    return _collective(state, state.comm.label, lambda: state.comm.allreduce_mean_async(grad), checked)


def _check_all_launched(state: AlgorithmState) -> None:
    left = state.buckets.unlaunched(state.buckets.iterations)
    if left:
        raise RuntimeError(
            f"cser_hooks: rank {state.comm.rank}, step {state.step}: DDP reduced no gradient for some parameters of "
            f"the state's buckets {left!r} (parameters unused in this forward?). Every parameter must get a "
            f"gradient each step; with unused parameters pass find_unused_parameters=True to DDP.")


def _checked(state, cls, hook_name) -> None:
    if not isinstance(state, cls):
        raise TypeError(f"{hook_name} needs a {cls.__name__}, got {type(state).__name__}; register each state "
                        f"with its own hook (e.g. CSERState with cser_hook)")


def _over_process_group(algorithm: type[AlgorithmState], name: str, what: str) -> type:
    """``name(process_group=None, *args, **knobs)``: ``algorithm`` over a DDP process group (a
    :class:`TorchDistCommunicator`; ``progress_timeout=`` is the communicator's). Positional arguments
    and defaults are the algorithm's own."""
    def __init__(self, process_group=None, *args, **kw):
        algorithm.__init__(self, TorchDistCommunicator(process_group, kw.pop("progress_timeout", None)), *args, **kw)
    doc = (f"{what} over a DDP process group. See :class:`~{algorithm.__module__}.{algorithm.__name__}` for the "
           f"knobs; the first argument is the process group (default: the whole world).")
    return type(name, (algorithm,), {"__slots__": (), "__init__": __init__, "__doc__": doc, "__module__": __name__,
                                     "__qualname__": name})


def _hook(algorithm: type[AlgorithmState], name: str, doc: str):
    """The comm hook of ``algorithm``'s DDP state: checks the state's type, then :func:`run_hook`."""
    def hook(state: AlgorithmState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        _checked(state, algorithm, name)
        return run_hook(state, bucket)
    hook.__name__ = hook.__qualname__ = name
    hook.__doc__ = doc
    return hook


EFState = _over_process_group(ErrorFeedback, "EFState", "Error feedback")
ef_hook = _hook(ErrorFeedback, "ef_hook", "Error-feedback comm hook (docs/algorithms.md §2).")
CSERState = _over_process_group(CSER, "CSERState", "CSER")
cser_hook = _hook(CSER, "cser_hook", "CSER comm hook (docs/algorithms.md §3): partial gradient sync; resets via "
                                     "the optimizer post-hook.")
CompSkipState = _over_process_group(CompSkip, "CompSkipState", "CompSkip")
compskip_hook = _hook(CompSkip, "compskip_hook", "CompSkip comm hook (docs/algorithms.md §5).")
DistEFSGDMState = _over_process_group(DistEFSGDM, "DistEFSGDMState", "dist-EF-SGDM")
dist_ef_sgdm_hook = _hook(DistEFSGDM, "dist_ef_sgdm_hook", "dist-EF-SGDM comm hook (docs/algorithms.md §6): "
                          "momentum + two-way 1-bit error feedback; plain SGD outside.")
QsparseLocalSGDState = _over_process_group(QsparseLocalSGD, "QsparseLocalSGDState", "Qsparse-local-SGD")
qsparse_local_sgd_hook = _hook(QsparseLocalSGD, "qsparse_local_sgd_hook", "Qsparse-local-SGD comm hook "
                               "(docs/algorithms.md §7): local steps; syncs via the optimizer post-hook.")
QPRSGDState = _over_process_group(QPRSGD, "QPRSGDState", "QPRSGD")
qprsgd_hook = _hook(QPRSGD, "qprsgd_hook", "QPRSGD comm hook (docs/algorithms.md §4): local steps; quantized "
                                           "rounds via the optimizer post-hook.")
