"""Shared masks and per-rank rounding (docs/algorithms.md §1 "linear with a shared mask", §3 PSync).

random_block / random_k select the same blocks on every rank from (seed, step, bucket key, salt) alone,
so avg_j C(x_j) is an allreduce of the payloads; docs/algorithms.md §1 fixes that mask (blake2b seed,
hashed block scores),
re-implemented in tests/reference/masks.py (ref_blocks). QSGD's stochastic rounding must instead be independent
across ranks and reproducible for the same (seed, step, key, rank) (a resumed job redraws the same bits).

Checked in one process (every key field matters, rank does not) and on 4 real gloo ranks (same masks on
all ranks, the allreduce of payloads is avg_j C(x_j), QSGD differs across ranks and is reproducible
in another process).
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from cser_hooks.compressors import MaskKey, get_compressor
from harness import run_ranks
from reference.masks import ref_blocks

WORLD = 4
# (spec, ratio, block, numel): the brief's sizes, a short tail block, random_k
SHARED = [
    ("random_block:ratio=1/64,block=256", 1 / 64, 256, 65539),
    ("random_block:ratio=1/4,block=16", 1 / 4, 16, 1023),
    ("random_block:ratio=1/2,block=4", 1 / 2, 4, 7),
    ("random_k:ratio=1/100", 1 / 100, 1, 1023),
]
STEPS = (0, 1, 2, 17)
KEYS = (0, 5, "layer1.weight")


def selected_positions(spec: str, numel: int, mk: MaskKey, offset: int = 0) -> torch.Tensor:
    """Which entries C sends, read off the payload of x = offset + 1, 2, ..., numel (0 marks padding)."""
    c = get_compressor(spec)
    x = torch.arange(1, numel + 1, dtype=torch.float32) + offset
    (values,) = c.compress(x, mk)
    v = values[values != 0]
    return (v - offset - 1).long()


def ref_positions(numel: int, ratio: float, block: int, mk: MaskKey) -> torch.Tensor:
    _, blocks = ref_blocks(numel, ratio, block, mk)
    pos = (blocks[:, None] * block + torch.arange(block)).reshape(-1)
    return pos[pos < numel]


# ------------------------------------------------------------------------------------------------
# one process


@pytest.mark.parametrize("spec,ratio,block,numel", SHARED)
def test_mask_follows_the_shared_definition(spec, ratio, block, numel):
    for step, key, salt in itertools.product(STEPS, KEYS, ("c1", "c2")):
        mk = MaskKey(seed=42, step=step, key=key, salt=salt)
        assert torch.equal(selected_positions(spec, numel, mk), ref_positions(numel, ratio, block, mk)), mk


@pytest.mark.parametrize("spec,ratio,block,numel", SHARED)
def test_mask_depends_on_seed_step_key_salt_but_not_rank(spec, ratio, block, numel):
    base = MaskKey(seed=42, step=3, key=5, salt="c1", rank=0)
    mask = selected_positions(spec, numel, base)
    for r in range(1, WORLD):
        assert torch.equal(selected_positions(spec, numel, replace(base, rank=r)), mask), (
            "rank changed the mask"
        )
    nblocks = -(-numel // block)
    if mask.numel() >= numel or nblocks < 8:
        return  # everything (or almost everything) is selected: there is nothing to vary
    for field, value in (("seed", 43), ("step", 4), ("key", 6), ("salt", "c2")):
        other = selected_positions(spec, numel, replace(base, **{field: value}))
        assert not torch.equal(other, mask), f"changing {field} kept the same mask"


def test_masks_of_successive_steps_are_distinct():
    """50 steps of random_block(1/64) on 65539 entries (5 of 257 blocks): 50 different masks."""
    masks = {
        tuple(
            selected_positions(
                "random_block:ratio=1/64,block=256", 65539, MaskKey(seed=0, step=t, key=0, salt="c1")
            ).tolist()
        )
        for t in range(50)
    }
    assert len(masks) == 50


def test_mask_is_the_same_for_every_dtype():
    mk = MaskKey(seed=1, step=2, key=3, salt="c1")
    c = get_compressor("random_block:ratio=1/16,block=8")
    x = torch.arange(1, 1001, dtype=torch.float32)
    (v32,) = c.compress(x, mk)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        (v,) = c.compress(x.to(dtype), mk)
        assert torch.equal(v, v32.to(dtype)), dtype  # exact for fp16 / fp64 (integers <= 1000)


def qsgd_levels(mk: MaskKey, x: torch.Tensor) -> torch.Tensor:
    return get_compressor("qsgd:s=3,block=512").compress(x, mk)[1]


def test_qsgd_rounding_is_reproducible_and_depends_on_every_field():
    x = torch.linspace(-1, 1, 4099)
    base = MaskKey(seed=7, step=5, key=2, salt="", rank=1)
    levels = qsgd_levels(base, x)
    assert torch.equal(qsgd_levels(MaskKey(seed=7, step=5, key=2, salt="", rank=1), x), levels)
    for field, value in (("rank", 2), ("seed", 8), ("step", 6), ("key", 3), ("salt", "c2")):
        assert not torch.equal(qsgd_levels(replace(base, **{field: value}), x), levels), field


# ------------------------------------------------------------------------------------------------
# 4 real gloo ranks


def masks_rank(rank, world_size, shared, steps, keys):
    """Each rank compresses its own x_j = offset_j + (1..numel) and allreduces the payload values."""
    out = {}
    for spec, _, _, numel in shared:
        c = get_compressor(spec)
        for step, key in itertools.product(steps, keys):
            mk = MaskKey(seed=42, step=step, key=key, salt="c1", rank=rank)
            offset = rank * numel
            (values,) = c.compress(torch.arange(1, numel + 1, dtype=torch.float32) + offset, mk)
            pos = selected_positions(spec, numel, mk, offset)
            dist.all_reduce(values)
            avg = c.decompress((values / world_size,), numel, torch.float32, mk)
            out[(spec, step, key)] = (pos, avg)
    x = torch.linspace(-1, 1, 4099)
    mk = MaskKey(seed=7, step=5, key=2, salt="", rank=rank)
    q1 = get_compressor("qsgd:s=3,block=512").compress(x, mk)
    q2 = get_compressor("qsgd:s=3,block=512").compress(x, mk)
    return out, q1, q2


@pytest.fixture(scope="module")
def rank_results():
    return run_ranks(masks_rank, WORLD, SHARED, (0, 1), (0, "layer1.weight"), timeout=90)


def test_shared_masks_agree_across_ranks_and_allreduce_averages(rank_results):
    for spec, ratio, block, numel in SHARED:
        seen = []
        for step, key in itertools.product((0, 1), (0, "layer1.weight")):
            mk = MaskKey(seed=42, step=step, key=key, salt="c1")
            want = ref_positions(numel, ratio, block, mk)
            for rank, (out, _, _) in enumerate(rank_results):
                pos, avg = out[(spec, step, key)]
                assert torch.equal(pos, want), (
                    f"rank {rank} selected other entries ({spec}, step {step}, key {key})"
                )
                # avg_j C(x_j): x_j = j*numel + (1..numel) on the mask, 0 elsewhere (integers: exact)
                expected = torch.zeros(numel)
                expected[want] = (want + 1).float() + numel * (WORLD - 1) / 2
                assert torch.equal(avg, expected), f"rank {rank}: allreduce of payloads is not avg_j C(x_j)"
            seen.append(tuple(want.tolist()))
        if numel > 8:
            assert len(set(seen[0::2])) == 2 and len(set(seen[1::2])) == 2, (
                f"{spec}: steps 0 and 1 share a mask"
            )


def test_qsgd_rounding_differs_across_ranks_and_reproduces_in_another_process(rank_results):
    x = torch.linspace(-1, 1, 4099)
    levels = []
    for rank, (_, q1, q2) in enumerate(rank_results):
        assert all(torch.equal(a, b) for a, b in zip(q1, q2)), f"rank {rank}: same key, different rounding"
        here = get_compressor("qsgd:s=3,block=512").compress(
            x, MaskKey(seed=7, step=5, key=2, salt="", rank=rank)
        )
        assert all(torch.equal(a, b) for a, b in zip(q1, here)), (
            f"rank {rank}: not reproducible in this process"
        )
        assert torch.equal(q1[0], rank_results[0][1][0]) and torch.equal(q1[2], rank_results[0][1][2]), (
            "signs and norms do not depend on the rank"
        )
        levels.append(q1[1])
    for a, b in itertools.combinations(range(WORLD), 2):
        assert not torch.equal(levels[a], levels[b]), f"ranks {a} and {b} drew the same rounding"
