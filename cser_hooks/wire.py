"""The wire model: bytes one rank puts on the network for one collective (pure functions).

``stats()`` reports two byte counts per collective: the bytes *handed* to it (the payload, what
:class:`~cser_hooks.comm.Communicator` has always counted) and the bytes this rank *sends on the
wire* under the model below. They differ by the collective's fan-out: with W ranks and a payload of
n bytes per rank,

=============================  =====================================  ===========================
collective                     bytes one rank sends                   for W = 4
=============================  =====================================  ===========================
ring allreduce                 2(W−1)/W · n                           1.5 n
ring allgather (equal sizes)   (W−1) · n                              3 n
allgather_v (rank r: n_r)      (W−1) · n_r                            3 n_r
all_to_all (n_j to rank j)     Σ_{j≠r} n_j                            (own chunk stays local)
point-to-point send            n (per send to another rank)           n
any collective at W = 1        0                                      —
=============================  =====================================  ===========================

This is the bandwidth-optimal ring / pairwise model: what NCCL's and gloo's ring algorithms move per
rank. A ring allreduce is a reduce-scatter then an allgather, each W−1 steps of an n/W chunk to the
next rank (2(W−1) chunks of n/W); a ring allgather forwards each of the W−1 other ranks' blocks and
its own, W−1 blocks of n; allgather_v and all_to_all run pairwise (each piece goes straight to the
rank that needs it; this package issues allgather_v with unequal sizes as such an all_to_all). Tree,
recursive-doubling, BCube or hierarchical (intra-node then inter-node) algorithms — which NCCL picks
for small messages or across nodes, and Horovod's hierarchical modes — move different amounts, and
the model ignores protocol overhead (TCP/IP headers, ACKs, the backend's framing). It is a model,
not a measurement: the bench's ``--link`` runs compare it with the veth's byte counters.

The ring allreduce figure is floored to whole bytes per collective (a ring's chunks are whole
elements, and with W not dividing n the ranks' exact shares differ by a chunk boundary anyway); the
others are exact. Everything is integer arithmetic on sizes: no tensor is read.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

ALLREDUCE = "allreduce"
ALLGATHER = "allgather"
ALLGATHER_V = "allgather_v"
ALL_TO_ALL = "all_to_all"
SENDRECV = "sendrecv"
AGREEMENT = "agreement"
KINDS = (ALLREDUCE, ALLGATHER, ALLGATHER_V, ALL_TO_ALL, SENDRECV)  # the algorithms' collectives


def _check(nbytes: int, world: int) -> None:
    if world < 1 or nbytes < 0:
        raise ValueError(f"wire model: need world >= 1 and bytes >= 0, got world={world}, bytes={nbytes}")


def allreduce_bytes(nbytes: int, world: int) -> int:
    """Ring allreduce of ``nbytes`` per rank: ⌊2(W−1)·n / W⌋ bytes sent by each rank (0 at W = 1).

    Reduce-scatter (W−1 chunks of n/W to the next rank) then allgather (W−1 more chunks)."""
    _check(nbytes, world)
    return 2 * (world - 1) * nbytes // world


def allgather_bytes(nbytes: int, world: int) -> int:
    """Ring allgather of an equal-sized ``nbytes`` block per rank: (W−1)·n bytes sent by each rank.

    Each rank forwards W−1 blocks of n (its own first, then those it received) to the next rank."""
    _check(nbytes, world)
    return (world - 1) * nbytes


def allgather_v_bytes(nbytes_of_rank: Sequence[int], rank: int) -> int:
    """Allgather with per-rank sizes (``nbytes_of_rank[r]`` from rank r), pairwise: rank ``rank``
    sends its own block to each of the W−1 others, (W−1)·n_rank bytes. With equal sizes this is
    :func:`allgather_bytes` (a ring moves the same per rank)."""
    world = len(nbytes_of_rank)
    _check(int(nbytes_of_rank[rank]), world)
    return (world - 1) * int(nbytes_of_rank[rank])


def all_to_all_bytes(nbytes_to_rank: Sequence[int], rank: int) -> int:
    """All-to-all where ``nbytes_to_rank[j]`` bytes go to rank j: Σ_{j≠rank} n_j bytes sent (the
    chunk addressed to the rank itself stays local; 0 at W = 1)."""
    return sum(int(n) for j, n in enumerate(nbytes_to_rank) if j != rank)


def p2p_bytes(sends: Iterable[tuple[int, int]], rank: int) -> int:
    """Point-to-point: ``sends`` = [(bytes, peer)]; every send to another rank is its size, a send
    to oneself is local (0)."""
    return sum(int(n) for n, peer in sends if peer != rank)


def dense_allreduce_bytes(dense_nbytes: int, world: int) -> int:
    """What DDP's own dense ring allreduce of the same buckets would send per rank: 2(W−1)/W · dense."""
    return allreduce_bytes(dense_nbytes, world)


def object_allgather_bytes(pickled_nbytes: int, world: int) -> int:
    """``torch.distributed.all_gather_object`` of one pickled object of ``pickled_nbytes``: an
    allgather of the sizes (one int64 per rank), then of the pickles padded to the largest (taken
    as this rank's size: the configuration agreement check gathers equal objects):
    (W−1)·(8 + n) bytes sent."""
    return allgather_bytes(8 + pickled_nbytes, world)

