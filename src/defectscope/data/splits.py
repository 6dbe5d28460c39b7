"""Reproducible stratified splits, written into the run folder as file lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from defectscope.data.images import DatasetError
from defectscope.utils.io import write_text


def stratified_split(
    labels: list[int] | np.ndarray, test_fraction: float, seed: int, class_names: list[str] | None = None,
    source: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a stratified split (scikit-learn's ``train_test_split``).

    Args:
        labels: class index per item, length N.
        test_fraction: share of each class in the second part, in (0, 1).
        seed: random seed; the same labels and seed give the same split.
        class_names: names of the class indices, for the error message (``None``: indices).
        source: the data set (e.g. its folder), for the error message.

    Returns:
        ``(first_idx, second_idx)``, sorted int arrays partitioning ``range(N)``. The second part
        holds ``ceil(test_fraction * N)`` items, but at least one per class (small sets).

    Raises:
        DatasetError (a ValueError): a class has fewer than 2 items (each such class named with its
            count), or ``test_fraction`` is outside (0, 1).
    """
    labels = np.asarray(labels)
    if not 0 < test_fraction < 1:
        raise DatasetError(f"test_fraction must be in (0, 1), got {test_fraction}")
    counts = np.bincount(labels)

    def name(i: int) -> str:
        return repr(class_names[i]) if class_names is not None and i < len(class_names) else str(i)

    lonely = [i for i, c in enumerate(counts) if c == 1]
    if lonely:
        which = ", ".join(f"class {name(i)}" for i in lonely)
        every = ", ".join(f"{name(i)} {int(c)}" for i, c in enumerate(counts) if c > 0)
        raise DatasetError(f"{source + ': ' if source else ''}{which} {'has' if len(lonely) == 1 else 'have'} a single "
                           f"item; every class needs at least 2 items for a stratified split (one to train on, one to "
                           f"test); counts: {every}. Add items to {'it' if len(lonely) == 1 else 'them'} or remove "
                           f"{'that class' if len(lonely) == 1 else 'those classes'}")
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
