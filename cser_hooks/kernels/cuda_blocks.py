"""CUDA gather / scatter of selected blocks (docs/algorithms.md §1, random_block / random_k).

Semantics as in ``cpu_blocks.py``; one thread per payload element (grid-stride), so loads and
stores of a block are coalesced. ``blocks`` are distinct (sorted) block indices, so scatters need
no atomics. Indices outside the tensor read as 0 and are not written.
"""
from __future__ import annotations

import numpy as np

from .cuda_launch import cuda, grid_for
from .cuda_segments import load_f32, store_f32


@cuda.jit
def gather_kernel(x, blocks, b, n, out, zero):
    total = np.int64(blocks.size) * b
    idx = cuda.grid(1)
    stride = cuda.gridsize(1)
    while idx < total:
        j = idx // b
        src = np.int64(blocks[j]) * b + (idx - j * b)
        if src >= 0 and src < n:
            out[idx] = x[src]
            if zero:
                x[src] = 0
        else:
            out[idx] = 0
        idx += stride


@cuda.jit
def scatter_kernel(values, blocks, b, n, out, add, kind):
    total = np.int64(blocks.size) * b
    idx = cuda.grid(1)
    stride = cuda.gridsize(1)
    while idx < total:
        j = idx // b
        dst = np.int64(blocks[j]) * b + (idx - j * b)
        if dst >= 0 and dst < n:
            if not add:
                out[dst] = values[idx]
            elif kind == 0 or kind == 3:
                out[dst] += values[idx]
            else:
                store_f32(out, dst, load_f32(out, dst, kind) + load_f32(values, idx, kind), kind)
        idx += stride


@cuda.jit
def scatter_indices_kernel(values, indices, out, kind):
    """out[indices[i]] += values[i] for distinct indices."""
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < indices.size:
        d = np.int64(indices[i])
        if kind == 0 or kind == 3:
            out[d] += values[i]
        else:
            store_f32(out, d, load_f32(out, d, kind) + load_f32(values, i, kind), kind)
        i += stride


def gather(x, blocks, b, n, out, zero, stream=0, tpb=256, max_blocks=65535):
    gather_kernel[grid_for(blocks.size * b, tpb, max_blocks), tpb, stream](x, blocks, b, n, out, zero)


def scatter(values, blocks, b, n, out, add, kind, stream=0, tpb=256, max_blocks=65535):
    scatter_kernel[grid_for(blocks.size * b, tpb, max_blocks), tpb, stream](values, blocks, b, n, out, add, kind)


def scatter_add_indices(values, indices, out, kind, stream=0, tpb=256, max_blocks=65535):
    scatter_indices_kernel[grid_for(indices.size, tpb, max_blocks), tpb, stream](values, indices, out, kind)
