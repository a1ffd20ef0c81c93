"""The benchmark's method registry: one small entry per method (``--methods a,b,c``).

An entry's ``make(process_group, optimizer, seed=0, block=256)`` returns ``(state, hook)``:
``hook is None`` means DDP's built-in allreduce; otherwise the worker calls
``ddp_model.register_comm_hook(state, hook)``. Every state has ``stats()`` (cser_hooks' states
natively; the baselines through :mod:`cser_hooks.bench.meters`). The project's hooks are imported
from ``cser_hooks.ddp`` lazily, inside ``make``, so the baselines work without them.

``protocol`` names the method's collective pattern (``allreduce``, ``allgather``, ``mixed``), for the
reader: the bytes on the wire are not derived from it but reported by every state itself
(``stats()["wire_bytes_total"]``, the ring model of :mod:`cser_hooks.wire`, which the ``--link``
report compares with the veth counters). ``block`` is the random-block size for the shared-mask compressors;
the launcher picks 256 for models with >= 1M parameters and 32 below (a 10k-parameter model has
few 256-element blocks, so small ratios would round up to a much denser mask).

Names: the presets below, and parametric forms ``cser@R1:R2:H`` (R2 = 1 for a full reset),
``m-cser@R1:R2:H`` (momentum in the hook, M-CSER), ``ef-topk@R``, ``ef-rb@R``, ``ef-sign@B``,
``topk@R`` (no error feedback), ``local-sgd@H``, ``powersgd@R``, ``dist-ef-sgdm@B`` (B: sign block
size or ``tensor``; Nesterov momentum) and ``dist-ef-sgdm-hb@B`` (heavy-ball momentum),
``qsparse@R:H``, ``qprsgd@H``, ``compskip@R:K`` (top-k ratio R, send every K),
e.g. ``cser@1/32:1/4:8``. Any name may end in ``~lrS``: the same method with the peak lr times S
(the same warm-up + cosine schedule), e.g. ``dist-ef-sgdm@64~lr0.5``, for an honest lr sweep.
"""
from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

from . import meters


class MethodUnavailable(RuntimeError):
    """The method's hook or one of its options does not exist (yet) in cser_hooks.ddp."""


@dataclass(frozen=True)
class Method:
    name: str
    make: Callable[..., tuple[Any, Any]]
    summary: str
    protocol: str = "allreduce"               # "allreduce" | "allgather" | "mixed" (descriptive)
    bucket_cap_mb: float | None = None        # None: the bench's --bucket-cap-mb
    optimizer_overrides: Mapping[str, Any] = field(default_factory=dict)
    lr_scale: float = 1.0                     # multiplies the peak lr (same warm-up + cosine schedule)
    period: int = 0                           # steps between its periodic syncs (CSER's reset, local SGD's
    #                                           average, CompSkip's send); 0: every step alike. A step-time
    #                                           window must span whole periods to carry their cost


# -- baselines -----------------------------------------------------------------------------------

def _dense(process_group, optimizer, **_):
    return meters.NoHookMeter(optimizer), None


def _torch_hook(hook_name: str, payload):
    def make(process_group, optimizer, **_):
        import torch.distributed as dist
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        pg = process_group if process_group is not None else dist.group.WORLD
        meter = meters.HookMeter(optimizer, pg, getattr(default_hooks, hook_name), payload)
        return meter, meters.metered_hook
    return make


def _powersgd(rank: int):
    def make(process_group, optimizer, seed=0, **_):
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps

        state = ps.PowerSGDState(process_group=process_group, matrix_approximation_rank=rank,
                                 start_powerSGD_iter=2, min_compression_rate=2, use_error_feedback=True,
                                 warm_start=True, random_seed=seed)
        meter = meters.HookMeter(optimizer, state, ps.powerSGD_hook, meters.powersgd_payload)
        return meter, meters.metered_hook
    return make


# -- cser_hooks' own hooks (imported lazily) ----------------------------------------------------------

def _ours(state_name: str, hook_name: str, **kwargs):
    """``make`` for ``cser_hooks.ddp.<state_name>(process_group, seed=, optimizer=, **kwargs)`` + hook.

    Values given as callables of ``block`` (random-block compressor specs) are resolved at make time.
    """
    def make(process_group, optimizer, seed=0, block=256, **_):
        try:
            from cser_hooks import ddp
        except ImportError as exc:
            raise MethodUnavailable(f"cser_hooks.ddp does not import ({exc})") from exc
        cls, hook = getattr(ddp, state_name, None), getattr(ddp, hook_name, None)
        if cls is None or hook is None:
            raise MethodUnavailable(f"cser_hooks.ddp has no {state_name}/{hook_name} yet")
        kw = {k: (v(block) if callable(v) else v) for k, v in kwargs.items()}
        params = inspect.signature(cls).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        if not takes_any:
            unknown = [k for k in (*kw, "seed", "optimizer") if k not in params]
            if unknown:
                raise MethodUnavailable(f"{state_name} does not accept {', '.join(unknown)}")
        try:
            state = cls(process_group=process_group, seed=seed, optimizer=optimizer, **kw)
        except TypeError as exc:
            raise MethodUnavailable(f"{state_name}({', '.join(kw)}): {exc}") from exc
        return state, hook
    return make


def _rb(ratio: str):
    return lambda block: f"random_block:ratio={ratio},block={block}"


def _cser(r1: str, r2: str, period: int, name: str, momentum: float = 0.0, spread: bool = False) -> Method:
    """CSER (momentum = 0: the user's SGD momentum acts on ĝ) or M-CSER (momentum > 0 in the hook);
    ``spread``: reset_schedule="spread" (one H-th of the reset after every step)."""
    c2 = (lambda block: "identity") if Fraction(r2) == 1 else _rb(r2)
    c1 = (lambda block: "zero") if Fraction(r1) == 0 else _rb(r1)
    total = Fraction(r1) + Fraction(r2) / period
    sched = {"reset_schedule": "spread"} if spread else {}
    how = ", reset spread over the period" if spread else ""
    if momentum:
        return Method(name, _ours("CSERState", "cser_hook", c1=c1, c2=c2, period=period, momentum=momentum, **sched),
                      f"M-CSER rho1={r1}, rho2={r2}, H={period} (~{_frac(total)} of dense){how}, momentum "
                      f"{momentum} in the hook before C1 (optimizer without)",
                      optimizer_overrides=_NO_MOMENTUM, period=period)
    return Method(name, _ours("CSERState", "cser_hook", c1=c1, c2=c2, period=period, **sched),
                  f"CSER rho1={r1}, rho2={r2}, H={period} (~{_frac(total)} of dense){how}", period=period)


def _dist_ef(block: str, name: str, nesterov: bool = True) -> Method:
    comp = "sign_blockwise" if block == "tensor" else f"sign_blockwise:block={block}"
    what = "one block per tensor" if block == "tensor" else f"blocks of {block}"
    kind = "Nesterov" if nesterov else "heavy-ball"
    return Method(name, _ours("DistEFSGDMState", "dist_ef_sgdm_hook", compressor=comp, momentum=0.9,
                              nesterov=nesterov),
                  f"dist-EF-SGDM: sign ({what}), two-way EF, {kind} momentum 0.9 in the hook (optimizer without)",
                  protocol="mixed", optimizer_overrides=_NO_MOMENTUM)


def _qsparse(ratio: str, period: int, name: str) -> Method:
    return Method(name, _ours("QsparseLocalSGDState", "qsparse_local_sgd_hook",
                              compressor=f"top_k:ratio={ratio} + qsgd:s=15,scale=0.5", period=period),
                  f"Qsparse-local-SGD: top-k {ratio} + QSGD(15), sync every {period} steps", protocol="allgather",
                  period=period)


def _qprsgd(period: int, name: str) -> Method:
    return Method(name, _ours("QPRSGDState", "qprsgd_hook", compressor="qsgd:s=15,block=64", period=period),
                  f"QPRSGD: local SGD, QSGD(15)-quantized model deltas every {period} steps (all-reduce mode)",
                  protocol="allgather", period=period)


def _compskip(ratio: str, every: int, name: str) -> Method:
    return Method(name, _ours("CompSkipState", "compskip_hook", compressor=f"top_k:ratio={ratio}", send_every=every),
                  f"CompSkip: top-k {ratio} (values + indices), send every {every} steps", protocol="allgather",
                  period=every)


def _frac(x: Fraction) -> str:
    return f"1/{round(1 / x)}" if x and (1 / x) >= 1 else str(float(x))


def _local_sgd(period: int, name: str) -> Method:
    return Method(name, _ours("CSERState", "cser_hook", c1=lambda b: "zero", c2=lambda b: "identity",
                              period=period), f"local SGD: average the models every {period} steps", period=period)


def _ef(comp: str, name: str, summary: str, protocol: str, feedback: bool = True, **overrides) -> Method:
    kw: dict[str, Any] = {"compressor": _rb(comp[3:]) if comp.startswith("rb:") else comp}
    if not feedback:
        kw["error_feedback"] = False
    return Method(name, _ours("EFState", "ef_hook", **kw), summary, protocol=protocol,
                  optimizer_overrides=overrides)


# Error feedback with a weak compressor (sign: delta = 1/d per tensor, random blocks: delta = ratio) diverges
# at the CNN's lr 0.1 with momentum 0.9: the residual releases many steps of gradient at once and momentum
# amplifies it (EF-SGD needs lr ~ delta/L). Those presets run without the optimizer's momentum; dist-EF-SGDM
# is the momentum-aware form of sign compression (Zheng et al. 2019).
_NO_MOMENTUM = {"momentum": 0.0}


def _lr_scaled(method: Method, scale: float, name: str | None = None) -> Method:
    return replace(method, name=name or method.name, lr_scale=method.lr_scale * scale,
                   summary=f"{method.summary}; peak lr x{scale:g}")


def _presets() -> dict[str, Method]:
    m: list[Method] = [
        Method("dense", _dense, "DDP's built-in allreduce (no hook), fp32"),
        Method("allreduce", _torch_hook("allreduce_hook", meters.dense_payload),
               "torch's allreduce_hook (dense, timed from Python)"),
        Method("fp16", _torch_hook("fp16_compress_hook", meters.fp16_payload), "torch's fp16_compress_hook"),
        # torch's PowerSGD launches collectives from Future callbacks and crashes on gloo with more than
        # one bucket (pytorch#58467): a bucket cap far above any model here keeps it to one bucket.
        Method("powersgd", _powersgd(1), "torch's powerSGD_hook, rank 1", bucket_cap_mb=4096),
        Method("powersgd-r1", _powersgd(1), "torch's powerSGD_hook, rank 1", bucket_cap_mb=4096),
        Method("powersgd-r4", _powersgd(4), "torch's powerSGD_hook, rank 4", bucket_cap_mb=4096),
        _ef("top_k:ratio=1/64", "ef-topk", "EF-SGD, top-k 1/64 (values + indices, allgather)", "allgather"),
        _ef("sign_blockwise", "ef-sign", "EF-SGD, scaled sign per tensor (1 bit/element, allgather), no momentum",
            "allgather", **_NO_MOMENTUM),
        _ef("top_k:ratio=1/64", "topk", "top-k 1/64 without error feedback (contrast)", "allgather",
            feedback=False),
        _ef("rb:1/32", "ef-rb", "EF-SGD, random blocks 1/32 (allreduce), no momentum", "allreduce", **_NO_MOMENTUM),
        # Each seed algorithm: the bench-tuned preset (same schedule and step budget as dense, the
        # method's own knobs swept: docs/bench-sweep/report.md) and its paper preset ("-paper").
        _cser("1/64", "1/4", 16, "cser-32"),
        _cser("1/512", "1", 512, "cser-256"),           # ~1/256: 1/512 of the gradient, full reset every 512
        _cser("1/512", "1/16", 32, "cser-256-paper"),
        _cser("1/2048", "1/8", 256, "cser-1024"),
        _cser("0", "1/4", 16, "cser-pl"),
        _local_sgd(16, "local-sgd"),
        _cser("1/64", "1/4", 16, "m-cser", momentum=0.9),
        _lr_scaled(_compskip("1/32", 2, "compskip"), 0.5),   # a skipped round's reserve lands in one burst
        _compskip("1/32", 2, "compskip-paper"),
        _qprsgd(4, "qprsgd"),
        _lr_scaled(_dist_ef("64", "dist-ef-sgdm"), 0.85),
        _dist_ef("tensor", "dist-ef-sgdm-paper"),
        _qsparse("1/16", 8, "qsparse"),
        _qsparse("1/64", 8, "qsparse-paper"),
    ]
    return {x.name: x for x in m}


PRESETS = _presets()
# every seed algorithm beside dense, fp16 and PowerSGD (about 4 minutes on 2 cores)
DEFAULT = ("dense", "fp16", "powersgd", "cser-32", "cser-256", "m-cser", "dist-ef-sgdm", "qsparse", "qprsgd",
           "compskip")
QUICK_DEFAULT = ("dense", "fp16", "powersgd", "cser-32")

_RATIO = r"(\d+(?:/\d+)?|0?\.\d+)"


def _ef_ratio(m, name: str) -> Method:
    comp = f"rb:{m[2]}" if m[1] == "ef-rb" else f"top_k:ratio={m[2]}"
    proto = "allreduce" if m[1] == "ef-rb" else "allgather"
    return _ef(comp, name, f"{m[1]} at ratio {m[2]}", proto, feedback=m[1] != "topk")


# parametric names: (pattern, build(match, name)), tried in order
_PARAMETRIC = [
    (rf"(m-)?cser(-spread)?@{_RATIO}:{_RATIO}:(\d+)",
     lambda m, name: _cser(m[3], m[4], int(m[5]), name, momentum=0.9 if m[1] else 0.0, spread=bool(m[2]))),
    (rf"(ef-topk|topk|ef-rb)@{_RATIO}", _ef_ratio),
    (r"ef-sign@(\d+)", lambda m, name: _ef(f"sign_blockwise:block={m[1]}", name,
                                           f"EF-SGD, scaled sign, blocks of {m[1]}", "allgather")),
    (r"dist-ef-sgdm(-hb)?@(tensor|\d+)", lambda m, name: _dist_ef(m[2], name, nesterov=not m[1])),
    (rf"qsparse@{_RATIO}:(\d+)", lambda m, name: _qsparse(m[1], int(m[2]), name)),
    (r"qprsgd@(\d+)", lambda m, name: _qprsgd(int(m[1]), name)),
    (rf"compskip@{_RATIO}:(\d+)", lambda m, name: _compskip(m[1], int(m[2]), name)),
    (r"local-sgd@(\d+)", lambda m, name: _local_sgd(int(m[1]), name)),
    (r"powersgd@(\d+)", lambda m, name: Method(name, _powersgd(int(m[1])), f"torch's powerSGD_hook, rank {m[1]}",
                                                bucket_cap_mb=4096)),
]


def get(name: str) -> Method:
    """The entry for ``name`` (a preset or a parametric form, optionally ``~lrS``); a clear error otherwise."""
    name = name.strip()
    base, sep, scale = name.partition("~")
    if sep:
        m = re.fullmatch(r"lr(\d+(?:\.\d*)?|\.\d+)", scale)
        if not m or float(m[1]) <= 0:
            raise SystemExit(f"method {name!r}: the suffix must be ~lrS with S > 0 (e.g. ~lr0.5)")
        return _lr_scaled(get(base), float(m[1]), name)
    if name in PRESETS:
        return PRESETS[name]
    for pattern, build in _PARAMETRIC:
        m = re.fullmatch(pattern, name)
        if m:
            return build(m, name)
    raise SystemExit(f"unknown method {name!r}. Presets: {', '.join(PRESETS)}; parametric: cser@R1:R2:H, "
                     f"cser-spread@R1:R2:H, m-cser@R1:R2:H, ef-topk@R, ef-rb@R, ef-sign@B, topk@R, local-sgd@H, "
                     f"powersgd@R, dist-ef-sgdm@B, dist-ef-sgdm-hb@B, qsparse@R:H, qprsgd@H, compskip@R:K; "
                     f"any of them ~lrS "
                     f"(e.g. cser@1/64:1/4:16, dist-ef-sgdm@64~lr0.5)")


def parse_list(spec: str) -> list[Method]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise SystemExit("--methods: give at least one method name")
    if len(set(names)) != len(names):
        raise SystemExit(f"--methods lists a method twice: {spec}")
    return [get(n) for n in names]

