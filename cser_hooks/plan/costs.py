"""Compression cost: kernel throughputs (GB/s of fp32 gradient processed) and how many passes each
compressor makes over a bucket.

Source of the throughputs, in this order:

1. a kernel report given by the user (``--kernel-report PATH``: the markdown table that
   ``scripts/bench_kernels.py`` writes, one row per operation and size);
2. the project's committed report ``docs/bench-kernels/report.md`` when this package runs from a
   checkout that has it;
3. :data:`BUILTIN`: the same figures copied from that report (x86_64, 2 logical cores, torch 2.13
   CPU, 2 threads; see the report's header), for installs without the docs.

``--rate op=GB/s`` then overrides single operations (all sizes). A row is chosen per bucket: the
report's size (1, 16, 64, 256 MiB) nearest to the bucket's fp32 size on a log scale.

Cost of one pass of ``op`` over a bucket of n fp32 bytes: ``mult · n / (GB/s · 1e9) · slowdown``,
where ``mult`` scales ops whose work follows the kept share (random_block gather/scatter measured
at ratio 1/4, top-k scatter-add at 1/64) and ``slowdown`` accounts for fewer cores per worker than
the benchmark had (e.g. 4 workers on its 2 cores: 4). Per-call overheads (kernel launch, Python) are
not modelled: they matter for buckets well below 1 MiB only.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

REPORT = Path(__file__).resolve().parents[2] / "docs" / "bench-kernels" / "report.md"

# planner op -> the row label of scripts/bench_kernels.py
OPS = {
    "copy": "copy (copy_ into preallocated)",
    "fp16": "fp16 cast (baseline)",
    "sign_ef_64": "sign compress+EF (blocks of 64)",
    "sign_dec_64": "sign decompress (blocks of 64)",
    "sign_ef_4096": "sign compress+EF (blocks of 4096)",
    "sign_ef_tensor": "sign compress+EF (blocks of 2^20)",
    "sign_dec": "sign decompress (blocks of 2^20)",
    "qsgd_ef": "qsgd compress+EF (s=15, blocks of 4096)",
    "qsgd_dec": "qsgd decompress (blocks of 4096)",
    "qsgd_ef_64": "qsgd compress+EF (s=15, blocks of 64)",
    "qsgd_dec_64": "qsgd decompress (blocks of 64)",
    "rb_gather": "random_block gather+zero (1/4)",
    "rb_scatter": "random_block scatter (1/4)",
    "topk_select": "top-k select (1/64)",
    "topk_scatter": "top-k scatter-add (1/64)",
}
RB_MEASURED_RATIO = 1 / 4      # the random_block rows' ratio
TOPK_MEASURED_RATIO = 1 / 64   # the top-k scatter-add row's ratio

# docs/bench-kernels/report.md (committed), GB/s at 1, 16, 64, 256 MiB
_SIZES = (1.0, 16.0, 64.0, 256.0)
_BUILTIN_GBPS = {
    "copy": (26.80, 37.20, 17.69, 16.07),
    "fp16": (22.47, 55.51, 24.74, 19.97),
    "sign_ef_64": (3.53, 4.57, 4.29, 4.42),
    "sign_dec_64": (9.52, 8.35, 8.50, 8.31),
    "sign_ef_4096": (6.08, 14.63, 10.91, 11.06),
    "sign_ef_tensor": (5.02, 11.83, 7.37, 6.95),
    "sign_dec": (12.73, 42.21, 34.12, 26.15),
    "qsgd_ef": (3.08, 5.68, 5.25, 5.36),
    "qsgd_dec": (3.37, 4.02, 4.26, 4.30),
    "qsgd_ef_64": (2.40, 3.32, 3.45, 3.49),
    "qsgd_dec_64": (2.99, 3.65, 3.74, 3.78),
    "rb_gather": (20.49, 49.93, 20.48, 19.23),
    "rb_scatter": (21.31, 52.38, 28.01, 28.12),
    "topk_select": (2.27, 2.87, 2.40, 2.27),
    "topk_scatter": (52.43, 88.26, 87.14, 47.81),
}
BUILTIN = {op: tuple(zip(_SIZES, v)) for op, v in _BUILTIN_GBPS.items()}


@dataclass(frozen=True)
class Costs:
    """Kernel throughputs: op -> ((MiB, GB/s), ...); ``source`` says where each figure came from."""

    rates: Mapping[str, tuple[tuple[float, float], ...]] = field(default_factory=lambda: dict(BUILTIN))
    source: str = "built-in copy of docs/bench-kernels/report.md"
    slowdown: float = 1.0

    def gbps(self, op: str, nbytes: float) -> float:
        """The GB/s of ``op`` at the report size nearest to ``nbytes`` (log scale)."""
        rows = self.rates[op]
        mib = max(nbytes, 1.0) / 2 ** 20
        return min(rows, key=lambda r: abs(math.log(r[0] / mib)))[1]

    def seconds(self, op: str, nbytes: float, mult: float = 1.0) -> float:
        """``mult`` passes of ``op`` over ``nbytes`` of fp32 gradient: mult · n / (GB/s · 1e9) · slowdown."""
        if mult == 0 or nbytes == 0:
            return 0.0
        return mult * nbytes / (self.gbps(op, nbytes) * 1e9) * self.slowdown

    def with_overrides(self, overrides: Mapping[str, float]) -> Costs:
        """Override ops with one GB/s figure at every size (``--rate op=GB/s``)."""
        if not overrides:
            return self
        unknown = sorted(set(overrides) - set(OPS))
        if unknown:
            raise ValueError(f"unknown kernel op(s) {', '.join(unknown)}; known: {', '.join(OPS)}")
        rates = dict(self.rates)
        for op, v in overrides.items():
            if not v > 0:
                raise ValueError(f"rate of {op} must be > 0 GB/s, got {v}")
            rates[op] = ((1.0, float(v)),)
        src = self.source + "; overridden: " + ", ".join(f"{k}={v:g} GB/s" for k, v in overrides.items())
        return replace(self, rates=rates, source=src)


def parse_report(text: str) -> dict[str, tuple[tuple[float, float], ...]]:
    """op -> ((MiB, GB/s), ...) from the markdown table of scripts/bench_kernels.py."""
    by_label = {label: op for op, label in OPS.items()}
    found: dict[str, list[tuple[float, float]]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or cells[0] not in by_label:
            continue
        try:
            mb, gbps = float(cells[1]), float(cells[3])
        except ValueError:
            continue
        found.setdefault(by_label[cells[0]], []).append((mb, gbps))
    return {op: tuple(sorted(v)) for op, v in found.items()}


def load(path: str | Path | None = None, slowdown: float = 1.0) -> Costs:
    """Costs from ``path``, else the committed report, else :data:`BUILTIN` (ops a report lacks stay
    built-in; ``source`` says which)."""
    candidates = [Path(path)] if path is not None else [REPORT]
    for p in candidates:
        if p.is_file():
            parsed = parse_report(p.read_text(encoding="utf-8"))
            if not parsed and path is not None:
                raise ValueError(f"{p}: no kernel rows of scripts/bench_kernels.py found")
            if parsed:
                missing = sorted(set(OPS) - set(parsed))
                src = f"{p} ({len(parsed)} ops" + (f"; built-in for {', '.join(missing)})" if missing else ")")
                return Costs({**BUILTIN, **parsed}, src, slowdown)
        elif path is not None:
            raise FileNotFoundError(f"kernel report {p} not found")
    return Costs(dict(BUILTIN), "built-in copy of docs/bench-kernels/report.md", slowdown)


# -- passes of each compressor over a bucket: ((op, mult), ...), mult in units of the bucket's fp32 bytes --

def kept_share(comp, n: int) -> float:
    """The share of a bucket of n elements that the compressor keeps (1 for dense ones)."""
    name = type(comp).__name__
    if name == "TopK":
        return comp.k(n) / n
    if name == "RandomBlock":
        return min(1.0, comp.num_blocks(n) * comp.block / n)
    if name == "Compose":
        return kept_share(comp.sparsifier, n)
    return 1.0


def sign_rows(block: int | None) -> tuple[str, str]:
    """(compress+EF, decompress) rows of sign_blockwise at the measured block size nearest to ``block`` on a
    log scale (64, 4096, 2^20; None = one block per tensor, the 2^20 rows)."""
    if block is None or block > 1 << 16:
        return "sign_ef_tensor", "sign_dec"
    if block > 512:
        return "sign_ef_4096", "sign_dec"  # decompress is measured at 64 and 2^20 only
    return "sign_ef_64", "sign_dec_64"


def _qsgd_row(comp, op: str) -> str:
    """The QSGD row measured at the block size nearest to the compressor's (64 or 4096, log scale):
    small blocks cost a norm and a division per block (compress about 2x slower at 64 in docs/bench-kernels)."""
    return f"{op}_64" if comp.block <= 512 else op


# per compressor class: (encode passes, decode passes) as functions of (compressor, n); the kernels
# each runs are the rows of docs/bench-kernels (a cost table keyed by the class, like the kernels')
_PASSES = {
    "Identity": (lambda c, n: (), lambda c, n: ()),
    "Zero": (lambda c, n: (), lambda c, n: ()),
    "Cast": (lambda c, n: (("fp16", 1.0),), lambda c, n: (("fp16", 1.0),)),
    "RandomBlock": (lambda c, n: (("rb_gather", kept_share(c, n) / RB_MEASURED_RATIO),),
                    lambda c, n: (("rb_scatter", kept_share(c, n) / RB_MEASURED_RATIO),)),
    "TopK": (lambda c, n: (("topk_select", 1.0),),
             lambda c, n: (("topk_scatter", kept_share(c, n) / TOPK_MEASURED_RATIO),)),
    "SignBlockwise": (lambda c, n: ((sign_rows(c.block)[0], 1.0),), lambda c, n: ((sign_rows(c.block)[1], 1.0),)),
    "QSGD": (lambda c, n: ((_qsgd_row(c, "qsgd_ef"), 1.0),),
             lambda c, n: ((_qsgd_row(c, "qsgd_dec"), 1.0),)),
}


def _passes(comp, n: int, which: int) -> tuple[tuple[str, float], ...]:
    name = type(comp).__name__
    if name == "Compose":  # the sparsifier's passes, then the quantizer's on the kept share
        k = kept_share(comp, n)
        return _passes(comp.sparsifier, n, which) + scaled(_passes(comp.quantizer, n, which), k)
    if name not in _PASSES:
        raise ValueError(f"no cost model for compressor {comp.spec()!r}")
    return _PASSES[name][which](comp, n)


def encode_passes(comp, n: int) -> tuple[tuple[str, float], ...]:
    """Passes to compress (with error feedback where the compressor fuses it) a bucket of n elements."""
    return _passes(comp, n, 0)


def decode_passes(comp, n: int) -> tuple[tuple[str, float], ...]:
    """Passes to decompress one payload into (or add it to) a bucket of n elements."""
    return _passes(comp, n, 1)


def copies(m: float) -> tuple[tuple[str, float], ...]:
    """``m`` elementwise passes (adds, norms, copies, the non-finite check) at copy_ speed."""
    return (("copy", float(m)),) if m else ()


def scaled(passes, factor: float) -> tuple[tuple[str, float], ...]:
    return tuple((op, m * factor) for op, m in passes)
