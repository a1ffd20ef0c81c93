"""dist-EF-SGDM: blockwise momentum SGD with two-way error feedback (docs/algorithms.md §6; Zheng,
Huang, Kwok, "Communication-efficient distributed blockwise momentum SGD with error-feedback",
NeurIPS 2019).

The spec, per step, with C = sign_blockwise, C(v)_B = (||v_B||_1 / |B|) sign(v_B):
    worker i:  m_i = μ m_i + g_i ;  p_i = η (Nesterov: g_i + μ m_i, else m_i) + e_i
               Δ_i = C(p_i) ;  e_i ← p_i − Δ_i                             (worker error)
    aggregate: p = avg_j Δ_j + ẽ ;  Δ = C(p) ;  ẽ ← p − Δ                   (server error)
    every rank: x ← x − Δ

Code map (one DDP bucket of N elements, n ranks, rank i; everything in *gradient units*):
  ``encode``  m ← μ m + g ;  e ← v + e with v = m (or g + μ m)           p_i, in the buffer ``e``
              the bucket is cut into n contiguous chunks [a_r, b_r), a_r = min(r·⌈N/n⌉, N);
              for every chunk r:  payload_r = C(p_i[a_r:b_r]) ;  e[a_r:b_r] ← p − C(p)
              ``all_to_all``: payload_r goes to rank r (rank r is the "server" of chunk r)
              server part, own chunk c = i:  p = ẽ + Σ_j (1/n)·C(p_j)[c]     (added to ẽ in rank order j = 0..n−1)
              Δ[c] = C(p) ;  ẽ ← p − Δ[c]                 (buffer ``es``, chunk-sized: p is formed in it)
              the packed Δ[c] goes into one ``allgather`` (padded to the largest chunk payload)
  ``decode``  the gradient buffer ← Δ (all chunks, from all ranks); the user's optimizer, plain SGD
              with lr η, applies x ← x − η Δ. This equals the spec's x ← x − Δ_spec because
              C(η v) = η C(v): the spec's errors are η times ours (e_spec = η e) while η is constant.
Blocks: one block per parameter tensor of the bucket (DDP's parameter offsets) or ``block=b``
fixed blocks of the bucket, in both cases *cut at the chunk boundaries* so that every chunk is
compressed on its own (a tensor straddling two chunks gets one scale per piece). Ties sign(0) = +1.

Learning-rate changes (the authors' correction): when the state is given the optimizer and its lr
goes from η_{t−1} to η_t, e and ẽ are multiplied by η_{t−1}/η_t (η·e stays the same model-space
error). Without the optimizer a constant lr is assumed. The momentum m is a gradient average and
is not rescaled.

Nesterov momentum is the default (``nesterov=True``, the paper's "distributed compressed SGD with
Nesterov's momentum"); ``nesterov=False`` is heavy-ball momentum, for comparison. Measured on the
bench's MNIST-1D CNN at the dense lr schedule (docs/bench-sweep): heavy-ball does not train (8.9 %,
chance level; lr x0.3: 37 %), Nesterov does. Why: error feedback re-sends the unsent part of each
update in later steps, i.e. it *delays* part of the update, and heavy-ball momentum on delayed
updates is unstable at a step size that is stable without delay (the staleness effect known from
asynchronous SGD). The per-tensor errors then grow to tens of times the momentum (‖e‖/‖m‖ ≈ 40 on
the CNN's 32x32x3 kernels before the collapse) and the sent steps to several times momentum SGD's.
Nesterov's look-ahead v = g + μ m weights the current gradient more and damps that loop.

Weight decay stays out of compression and out of the hook's momentum: give it to the user's SGD
(``weight_decay=λ``), which applies x ← x − η(Δ + λ x) locally; all replicas hold the same x and
apply the same Δ, so they stay identical (our reading of "applied locally" in the authors' code).
The user's optimizer must have no momentum of its own (checked when it is given: ``optimizer=``).
Warm-up steps (``warmup_steps``) are plain averaged gradients and leave m, e, ẽ untouched.

Wire per bucket and step (bytes handed to collectives by each rank), P_r = ⌈len_r/8⌉ + 4·blocks_r:
    all_to_all: Σ_r P_r     allgather: 4 (non-finite flag) + max_r P_r
≈ (1 + 1/n)/32 of dense fp32, i.e. ≤ 1/16 counting both directions. The all_to_all must finish
before the server part can run, so the hook waits for it (launching the allgather from a Future
callback could interleave buckets differently on gloo, docs/algorithms.md §8): the first phase does
not overlap the backward pass. A non-finite p_i poisons its block's scale, hence the server's
average, and a non-finite server p poisons the scale of its block in Δ: the server's flag is read from
those scales (no pass over p) and travels in the allgather, and every rank raises together.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..compressors import get_compressor
from ..compressors.sign import SignBlockwise
from ..exchange import Exchange, Kind, StepContext
from ..knobs import momentum_knobs
from ..nonfinite import nonfinite_flag
from ..state import AlgorithmState


@dataclass
class ChunkPlan:
    """Chunk boundaries of a bucket and the sign blocks of every chunk (offsets relative to it)."""

    bounds: list[int]           # n + 1 chunk boundaries in the bucket
    offsets: list[list[int]]    # per chunk: block boundaries, from 0 to the chunk length
    nbytes: list[int]           # per chunk: packed payload bytes = 4·blocks + ⌈len/8⌉

    @property
    def max_bytes(self) -> int:
        return max(self.nbytes)


def chunk_plan(numel: int, world_size: int, segments, block: int | None) -> ChunkPlan:
    """Chunks [min(r·⌈N/n⌉, N), min((r+1)·⌈N/n⌉, N)); blocks = tensors (or fixed b) cut at chunk ends."""
    c = math.ceil(numel / world_size)
    bounds = [min(r * c, numel) for r in range(world_size + 1)]
    if block is not None:
        cuts = set(range(0, numel, block))
    else:
        cuts = set(segments) if segments is not None else {0}
    offsets, nbytes = [], []
    for a, b in zip(bounds, bounds[1:]):
        offs = sorted({a, b} | {x for x in cuts if a < x < b})
        offs = [x - a for x in offs] if b > a else [0]
        offsets.append(offs)
        nbytes.append(4 * (len(offs) - 1) + (b - a + 7) // 8)
    return ChunkPlan(bounds, offsets, nbytes)


def wire_bytes_per_step(numel: int, world_size: int, segments=None, block: int | None = None) -> int:
    """Bytes one rank hands to the collectives for one bucket and one (post warm-up) step."""
    plan = chunk_plan(numel, world_size, segments, block)
    return sum(plan.nbytes) + 4 + plan.max_bytes


def check_plain_sgd(optimizer) -> None:
    """dist-EF-SGDM applies momentum in the hook: the user's optimizer must have none."""
    for k, group in enumerate(optimizer.param_groups):
        if group.get("momentum", 0) or group.get("nesterov", False) or "betas" in group:
            raise ValueError(
                f"dist-EF-SGDM: param group {k} of {type(optimizer).__name__} has momentum of its own "
                f"(momentum={group.get('momentum')}, betas={group.get('betas')}). The hook applies the "
                f"momentum itself (DistEFSGDMState(momentum=0.9, nesterov=...)); build the optimizer as "
                f"torch.optim.SGD(params, lr=..., momentum=0, weight_decay=...) instead.")


class DistEFSGDM(AlgorithmState):
    """dist-EF-SGDM state. Knobs:

      momentum (μ), nesterov: the momentum applied inside the hook (user's SGD must have none);
          Nesterov (default) trains where heavy-ball diverges (module docstring).
      compressor: ``"sign_blockwise"`` (one block per parameter tensor, the paper's blockwise
          compressor) or ``"sign_blockwise:block=b"`` (fixed blocks: tighter scales, 4/b more bytes).
      optimizer: pass it so lr changes rescale the errors and its momentum is checked.
      warmup_steps: dense allreduce steps first (>= 1: DDP rebuilds buckets after step 0).
    """

    algorithm = "dist_ef_sgdm"
    __slots__ = ("compressor", "momentum", "nesterov", "_sign", "_plans")

    def __init__(self, comm, compressor="sign_blockwise", *, momentum: float = 0.9, nesterov: bool = True,
                 **kw):
        self.compressor = get_compressor(compressor)
        if not isinstance(self.compressor, SignBlockwise):
            raise ValueError(f"dist-EF-SGDM: compressor must be 'sign_blockwise' (optionally ':block=b'), got "
                             f"{self.compressor.spec()!r}; for other compressors use EFState.")
        self.momentum, self.nesterov = momentum_knobs(
            "dist-EF-SGDM", momentum, nesterov, "nesterov=True is the default: pass nesterov=False for momentum=0")
        self._sign = SignBlockwise(None)   # blocks are given per chunk as ``segments``
        self._plans: dict[tuple, ChunkPlan] = {}
        super().__init__(comm, **kw)

    def dense_keys_allowed(self) -> bool:
        return False  # the momentum lives in the hook: a dense key would train without it

    def config(self):
        return {**super().config(), "compressor": self.compressor.spec(), "momentum": self.momentum,
                "nesterov": self.nesterov}

    def attach_optimizer(self, optimizer) -> None:
        check_plain_sgd(optimizer)
        super().attach_optimizer(optimizer)

    def plan(self, ctx: StepContext) -> ChunkPlan:
        k = (ctx.key, ctx.numel, tuple(ctx.segments) if ctx.segments is not None else None)
        hit = self._plans.get(k)
        if hit is None:
            hit = self._plans[k] = chunk_plan(ctx.numel, self.comm.world_size, ctx.segments,
                                              self.compressor.block)
        return hit

    def before_bucket(self, ctx: StepContext, params) -> None:
        # The blocks are the bucket's tensors *in bucket order*: recompute the offsets from the
        # parameters (a bucket rebuilt after step 0 may hold the same sizes in another order).
        seg = [0]
        for p in params:
            seg.append(seg[-1] + p.numel())
        ctx.segments = seg

    # -- packing of one chunk's payload: fp32 scales first (aligned), then the sign bits ---------
    def _pack(self, x: torch.Tensor, offs, mk) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed payload, its fp32 scales); x ← x − C(x) in place."""
        if x.numel() == 0:
            return torch.empty(0, dtype=torch.uint8, device=x.device), torch.zeros(0, device=x.device)
        bits, scales = self._sign.compress_ef(x, mk, offs)
        return torch.cat([scales.view(torch.uint8), bits]), scales

    def _unpack_into(self, buf: torch.Tensor, offs, out: torch.Tensor, mk, alpha: float | None = None) -> torch.Tensor:
        """out = C(payload in buf); with ``alpha``: out += alpha * C(payload) in the same pass."""
        if out.numel() == 0:
            return out
        nb = 4 * (len(offs) - 1)
        payload = (buf[nb:], buf[:nb].clone().view(torch.float32))  # clone: alignment
        if alpha is not None:
            return self._sign.decompress_add(payload, out, alpha, mk, offs)
        return self._sign.decompress(payload, out.numel(), torch.float32, mk, offs, out=out)

    # -- the algorithm -------------------------------------------------------------------------
    def encode(self, grad, ctx: StepContext) -> Exchange:
        if self.optimizer is not None and ctx.step == self.warmup_steps:
            check_plain_sgd(self.optimizer)  # the optimizer may have been rebuilt since
        t0 = time.perf_counter()
        n, me = self.comm.world_size, self.comm.rank
        plan = self.plan(ctx)
        a, b = plan.bounds[me], plan.bounds[me + 1]
        m = self.buffer(ctx.key, "m", ctx.numel, grad.device)
        e = self.buffer(ctx.key, "e", ctx.numel, grad.device)
        es = self.buffer(ctx.key, "es", b - a, grad.device)
        self.rescale_on_lr_change(ctx.key, ("e", "es"))
        g = grad if grad.dtype == torch.float32 else grad.float()
        torch.add(g, m, alpha=self.momentum, out=m)          # m ← μ m + g (one pass)
        if self.nesterov:
            e.add_(g).add_(m, alpha=self.momentum)           # p = g + μ m + e
        else:
            e.add_(m)                                        # p = m + e
        mk = self.mask_key(ctx, "c1")
        parts = [self._pack(e[lo:hi], plan.offsets[r], mk)[0]  # e ← p − C(p), chunk by chunk
                 for r, (lo, hi) in enumerate(zip(plan.bounds, plan.bounds[1:]))]
        self.timed(t0)
        received = self.comm.all_to_all_async(parts, [plan.nbytes[me]] * n).wait()
        t0 = time.perf_counter()
        # server of chunk `me`: p = ẽ + avg_j C(p_j), formed in ẽ's buffer; Δ = C(p) ; ẽ ← p − Δ in place
        for buf in received:
            self._unpack_into(buf, plan.offsets[me], es, mk, alpha=1.0 / n)
        packed, scales = self._pack(es, plan.offsets[me], mk)
        # a NaN/Inf in p makes its block's scale NaN/Inf: the flag reads the scales, not p
        flag = nonfinite_flag(scales) if self.check_finite else torch.zeros(1, device=grad.device)
        pad = torch.zeros(plan.max_bytes - packed.numel(), dtype=torch.uint8, device=grad.device)
        out = torch.cat([flag.view(torch.uint8), packed, pad])
        self.timed(t0)
        return Exchange(Kind.ALLGATHER, (out,), flag, carry=plan)

    def decode(self, grad, received, ctx):
        t0 = time.perf_counter()
        plan: ChunkPlan = ctx.exchange.carry
        mk = self.mask_key(ctx, "c1")
        acc = grad if grad.dtype == torch.float32 else torch.empty(grad.numel(), device=grad.device)
        flags = []
        for r, buf in enumerate(received):
            flags.append(buf[:4].clone().view(torch.float32))
            lo, hi = plan.bounds[r], plan.bounds[r + 1]
            self._unpack_into(buf[4:4 + plan.nbytes[r]], plan.offsets[r], acc[lo:hi], mk)
        if acc is not grad:
            grad.copy_(acc)
        self.timed(t0)
        self.check_flag(torch.stack(flags).sum().view(1), ctx, grad)
        return grad
