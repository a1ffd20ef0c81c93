"""Benchmark models (``--model``).

    cnn       small convolutional net: 1-D convolutions for signals ``(N, L)`` / ``(N, C, L)``
              (MNIST-1D: ~10k parameters, ~95 % test accuracy), 2-D for images ``(N, C, H, W)``.
    mlp       small MLP (2 x 256 hidden) on the flattened input.
    mlp-wide  wide MLP (2560 and 2048 hidden): 5.37 M parameters on MNIST-1D, so communication
              dominates computation; the model for ``--link`` runs.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn as nn
import torch.nn.functional as F

MODELS = ("cnn", "mlp", "mlp-wide")


class CNN1D(nn.Module):
    def __init__(self, in_channels: int, length: int, classes: int, width: int = 32):
        super().__init__()
        self.c1 = nn.Conv1d(in_channels, width, 5, padding=2)
        self.c2 = nn.Conv1d(width, width, 3, padding=1, stride=2)
        self.c3 = nn.Conv1d(width, width, 3, padding=1, stride=2)
        out_len = math.ceil(math.ceil(length / 2) / 2)
        self.fc = nn.Linear(width * out_len, classes)

    def forward(self, x):
        if x.dim() == 2:
            x = x.unsqueeze(1)
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = F.relu(self.c3(x))
        return self.fc(x.flatten(1))


class CNN2D(nn.Module):
    def __init__(self, in_channels: int, classes: int, width: int = 32):
        super().__init__()
        self.c1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.c3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, stride=2)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = F.relu(self.c3(x))
        return self.fc(x.mean(dim=(2, 3)))


class MLP(nn.Module):
    def __init__(self, features: int, classes: int, hidden: Sequence[int]):
        super().__init__()
        dims = (features, *hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], classes)

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(x)


def build(name: str, input_shape: Sequence[int], classes: int) -> nn.Module:
    """The model ``name`` for inputs of ``input_shape`` (without the batch dimension)."""
    shape = tuple(int(s) for s in input_shape)
    features = math.prod(shape)
    if name == "cnn":
        if len(shape) == 1:
            return CNN1D(1, shape[0], classes)
        if len(shape) == 2:
            return CNN1D(shape[0], shape[1], classes)
        if len(shape) == 3:
            return CNN2D(shape[0], classes)
        raise SystemExit(f"--model cnn: inputs of shape {shape} are neither signals nor images; "
                         f"use --model mlp")
    if name == "mlp":
        return MLP(features, classes, (256, 256))
    if name == "mlp-wide":
        return MLP(features, classes, (2560, 2048))
    raise SystemExit(f"--model {name!r}: choose one of {', '.join(MODELS)}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
