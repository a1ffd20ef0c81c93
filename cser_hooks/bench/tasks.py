"""What a benchmark worker trains on: batches, the loss, and the evaluation of :mod:`cser_hooks.bench.metrics`.

    Classification    the ``.npz`` of :func:`cser_hooks.bench.data.prepare`: each epoch a permutation
                      (seeded by seed and epoch) sharded over the ranks, batches of ``batch`` samples;
                      metric: accuracy on the whole test set.
    LanguageModeling  the ``corpus.npz`` of :func:`cser_hooks.bench.data.prepare_text` (uint8 bytes): every
                      step each rank draws ``batch`` random contiguous windows of ``context + 1`` bytes from
                      the training bytes, seeded by (seed, rank, step), so a run is reproducible and the
                      ranks see different data; loss: next-byte cross-entropy; metric: the mean
                      cross-entropy (nats) over ``eval_windows`` fixed windows spread evenly over the
                      validation bytes (the same windows for every method).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics, models


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits ``(..., C)`` against labels ``(...)``: per sample or per byte."""
    return F.cross_entropy(out.flatten(0, -2), y.flatten())


class Classification:
    metric = metrics.ACCURACY

    def __init__(self, cfg: dict):
        with np.load(cfg["data"]) as z:
            self.xtr, self.ytr, self.xte, self.yte = (torch.from_numpy(z[k]) for k in
                                                      ("x_train", "y_train", "x_test", "y_test"))
        self.classes = int(max(self.ytr.max(), self.yte.max())) + 1
        self.cfg = cfg

    def build_model(self) -> torch.nn.Module:
        return models.build(self.cfg["model"], self.xtr.shape[1:], self.classes)

    def check(self, world: int, batch: int) -> None:
        if len(self.ytr) // world < batch:
            raise ValueError(f"{len(self.ytr)} training samples over {world} workers is fewer than --batch "
                             f"{batch} each")

    def batches(self, rank: int, world: int, batch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless: epoch after epoch, this rank's shard of a fresh permutation, in batches."""
        epoch = 0
        while True:
            g = torch.Generator().manual_seed(seed * 100003 + epoch)
            shard = torch.randperm(len(self.ytr), generator=g)[rank::world]
            for i in range(0, len(shard) - batch + 1, batch):
                idx = shard[i:i + batch]
                yield self.xtr[idx], self.ytr[idx]
            epoch += 1

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> float:
        correct = 0
        for i in range(0, len(self.yte), 1000):
            correct += int((model(self.xte[i:i + 1000]).argmax(1) == self.yte[i:i + 1000]).sum())
        return correct / len(self.yte)


def window_seed(seed: int, rank: int, step: int) -> int:
    """The generator seed of (seed, rank, step)'s training windows (numpy's SeedSequence hash)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def windows(data: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``data[s : s + context]`` and targets ``data[s + 1 : s + 1 + context]`` per start, int64."""
    w = data[starts[:, None] + torch.arange(context + 1)].long()
    return w[:, :-1], w[:, 1:]


class LanguageModeling:
    metric = metrics.VAL_LOSS
    EVAL_CHUNK = 16  # validation windows per forward pass

    def __init__(self, cfg: dict):
        with np.load(cfg["data"]) as z:
            self.train, self.val = (torch.from_numpy(np.ascontiguousarray(z[k])) for k in ("train", "val"))
        self.gpt = dict(cfg.get("gpt") or {})
        self.context = int(self.gpt.get("context") or models.GPT_DEFAULTS["context"])
        if min(len(self.train), len(self.val)) < self.context + 1:
            raise ValueError(f"{Path(cfg['data']).name}: {len(self.train)} training / {len(self.val)} validation "
                             f"bytes; both need more than the context ({self.context})")
        n = int(cfg.get("eval_windows") or 64)
        self.eval_starts = torch.linspace(0, len(self.val) - self.context - 1, n).round().long()
        self.cfg = cfg

    def build_model(self) -> torch.nn.Module:
        return models.build("gpt", [self.context], models.VOCAB, **self.gpt)

    def check(self, world: int, batch: int) -> None:
        pass  # windows are drawn with replacement: any batch works

    def batches(self, rank: int, world: int, batch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless: at step s, ``batch`` windows at starts drawn by the generator of (seed, rank, s)."""
        high = len(self.train) - self.context  # a start s needs s + context < len(train)
        step = 0
        while True:
            g = torch.Generator().manual_seed(window_seed(seed, rank, step))
            yield windows(self.train, torch.randint(0, high, (batch,), generator=g), self.context)
            step += 1

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> float:
        """Mean next-byte cross-entropy (nats) over the fixed validation windows."""
        total = 0.0
        for chunk in self.eval_starts.split(self.EVAL_CHUNK):
            x, y = windows(self.val, chunk, self.context)
            total += float(loss_fn(model(x), y)) * len(chunk)
        return total / len(self.eval_starts)


TASKS = {metrics.ACCURACY.key: Classification, metrics.VAL_LOSS.key: LanguageModeling}


def load(cfg: dict):
    """The task of ``cfg["model"]`` (its metric decides), with its data loaded."""
    return TASKS[metrics.for_model(cfg["model"]).key](cfg)
