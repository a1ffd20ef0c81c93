"""Benchmark data sets, prepared once by the launcher as one ``.npz`` that every worker loads.

Sources (``--data``):
    mnist1d   MNIST-1D generated offline by the ``mnist1d`` package (its ``make_dataset``; never its
              ``get_dataset``, which downloads). The arrays are cached in ``~/.cache/cser_hooks``
              (or ``$CSER_HOOKS_CACHE``) keyed by the generation arguments.
    digits    scikit-learn's bundled 8x8 digits (no network), a fixed 75/25 split.
    PATH      a ``.npz`` with ``x_train, y_train, x_test, y_test``, or an image folder in
              torchvision's ImageFolder layout (needs torchvision): ``PATH/train`` and
              ``PATH/test`` (or ``val``) when present, else one folder split 80/20 with a fixed seed.

Every source ends as float32 ``x`` (``(N, L)`` signals or ``(N, C, H, W)`` images) and int64 labels
``0..K-1``, standardized with the training set's mean and standard deviation.

Text corpora (``--model gpt``; :func:`prepare_text`) end as two uint8 byte arrays, ``train`` and ``val``:
    stdlib    the running interpreter's standard-library sources: every ``*.py`` file under
              ``sysconfig.get_paths()["stdlib"]``, sorted by relative POSIX path, except those under a
              directory named in :data:`STDLIB_EXCLUDED_DIRS` (site-packages, test suites, IDLE, the
              generated codec tables of ``encodings/`` and the doc text of ``pydoc_data/``) and the
              build-specific ``_sysconfigdata*.py``; concatenated as raw bytes.
    PATH      a text file (its bytes), or a directory: its ``*.txt`` and ``*.py`` files, recursively,
              sorted by relative path (``__pycache__`` and hidden directories skipped), concatenated.
The last :data:`VAL_FRACTION` of the bytes is the validation split. The split arrays are cached in
:func:`cache_dir` under the corpus's sha256; the description (rule, file list, bytes, sha256) goes into
the report.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

KEYS = ("x_train", "y_train", "x_test", "y_test")


def cache_dir() -> Path:
    root = os.environ.get("CSER_HOOKS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cser_hooks")
    return Path(root)


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def mnist1d_arrays(num_samples: int | None = None) -> dict[str, np.ndarray]:
    """MNIST-1D with the package's default generation arguments (cached after the first call)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise SystemExit("--data mnist1d needs the mnist1d package: pip install 'mnist1d==0.0.2.post1' "
                         "(or pip install -e '.[bench]'); or use --data digits") from exc
    args = get_dataset_args()
    if num_samples is not None:
        args.num_samples = int(num_samples)
    key_src = {k: v for k, v in sorted(vars(args).items()) if k != "url"}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = cache_dir() / f"mnist1d-{key}.npz"
    if path.exists():
        try:
            with np.load(path) as z:
                return {k: z[k] for k in KEYS}
        except Exception:  # a truncated cache file: regenerate
            path.unlink(missing_ok=True)
    d = make_dataset(args)  # offline generation; get_dataset() would download
    arrays = {"x_train": d["x"], "y_train": d["y"], "x_test": d["x_test"], "y_test": d["y_test"]}
    try:
        _atomic_savez(path, arrays)
    except OSError:
        pass  # a read-only home is fine: we just regenerate next time
    return arrays


def digits_arrays() -> dict[str, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise SystemExit("--data digits needs scikit-learn: pip install scikit-learn") from exc
    d = load_digits()
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(d.target))
    cut = int(0.75 * len(perm))
    tr, te = perm[:cut], perm[cut:]
    return {"x_train": d.data[tr], "y_train": d.target[tr], "x_test": d.data[te], "y_test": d.target[te]}


def npz_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise SystemExit(f"--data {path}: cannot read it as .npz ({exc})") from exc
    with z:
        missing = [k for k in KEYS if k not in z.files]
        if missing:
            raise SystemExit(f"--data {path}: the .npz lacks {', '.join(missing)}; it needs the arrays "
                             f"{', '.join(KEYS)} (has {', '.join(z.files) or 'none'})")
        return {k: z[k] for k in KEYS}


def imagefolder_arrays(path: Path, size: int = 32) -> dict[str, np.ndarray]:
    try:
        import torchvision
        from torchvision import transforms
    except ImportError as exc:
        raise SystemExit(f"--data {path} is a directory: reading an ImageFolder needs torchvision "
                         f"(pip install torchvision matching your torch), or pass a .npz with "
                         f"{', '.join(KEYS)}") from exc
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])

    def load(root: Path):
        ds = torchvision.datasets.ImageFolder(str(root), transform=tf)
        xs = np.stack([np.asarray(ds[i][0]) for i in range(len(ds))])
        return xs, np.asarray(ds.targets), ds.classes

    test_dir = next((path / d for d in ("test", "val") if (path / d).is_dir()), None)
    if (path / "train").is_dir() and test_dir is not None:
        xtr, ytr, ctr = load(path / "train")
        xte, yte, cte = load(test_dir)
        if ctr != cte:
            raise SystemExit(f"--data {path}: train/ and {test_dir.name}/ have different class folders")
        return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}
    x, y, _ = load(path)
    perm = np.random.default_rng(0).permutation(len(y))
    cut = int(0.8 * len(perm))
    tr, te = perm[:cut], perm[cut:]
    return {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}


def check_and_standardize(arrays: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Validate shapes/labels, cast, and standardize with the training statistics."""
    xtr, ytr = np.asarray(arrays["x_train"]), np.asarray(arrays["y_train"]).reshape(-1)
    xte, yte = np.asarray(arrays["x_test"]), np.asarray(arrays["y_test"]).reshape(-1)
    if xtr.ndim < 2 or xtr.shape[1:] != xte.shape[1:]:
        raise SystemExit(f"--data {source}: x_train {xtr.shape} and x_test {xte.shape} must be "
                         f"(N, features...) with the same feature shape")
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise SystemExit(f"--data {source}: x/y lengths differ (train {len(xtr)} vs {len(ytr)}, "
                         f"test {len(xte)} vs {len(yte)})")
    if len(xtr) == 0 or len(xte) == 0:
        raise SystemExit(f"--data {source}: empty training or test set")
    if not (np.issubdtype(ytr.dtype, np.integer) and np.issubdtype(yte.dtype, np.integer)):
        raise SystemExit(f"--data {source}: labels must be integers 0..K-1, got {ytr.dtype}/{yte.dtype}")
    if min(ytr.min(), yte.min()) < 0:
        raise SystemExit(f"--data {source}: labels must be >= 0")
    xtr = xtr.astype(np.float32)
    xte = xte.astype(np.float32)
    if xtr.ndim == 3 and xtr.shape[1] > 8 and xtr.shape[2] <= 8:  # (N, L, C) signals -> (N, C, L)
        xtr, xte = xtr.transpose(0, 2, 1), xte.transpose(0, 2, 1)
    mu, sd = float(xtr.mean()), float(xtr.std()) or 1.0
    return {"x_train": np.ascontiguousarray((xtr - mu) / sd), "y_train": ytr.astype(np.int64),
            "x_test": np.ascontiguousarray((xte - mu) / sd), "y_test": yte.astype(np.int64)}


def load_source(spec: str) -> dict[str, np.ndarray]:
    if spec == "mnist1d":
        return mnist1d_arrays()
    if spec == "digits":
        return digits_arrays()
    path = Path(spec).expanduser()
    if path.is_dir():
        return imagefolder_arrays(path)
    if path.is_file():
        return npz_arrays(path)
    hint = " ('stdlib' is the text corpus of --model gpt)" if spec in TEXT_SOURCES else ""
    raise SystemExit(f"--data {spec!r}: not 'mnist1d', 'digits', an existing .npz file or an image folder{hint}")


def prepare(spec: str, out_dir: Path) -> Path:
    """Write the standardized arrays the workers load to ``out_dir/data.npz`` and return the path."""
    arrays = check_and_standardize(load_source(spec), spec)
    path = out_dir / "data.npz"
    _atomic_savez(path, arrays)
    return path


def describe(path: Path) -> dict[str, object]:
    """Sizes and shapes of a prepared data set (a text corpus: the description :func:`prepare_text` wrote)."""
    if path.name == "corpus.npz":
        return json.loads((path.parent / "corpus.json").read_text())
    with np.load(path) as z:
        return {"train": int(len(z["y_train"])), "test": int(len(z["y_test"])),
                "input_shape": list(z["x_train"].shape[1:]),
                "classes": int(max(z["y_train"].max(), z["y_test"].max()) + 1)}


# -- text corpora (--model gpt) --------------------------------------------------------------------

TEXT_SOURCES = ("stdlib",)
STDLIB_EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "idlelib",
                        "encodings", "pydoc_data")
TEXT_SUFFIXES = (".txt", ".py")
VAL_FRACTION = 0.05
STDLIB_RULE = (f"*.py under sysconfig stdlib, sorted by relative path, excluding directories "
               f"{', '.join(STDLIB_EXCLUDED_DIRS)} and _sysconfigdata*.py; last {VAL_FRACTION:.0%} of the "
               f"bytes for validation")


def _walk(root: Path, prune, keep) -> list[Path]:
    """Files under ``root`` that ``keep(path)``, not descending into directories that ``prune(name)``;
    sorted by relative POSIX path."""
    found = []
    for here, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not prune(d)]
        found += [Path(here) / n for n in names if keep(Path(here) / n)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def stdlib_files(root: Path | None = None) -> tuple[Path, list[Path]]:
    """``(root, files)``: the stdlib corpus's files in order (the rule of :data:`STDLIB_RULE`)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    keep = lambda p: p.suffix == ".py" and not p.name.startswith("_sysconfigdata") and p.is_file()  # noqa: E731
    return root, _walk(root, lambda d: d in STDLIB_EXCLUDED_DIRS, keep)


def text_dir_files(root: Path) -> list[Path]:
    """The ``*.txt``/``*.py`` files under ``root`` (recursively, sorted; ``__pycache__``, hidden dirs skipped)."""
    return _walk(root, lambda d: d == "__pycache__" or d.startswith("."),
                 lambda p: p.suffix in TEXT_SUFFIXES and p.is_file())


def _corpus_files(spec: str) -> tuple[Path, list[Path], str]:
    """``(root, files, rule)`` for ``--data spec`` with ``--model gpt``."""
    if spec == "stdlib":
        root, files = stdlib_files()
        return root, files, STDLIB_RULE
    path = Path(spec).expanduser()
    split = f"last {VAL_FRACTION:.0%} of the bytes for validation"
    if path.is_file():
        return path.parent, [path], f"the file {path.name}; {split}"
    if path.is_dir():
        return path, text_dir_files(path), (f"{', '.join('*' + s for s in TEXT_SUFFIXES)} under {path}, "
                                            f"sorted by relative path; {split}")
    raise SystemExit(f"--data {spec!r} with --model gpt: not 'stdlib', a text file or a directory of "
                     f"{'/'.join(TEXT_SUFFIXES)} files")


def split_corpus(corpus: np.ndarray, val_fraction: float = VAL_FRACTION) -> dict[str, np.ndarray]:
    """The fixed split: the first bytes train, the last ``val_fraction`` validate."""
    cut = len(corpus) - max(1, int(round(val_fraction * len(corpus))))
    return {"train": corpus[:cut], "val": corpus[cut:]}


def text_corpus(spec: str) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """``(arrays, info)``: the uint8 ``train``/``val`` split of a text corpus and its description.

    The split is cached under the corpus's sha256 (and the validation fraction)."""
    root, files, rule = _corpus_files(spec)
    if not files:
        raise SystemExit(f"--data {spec}: no {'/'.join(TEXT_SUFFIXES)} files found")
    blob = b"".join(p.read_bytes() for p in files)
    if not blob:
        raise SystemExit(f"--data {spec}: the corpus is empty")
    sha = hashlib.sha256(blob).hexdigest()
    path = cache_dir() / f"corpus-{sha[:16]}-val{VAL_FRACTION:g}.npz"
    arrays = None
    if path.exists():
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in ("train", "val")}
        except Exception:  # a truncated cache file: rebuild it
            path.unlink(missing_ok=True)
    if arrays is None or sum(len(a) for a in arrays.values()) != len(blob):
        arrays = split_corpus(np.frombuffer(blob, dtype=np.uint8))
        try:
            _atomic_savez(path, arrays)
        except OSError:
            pass  # a read-only home is fine
    info = {"kind": "text", "source": spec, "root": str(root), "rule": rule, "file_count": len(files),
            "files": [p.relative_to(root).as_posix() for p in files], "bytes": len(blob), "sha256": sha,
            "train": int(len(arrays["train"])), "test": int(len(arrays["val"])),
            "unigram_entropy_bits": unigram_entropy_bits(arrays["train"])}
    return arrays, info


def unigram_entropy_bits(data: np.ndarray) -> float:
    """Entropy in bits per byte of the byte histogram of ``data`` (what a context-free model can reach)."""
    p = np.bincount(data, minlength=256) / max(1, len(data))
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def prepare_text(spec: str, out_dir: Path) -> Path:
    """Write the corpus split to ``out_dir/corpus.npz`` (its description to ``corpus.json``); return the path."""
    arrays, info = text_corpus(spec)
    path = out_dir / "corpus.npz"
    _atomic_savez(path, arrays)
    (out_dir / "corpus.json").write_text(json.dumps(info))
    return path
