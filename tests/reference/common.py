"""The simulated world: W replicas of a model in one process, with DDP's bucket view of them.

A DDP bucket is the flat concatenation of its parameters (or their gradients) in bucket order;
``Layout`` maps between a ``{name: tensor}`` dict and the per-bucket flat vectors. ``World`` holds
each rank's parameters ``x_i`` and momentum buffers and applies ``torch.optim.SGD``'s update rule
(re-written here: ``buf = m*buf + g`` with ``buf = g`` on the first step, ``x -= lr*buf``).
Nothing here imports ``cser_hooks``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Params = dict[str, torch.Tensor]
#: grad_fn(params, rank, step) -> {name: gradient} of rank's loss on its batch of that step.
GradFn = Callable[[Params, int, int], Params]


def average(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """avg_j v_j (what an allreduce-sum divided by the world size gives, up to rounding)."""
    return torch.stack(list(vectors)).sum(0) / len(vectors)


class Layout:
    """Bucket index -> parameter names in bucket order (as recorded from a real DDP run)."""

    def __init__(self, buckets: Sequence[Sequence[str]], shapes: dict[str, torch.Size]):
        self.buckets = [list(b) for b in buckets]
        self.shapes = dict(shapes)
        names = [n for b in self.buckets for n in b]
        if sorted(names) != sorted(self.shapes):
            raise ValueError(f"layout {self.buckets} does not cover the parameters {sorted(self.shapes)}")

    def __len__(self) -> int:
        return len(self.buckets)

    def flat(self, tensors: Params, index: int) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(-1) for n in self.buckets[index]])

    def split(self, flat: torch.Tensor, index: int) -> Params:
        out, offset = {}, 0
        for n in self.buckets[index]:
            numel = self.shapes[n].numel()
            out[n] = flat[offset:offset + numel].reshape(self.shapes[n]).clone()
            offset += numel
        if offset != flat.numel():
            raise ValueError("flat bucket size does not match the layout")
        return out


class World:
    """W replicas: parameters x[i], SGD momentum buffers, and the gradient oracle."""

    def __init__(self, init: Params, world_size: int, grad_fn: GradFn, lr: float, momentum: float = 0.0):
        self.W = world_size
        self.x: list[Params] = [{n: t.detach().clone().float() for n, t in init.items()}
                                for _ in range(world_size)]
        self.shapes = {n: t.shape for n, t in init.items()}
        self.grad_fn = grad_fn
        self.lr = lr
        self.momentum = momentum
        self.buf: list[Params] = [{} for _ in range(world_size)]

    def grads(self, step: int) -> list[Params]:
        return [self.grad_fn(self.x[i], i, step) for i in range(self.W)]

    def sgd_step(self, rank: int, grad: Params) -> None:
        """torch.optim.SGD(lr, momentum, dampening=0, nesterov=False, weight_decay=0) on rank."""
        for n, g in grad.items():
            d = g
            if self.momentum != 0.0:
                if n not in self.buf[rank]:
                    self.buf[rank][n] = g.clone()
                else:
                    self.buf[rank][n] = self.momentum * self.buf[rank][n] + g
                d = self.buf[rank][n]
            self.x[rank][n] = self.x[rank][n] - self.lr * d

    def snapshot(self) -> list[Params]:
        return [{n: t.clone() for n, t in xi.items()} for xi in self.x]


def allreduce_average(grads: list[Params]) -> list[Params]:
    """Plain DDP (and every warm-up step): every rank gets the average gradient."""
    avg = {n: average([g[n] for g in grads]) for n in grads[0]}
    return [avg for _ in grads]


def layout_at(layouts, step: int) -> Layout:
    """``layouts`` is one Layout for all steps, or a sequence with one Layout per step."""
    return layouts if isinstance(layouts, Layout) else layouts[step]


def run_bucketed(world: World, steps: int, layouts, warmup_steps: int,
                 transform: Callable[[int, int, list[torch.Tensor]], list[torch.Tensor]],
                 before_step: Callable[[int, Layout], None] | None = None,
                 after_step: Callable[[int, Layout], None] | None = None,
                 history: list | None = None) -> list[Params]:
    """The loop shared by the gradient-hook algorithms.

    Per step s: every rank computes its gradient on its own parameters; steps s < warmup_steps
    average it (plain allreduce); otherwise ``transform(s, bucket, [flat grad of rank i])`` returns
    the gradient each rank's optimizer receives for that bucket. ``before_step(s, layout)`` runs
    after the gradients exist and before the optimizer (the hook-time model edits),
    ``after_step(s, layout)`` after it (the optimizer step post-hook). ``history`` (if a list) gets
    ``(after_hook_snapshot, after_step_snapshot)`` per step.
    """
    for s in range(steps):
        grads = world.grads(s)
        if s < warmup_steps:
            out = allreduce_average(grads)
            layout = None
        else:
            layout = layout_at(layouts, s)
            out = [{} for _ in range(world.W)]
            for b in range(len(layout)):
                flats = transform(s, b, [layout.flat(g, b) for g in grads])
                for i in range(world.W):
                    out[i].update(layout.split(flats[i], b))
        if before_step is not None and layout is not None:
            before_step(s, layout)
        after_hook = world.snapshot() if history is not None else None
        for i in range(world.W):
            world.sgd_step(i, out[i])
        if after_step is not None and layout is not None:
            after_step(s, layout)
        if history is not None:
            history.append((after_hook, world.snapshot()))
    return world.x
