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
"""
from __future__ import annotations

import hashlib
import json
import os
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
    raise SystemExit(f"--data {spec!r}: not 'mnist1d', 'digits', an existing .npz file or an image folder")


def prepare(spec: str, out_dir: Path) -> Path:
    """Write the standardized arrays the workers load to ``out_dir/data.npz`` and return the path."""
    arrays = check_and_standardize(load_source(spec), spec)
    path = out_dir / "data.npz"
    _atomic_savez(path, arrays)
    return path


def describe(path: Path) -> dict[str, object]:
    with np.load(path) as z:
        return {"train": int(len(z["y_train"])), "test": int(len(z["y_test"])),
                "input_shape": list(z["x_train"].shape[1:]),
                "classes": int(max(z["y_train"].max(), z["y_test"].max()) + 1)}
