"""Reference Qsparse-local-SGD, W workers in one process (docs/algorithms.md §7; no code shared with cser_hooks).

Also the dense reference quantizers used by the QPRSGD reference:
  * qsgd(s, block, scale): blocks of ``block`` values, norm ν_B = ‖v_B‖₂ (float64, rounded to fp32), r = |v|·(s/ν_B),
    level = ⌊r⌋ + [u < r − ⌊r⌋] (clamped to s), Q(v) = sign(v)·level·ν_B·(scale/s) with sign(0) = +1.
    u_k = the counter hash of element k under the seed blake2b("{seed}|{step}|{key}|{salt}|rank{rank}")
    (``reference.masks.rounding_uniforms``: the brief's seed rule plus the rank, so QSGD's rounding is
    independent across ranks).
  * top_k(ratio): the k = ⌈ratio·N⌉ largest |v|, kept in index order; Q∘top_k quantizes those k values.
  * sign (one block): (Σ|v|/len)·sign(v).
Per bucket b, rank i: x̄ (global), x̂_i (last received), m_i (memory). After the optimizer step of
a step s >= warmup at which some rank syncs (rank r syncs when (s + 1) % H_r == 0, or s is in its
list), with S the syncing ranks and salt "q":
    i ∈ S:  p_i = m_i + x̂_i − x_i ;  Δ_i = QComp(p_i) ;  m_i = p_i − Δ_i
    x̄ ← x̄ − Σ_{i∈S} Δ_i / n ;  i ∈ S:  x̂_i = x_i = x̄
``shifted=True``: the sync of step s happens at step s + 1 after the gradients (on the unsynced
models) and before the optimizer step (the hook without the optimizer).
"""
from __future__ import annotations

import hashlib
import math

import torch

from .common import World, layout_at
from .masks import rounding_uniforms


class TorchWorld(World):
    """``World`` whose SGD step rounds exactly like ``torch.optim.SGD`` (``x.add(d, alpha=-lr)``, one
    rounding, instead of ``x - lr*d``): the local-SGD algorithms below amplify last-bit differences
    (p = x̂ − x cancels, then QSGD rounds stochastically), so the reference follows torch's order."""

    def sgd_step(self, rank, grad):
        for n, g in grad.items():
            d = g
            if self.momentum != 0.0:
                buf = self.buf[rank].get(n)
                self.buf[rank][n] = d = g.clone() if buf is None else buf.mul(self.momentum).add(g)
            self.x[rank][n] = self.x[rank][n].add(d, alpha=-self.lr)


def average_divide_first(vectors):
    """avg_j v_j as the package's allreduce computes it for two ranks: Σ_j (v_j / n)."""
    n = len(vectors)
    out = vectors[0] / n
    for v in vectors[1:]:
        out = out + v / n
    return out


def block_l1(v: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    """Σ|v| per block [cuts[k], cuts[k+1]) in float64 (the statistic the brief's scale needs, summed
    exactly enough that any summation order rounds to the same fp32 scale)."""
    return torch.stack([v[a:b].double().abs().sum() for a, b in zip(cuts, cuts[1:])])


def sign_scale(v: torch.Tensor) -> torch.Tensor:
    """fp32 scale Σ|v|/len of one block: sum and division in float64, one rounding to fp32."""
    return (block_l1(v, [0, v.numel()])[0] / v.numel()).float()


def l2_norm(v: torch.Tensor) -> torch.Tensor:
    """‖v‖₂ in float64, rounded once to fp32."""
    return v.double().norm().float()


def rank_uniforms(n: int, seed: int, step: int, key, salt: str, rank: int) -> torch.Tensor:
    text = f"{seed}|{step}|{key}|{salt}|rank{rank}"
    gs = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)
    return rounding_uniforms(n, gs)


def qsgd(v: torch.Tensor, s: int, block: int, scale: float, u: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(v)
    for a in range(0, v.numel(), block):
        seg = v[a:a + block]
        nu = l2_norm(seg)
        if nu == 0:
            continue
        r = seg.abs() * (s / nu)
        fl = r.floor()
        lv = (fl + (u[a:a + block] < (r - fl)).float()).clamp(max=s)
        sg = torch.where(seg >= 0, 1.0, -1.0)
        # ((ν·l)/s)·sign, then the scale: the package's element-wise order (fp32 products round per step)
        q = ((nu * lv) / s) * sg
        out[a:a + block] = q if scale == 1.0 else q.mul(scale)
    return out


def parse(spec: str) -> dict:
    """``"top_k:ratio=1/16 + qsgd:s=15,block=64,scale=0.5"`` / ``"... + sign"`` / ``"qsgd:..."``."""
    out = {"ratio": None, "quant": None}
    for part in [p.strip() for p in spec.split("+")]:
        name, _, args = part.partition(":")
        kv = {k.strip(): v.strip() for k, _, v in (a.partition("=") for a in args.split(",") if a.strip())}
        if name == "top_k":
            num, _, den = kv["ratio"].partition("/")
            out["ratio"] = float(num) / float(den) if den else float(num)
        elif name == "qsgd":
            out["quant"] = ("qsgd", int(kv.get("s", 15)), int(kv.get("block", 512)), float(kv.get("scale", 1.0)))
        elif name in ("sign", "sign_blockwise"):
            out["quant"] = ("sign",)
        else:
            raise ValueError(f"reference: unsupported compressor part {part!r}")
    return out


class QComp:
    def __init__(self, spec: str, seed: int = 0, salt: str = "q"):
        self.p = parse(spec)
        self.seed, self.salt = seed, salt

    def __call__(self, v: torch.Tensor, step: int, key, rank: int) -> torch.Tensor:
        idx = torch.arange(v.numel())
        if self.p["ratio"] is not None:
            k = min(v.numel(), max(1, math.ceil(self.p["ratio"] * v.numel())))
            # ties (e.g. exact zeros when k exceeds the non-zeros) go to the lower index, as in the package;
            # torch.topk leaves them unspecified (its choice changed with the CPU's vector width)
            idx = torch.sort(v.abs(), descending=True, stable=True).indices[:k].sort().values
        vals = v[idx]
        q = self.p["quant"]
        if q is None:
            d = vals
        elif q[0] == "sign":
            sc = sign_scale(vals)
            d = torch.where(vals >= 0, sc, -sc)
        else:
            u = rank_uniforms(vals.numel(), self.seed, step, key, self.salt, rank)
            d = qsgd(vals, q[1], q[2], q[3], u)
        out = torch.zeros_like(v)
        out[idx] = d
        return out


def syncs(rank: int, step: int, warmup_steps: int, periods=None, sync_steps=None) -> bool:
    if step < warmup_steps:
        return False
    if sync_steps is not None:
        return step in sync_steps[rank]
    return (step + 1) % periods[rank] == 0


def simulate_qsparse(world: World, steps: int, layouts, compressor: str, periods=None, sync_steps=None,
                     seed: int = 0, warmup_steps: int = 1, shifted: bool = False, history: list | None = None,
                     start: int = 0):
    """Final parameters per rank; ``periods``/``sync_steps`` are per rank. ``history`` gets snapshots
    of steps start..steps-1. ``start`` = warmup_steps: ``world`` holds the state after the warm-up."""
    n = world.W
    comp = QComp(compressor, seed)
    xbar: dict = {}
    xhat: dict = {}
    mem: dict = {}

    def sync(s, layout):
        S = [i for i in range(n) if syncs(i, s, warmup_steps, periods, sync_steps)]
        if not S:
            return
        for b in range(len(layout)):
            x = [layout.flat(world.x[i], b) for i in range(n)]
            acc = torch.zeros_like(xbar[b])
            for i in S:
                p = mem[b][i] + xhat[b][i] - x[i]
                d = comp(p, s, b, i)
                mem[b][i] = p - d
                acc.add_(d, alpha=1.0 / n)
            xbar[b] = xbar[b] - acc
            for i in S:
                xhat[b][i] = xbar[b].clone()
                world.x[i].update(layout.split(xbar[b], b))

    for s in range(start, steps):
        grads = world.grads(s)
        if s < warmup_steps:
            avg = {k: average_divide_first([g[k] for g in grads]) for k in grads[0]}
            grads = [avg] * n
        else:
            layout = layout_at(layouts, s)
            for b in range(len(layout)):
                if b not in xbar:
                    xbar[b] = layout.flat(world.x[0], b)
                    xhat[b] = [layout.flat(world.x[i], b) for i in range(n)]
                    mem[b] = [torch.zeros_like(xbar[b]) for _ in range(n)]
            if shifted and s - 1 >= warmup_steps:
                sync(s - 1, layout)
        for i in range(n):
            world.sgd_step(i, grads[i])
        if not shifted and s >= warmup_steps:
            sync(s, layout_at(layouts, s))
        if history is not None:
            history.append(world.snapshot())
    return world.x
