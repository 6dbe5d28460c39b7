"""Reproducible stratified splits, written into the run folder as file lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from defectscope.data.images import DatasetError
from defectscope.utils.io import write_text


def stratified_split(
    labels: list[int] | np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a stratified split (scikit-learn's ``train_test_split``).

    Args:
        labels: class index per item, length N.
        test_fraction: share of each class in the second part, in (0, 1).
        seed: random seed; the same labels and seed give the same split.

    Returns:
        ``(first_idx, second_idx)``, sorted int arrays partitioning ``range(N)``. The second part
        holds ``ceil(test_fraction * N)`` items, but at least one per class (small sets).

    Raises:
        DatasetError (a ValueError): a class has fewer than 2 items, or ``test_fraction`` is outside (0, 1).
    """
    labels = np.asarray(labels)
    if not 0 < test_fraction < 1:
        raise DatasetError(f"test_fraction must be in (0, 1), got {test_fraction}")
    counts = np.bincount(labels)
    if (counts[counts > 0] < 2).any():
        raise DatasetError(f"every class needs at least 2 items for a stratified split; counts: {counts.tolist()}")
    n_classes = int((counts > 0).sum())
    n_test = max(int(np.ceil(test_fraction * len(labels))), n_classes)
    if len(labels) - n_test < n_classes:
        raise DatasetError(f"{len(labels)} items are too few to keep every one of {n_classes} classes on both sides of the split")
    idx = np.arange(len(labels))
    a, b = train_test_split(idx, test_size=n_test, random_state=seed, stratify=labels)
    return np.sort(a), np.sort(b)


def write_file_list(path: Path, files: list[Path], labels: list[str] | None = None) -> None:
    """Write one ``file[,label]`` line per item (atomically)."""
    if labels is None:
        text = "".join(f"{f}\n" for f in files)
    else:
        text = "".join(f"{f},{c}\n" for f, c in zip(files, labels))
    write_text(path, text)
