"""The compressor contract (docs/algorithms.md §1).

A compressor maps a flat, contiguous floating-point tensor ``x`` to a *payload* (a tuple of tensors
that travel on the wire) and back. Two families, because the collective differs:

* ``linear = True`` (shared mask): every rank selects the same coordinates from a
  :class:`MaskKey` (global seed, step, bucket key) alone, so ``avg_j C(x_j)`` is an allreduce of
  the payload. The payload is a single tensor of values; no indices travel.
* ``linear = False``: the payload depends on the data (indices, signs, levels); averaging needs an
  allgather of payloads followed by ``decompress`` of each.

Every compressor has a plain-torch ``reference_*`` implementation written for clarity next to its
fast path; tests compare the two. ``wire_bytes(numel, dtype)`` is the exact number of payload
bytes for a tensor of ``numel`` elements of ``dtype``; tests check it against the payload.
"""
from __future__ import annotations

import hashlib
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

Payload = tuple[torch.Tensor, ...]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class MaskKey:
    """What a shared random mask (and any stochastic rounding) is a function of.

    ``seed`` is the job-wide seed, ``step`` the state's step counter, ``key`` the bucket index (DDP)
    or tensor name (Horovod), ``salt`` separates independent draws of one step (e.g. the CSER
    gradient mask C1 from the reset mask C2), ``rank`` is only used by compressors whose randomness
    must be *independent* across ranks (QSGD's stochastic rounding); shared masks ignore it.
    """

    seed: int = 0
    step: int = 0
    key: int | str = 0
    salt: str = ""
    rank: int = 0

    def generator_seed(self, per_rank: bool = False) -> int:
        """A 63-bit integer seed: blake2b of the fields, so it is the same on every host/device."""
        text = f"{self.seed}|{self.step}|{self.key}|{self.salt}"
        if per_rank:
            text += f"|rank{self.rank}"
        digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def int_option(who: str, name: str, value, lo: int, hi: int | None = None) -> int:
    """An integer option in [lo, hi] (hi None: no bound), or a ValueError naming the compressor, the option,
    the value and the range (cser_hooks/knobs.py's style). ``int(2.5)`` would truncate silently."""
    rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    integral = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral:
        raise ValueError(f"{who}: {name} must be an integer {rng}, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{who}: {name} must be {rng}, got {value!r}")
    return int(value)


def is_real(value) -> bool:
    """A real number, not a bool and not a string (``float("0.5")`` would accept the string)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_input(x: torch.Tensor, who: str) -> None:
    """Reject what no compressor supports, with the fix in the message (docs/algorithms.md §8)."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{who}: unsupported dtype {x.dtype}; compressors take float32/float16/bfloat16/float64 "
            f"gradients. Cast the tensor (x.float()) or leave it out of compression."
        )
    if x.dim() != 1:
        raise ValueError(f"{who}: expects a flat 1-D tensor, got shape {tuple(x.shape)}; pass x.view(-1)")
    if not x.is_contiguous():
        raise ValueError(f"{who}: expects a contiguous tensor; pass x.contiguous()")


class Compressor:
    """Base class. Subclasses set ``name``, ``linear`` and ``unbiased`` and implement the methods.

    ``delta`` is the contraction constant a biased compressor claims:
    ``||x - C(x)||^2 <= (1 - delta) ||x||^2`` (docs/algorithms.md §1). ``None`` when no bound is claimed
    (unbiased stochastic compressors are bounded in variance instead).
    """

    name: str = "base"
    linear: bool = False
    unbiased: bool = False
    #: True when compress() draws random numbers that must differ across ranks (QSGD).
    per_rank_randomness: bool = False
    # capabilities the algorithms ask for (never a compressor's name):
    #: C acts on each element alone (identity, casts, zero): tensor boundaries inside a bucket change
    #: nothing, so per-tensor mode uses the compressor as it is.
    elementwise: bool = False
    #: C(x) = 0 and the payload is empty (zero): nothing to exchange, the step is local.
    sends_nothing: bool = False
    #: C keeps a mask-selected subset of the entries unchanged and drops the rest, the subset a
    #: function of the MaskKey alone (identity, unscaled random_block/random_k): averaging C(x_j)
    #: over ranks and writing it back is a projection, what CSER's reset needs of C2.
    projection: bool = False
    #: maps a vector of values to a code of the same length with no positions of its own (qsgd,
    #: sign_blockwise, casts, identity): may follow a sparsifier in ``compose``.
    quantizer: bool = False
    #: every NaN/Inf of the input shows in ``nonfinite_witness(payload)`` (top_k, qsgd, sign_blockwise),
    #: so a non-finite check reads that small tensor instead of making a pass over the input.
    nonfinite_in_payload: bool = False

    def nonfinite_witness(self, payload: Payload) -> torch.Tensor:
        """The part of the payload in which any NaN/Inf of the compressed input shows (top-k's values: a
        NaN or Inf has the largest magnitude, so it is selected; QSGD's block norms; sign's block
        scales). Only for compressors with ``nonfinite_in_payload``; for the others (a random mask, a
        cast) the payload can miss one, and the caller checks the input."""
        raise NotImplementedError(f"{self.name}: its payload does not show every NaN/Inf of the input")

    def spec(self) -> str:
        """The registry string that rebuilds this compressor (used for cross-rank agreement)."""
        return self.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec()}>"

    def delta(self, numel: int) -> float | None:
        return None

    # -- payload -----------------------------------------------------------------------------
    def compress(self, x: torch.Tensor, mk: MaskKey, segments: Sequence[int] | None = None) -> Payload:
        raise NotImplementedError

    def decompress(self, payload: Payload, numel: int, dtype: torch.dtype, mk: MaskKey,
                   segments: Sequence[int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def wire_bytes(self, numel: int, dtype: torch.dtype = torch.float32,
                   segments: Sequence[int] | None = None) -> int:
        raise NotImplementedError

    # -- error feedback, fused where a kernel can do it --------------------------------------
    def compress_ef(self, p: torch.Tensor, mk: MaskKey, segments: Sequence[int] | None = None) -> Payload:
        """Compress ``p`` and overwrite it with the new residual ``p - C(p)`` (docs/algorithms.md §2).

        The default goes through :meth:`decompress`; compressors override it with a single pass.
        """
        payload = self.compress(p, mk, segments)
        p.sub_(self.decompress(payload, p.numel(), p.dtype, mk, segments))
        return payload

    def overwrite(self, values: torch.Tensor, out: torch.Tensor, mk: MaskKey,
                  segments: Sequence[int] | None = None) -> torch.Tensor:
        """Linear compressors: write the (averaged) payload values over the selected entries of
        ``out`` and leave the others untouched (CSER's partial sync and partial reset)."""
        raise NotImplementedError(f"{self.name} is not a shared-mask compressor")

    def decompress_add(self, payload: Payload, out: torch.Tensor, alpha: float, mk: MaskKey,
                       segments: Sequence[int] | None = None) -> torch.Tensor:
        """out += alpha * C(x) for a received payload (the allgather path sums n of these)."""
        return out.add_(self.decompress(payload, out.numel(), torch.float32, mk, segments), alpha=alpha)

    def __call__(self, x: torch.Tensor, mk: MaskKey = MaskKey(), segments=None) -> torch.Tensor:
        """C(x) as a dense tensor: decompress(compress(x))."""
        return self.decompress(self.compress(x, mk, segments), x.numel(), x.dtype, mk, segments)


def payload_bytes(payload: Payload) -> int:
    return sum(t.numel() * t.element_size() for t in payload)
