"""Single-process W-worker reference simulations of the DDP hooks (no code shared with cser_hooks).

docs/algorithms.md §2 (EF), §3 (CSER and M-CSER), §5 (CompSkip); masks re-implemented from the shared-mask
definition of the team brief (§1). Also plain references without a simulation: ``kernels.py`` (the
kernels' wire formats, §1-2).
"""
from .common import Layout, World, allreduce_average, average
from .compskip import simulate_compskip
from .cser import simulate_cser_hookform, simulate_cser_paper, simulate_mcser_paper
from .ef import simulate_ef
from .masks import RefCompressor, generator_seed, random_block_mask, top_k_mask

__all__ = [
    "Layout", "World", "allreduce_average", "average", "simulate_compskip", "simulate_cser_hookform",
    "simulate_cser_paper", "simulate_ef", "simulate_mcser_paper", "RefCompressor", "generator_seed",
    "random_block_mask", "top_k_mask",
]
