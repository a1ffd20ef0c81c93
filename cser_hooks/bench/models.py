"""Benchmark models (``--model``).

    cnn       small convolutional net: 1-D convolutions for signals ``(N, L)`` / ``(N, C, L)``
              (MNIST-1D: ~10k parameters, ~95 % test accuracy), 2-D for images ``(N, C, H, W)``.
    mlp       small MLP (2 x 256 hidden) on the flattened input.
    mlp-wide  wide MLP (2560 and 2048 hidden): 5.37 M parameters on MNIST-1D, so communication
              dominates computation; the model for ``--link`` runs.
    gpt       decoder-only byte-level transformer (vocabulary 256) for the text corpora of
              :mod:`cser_hooks.bench.data`: token + learned position embeddings, pre-LN blocks of causal
              self-attention (``scaled_dot_product_attention(is_causal=True)``) and a 4x GELU MLP, a final
              LayerNorm and an *untied* output head. Default 6 blocks of width 384, 6 heads, context 128:
              10,893,312 parameters in 77 tensors of 9 shapes (2 DDP buckets at the default 25 MB cap
              with torch 2.13; ``--gpt-layers 8``: 14.4 M parameters, 3 buckets).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

MODELS = ("cnn", "mlp", "mlp-wide", "gpt")
VOCAB = 256  # byte-level
GPT_DEFAULTS = {"layers": 6, "dim": 384, "heads": 6, "context": 128}


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


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x)); causal attention."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, heads, t, d / heads)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Decoder-only byte-level language model: ``(B, T)`` int64 bytes -> ``(B, T, 256)`` next-byte logits.

    The output head is untied from the token embedding (one more 256 x dim matrix, and one more
    tensor shape for the compressors). Residual projections start scaled by 1/sqrt(2 * layers)
    (GPT-2's initialization), the other weights N(0, 0.02), biases 0.
    """

    def __init__(self, layers: int = 6, dim: int = 384, heads: int = 6, context: int = 128,
                 vocab: int = VOCAB):
        super().__init__()
        if dim % heads:
            raise SystemExit(f"--gpt-dim {dim} is not a multiple of --gpt-heads {heads}")
        self.context = context
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.apply(self._init)
        for block in self.blocks:
            for proj in (block.proj, block.out):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} bytes is longer than the context {self.context}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def build(name: str, input_shape: Sequence[int], classes: int, **gpt) -> nn.Module:
    """The model ``name`` for inputs of ``input_shape`` (without the batch dimension).

    ``gpt``: ``layers``, ``dim``, ``heads``, ``context`` of the gpt (defaults :data:`GPT_DEFAULTS`;
    ``input_shape`` and ``classes`` are ignored for it: byte windows, 256 classes)."""
    if name == "gpt":
        return GPT(**{**GPT_DEFAULTS, **{k: int(v) for k, v in gpt.items() if v is not None}})
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


def describe(name: str, model: nn.Module) -> str:
    """The model as the report names it: ``gpt (6 pre-LN blocks of width 384, ..., 10,893,312 parameters)``."""
    if not isinstance(model, GPT):
        return f"{name} ({count_parameters(model):,} parameters)"
    shapes = {tuple(p.shape) for p in model.parameters()}
    return (f"{name} ({len(model.blocks)} pre-LN blocks of width {model.tok.embedding_dim}, {model.blocks[0].heads} "
            f"heads, context {model.context} bytes, 4x GELU MLP, untied output head; {len(list(model.parameters()))} "
            f"tensors of {len(shapes)} shapes, {count_parameters(model):,} parameters)")
