"""Split protocols: random train/validation/test indices, saved beside a model.

A split is a ``dict`` of name -> sorted ``int64`` index arrays (``train``, ``val``,
``test``). It is stored as an ``.npz`` file (read back with ``allow_pickle=False``), so
the exact molecules a model was trained on travel with it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..fileio import atomic_file
from .dataset import DataError

SPLIT_NAMES = ("train", "val", "test")


def _count(size: float | None, n: int, name: str) -> int | None:
    """An absolute count from an int or a fraction of ``n`` in (0, 1)."""
    if size is None:
        return None
    if isinstance(size, (bool, np.bool_)):
        raise DataError(f"split size {name}={size!r} must be a count or a fraction")
    if isinstance(size, (float, np.floating)) and float(size) == 1.0:
        raise DataError(
            f"split size {name}=1.0 is ambiguous: write 1 for one structure; a fraction of "
            f"the data set is below 1 (e.g. 0.8)"
        )
    if isinstance(size, (float, np.floating)) and not float(size).is_integer():
        if not 0.0 < size < 1.0:
            raise DataError(f"split size {name}={size} is a fraction outside (0, 1)")
        return round(size * n)
    count = int(size)
    if count < 0:
        raise DataError(f"split size {name}={count} is negative")
    return count


def random_split(
    n: int, n_train: float, n_val: float, n_test: float | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Disjoint random ``train``/``val``/``test`` indices of a dataset of ``n`` structures.

    Sizes are counts, or fractions of ``n`` when given as floats in (0, 1).
    ``n_test=None`` puts all remaining structures into ``test``. The same ``seed`` always
    gives the same split (NumPy's PCG64 generator).
    """
    n = int(n)
    if n <= 0:
        raise DataError(f"cannot split an empty dataset (n={n})")
    train, val = _count(n_train, n, "n_train"), _count(n_val, n, "n_val")
    test = _count(n_test, n, "n_test")
    given = test is not None
    if train + val + (test or 0) > n:
        parts = f"n_train={train} + n_val={val}" + (f" + n_test={test}" if given else "")
        room = n - val - (test or 0)
        hint = f"--n-train {room}, or " if room > 0 else ""
        raise DataError(
            f"split sizes {parts} = {train + val + (test or 0)} exceed the "
            f"dataset's {n} structures; choose smaller sizes (e.g. {hint}"
            f"fractions such as --n-train 0.8 --n-val 0.1)"
        )
    if test is None:
        test = n - train - val
    order = np.random.default_rng(seed).permutation(n)
    cuts = np.cumsum([train, val, test])
    parts = np.split(order[: cuts[-1]], cuts[:-1])
    return {name: np.sort(part).astype(np.int64) for name, part in zip(SPLIT_NAMES, parts)}


def check_split(split: dict[str, np.ndarray], n: int | None = None) -> None:
    """Raise :class:`DataError` for overlapping parts or indices outside ``[0, n)``."""
    seen = np.concatenate([np.asarray(v, dtype=np.int64).ravel() for v in split.values()])
    if len(np.unique(seen)) != len(seen):
        raise DataError("split parts overlap (an index appears twice)")
    if len(seen) and (seen.min() < 0 or (n is not None and seen.max() >= n)):
        raise DataError(f"split indices out of range for a dataset of {n} structures")


def save_split(path: str | os.PathLike, split: dict[str, np.ndarray]) -> Path:
    """Write ``split`` to ``path`` (``.npz``) atomically: temp file, then rename."""
    path = Path(path)
    check_split(split)
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **{k: np.asarray(v, dtype=np.int64) for k, v in split.items()})
    return path


def load_split(path: str | os.PathLike, n: int | None = None) -> dict[str, np.ndarray]:
    """Read a split written by :func:`save_split`; ``n`` checks the indices fit a dataset."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            split = {k: np.asarray(data[k]) for k in data.files}
    except FileNotFoundError:
        raise DataError(f"{path}: split file not found") from None
    except Exception as err:  # zipfile.BadZipFile, EOFError, ValueError, ...
        raise DataError(f"{path}: not a readable split file ({err})") from err
    for k, v in split.items():
        if v.ndim != 1 or not np.issubdtype(v.dtype, np.integer):
            raise DataError(f"{path}: split part {k!r} is not a 1-d integer array")
    check_split(split, n)
    return split
