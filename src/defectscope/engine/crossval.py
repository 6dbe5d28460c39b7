"""k-fold cross-validation folds and their summaries (used by :mod:`defectscope.engine.pipeline`).

Paper 000 (section 5.1) evaluates with 5-fold cross-validation; on small data sets a single
80/20 split leaves a handful of test images and its figure is noise. Folds are stratified on
the task's label; optional groups (views of one part, frames of one run) never span two folds.
"""

from __future__ import annotations

import math
import re

import numpy as np

from defectscope.config import ConfigError


def cv_folds(labels: np.ndarray, folds: int, groups: np.ndarray | None = None, seed: int = 0,
             class_names: list[str] | None = None, source: str = "the data") -> np.ndarray:
    """Fold index ``[N]`` (0 .. folds-1) of each sample for stratified k-fold cross-validation.

    The one place every task's folds are made, so the one place that checks they can be made.

    Args:
        labels: ``[N]`` int stratification label (class index, or defective 0/1).
        folds: number of folds K >= 2.
        groups: optional ``[N]`` group key; a group never spans two folds
            (scikit-learn ``StratifiedGroupKFold``); ``None``: ``StratifiedKFold`` sample by sample.
        seed: shuffling seed (same labels, groups and seed give the same folds).
        class_names: names of the label values (index = label), for the error message.
        source: the data set, for the error message (e.g. its folder).

    Raises:
        ConfigError (a ValueError): fewer than 2 folds; fewer samples of some class than folds (the
            message names the class, its count and the largest K that works); fewer groups than folds.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels = np.asarray(labels)
    if folds < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, got {folds}")
    values, inverse = np.unique(labels, return_inverse=True)
    counts = np.bincount(inverse.ravel())
    n_groups = len(np.unique(groups)) if groups is not None else None
    k_max = int(min(counts.min(), n_groups if n_groups is not None else counts.min()))
    advice = (f"the most this data allows is {k_max}: use --folds {k_max} (or eval.folds: {k_max})" if k_max >= 2 else
              "it is too small for cross-validation: add samples, or use --folds 1 (a single split)")
    if counts.min() < folds:
        def name(v) -> str:
            return repr(class_names[int(v)]) if class_names is not None and 0 <= int(v) < len(class_names) else f"label {v}"

        small = [(name(v), int(c)) for v, c in sorted(zip(values, counts), key=lambda vc: vc[1]) if c < folds]
        which = f"class {small[0][0]} has only {small[0][1]} sample{'s' if small[0][1] != 1 else ''}"
        if len(small) > 1:
            which += f" ({len(small) - 1} other class{'es' if len(small) > 2 else ''} also fewer than {folds})"
        every = ", ".join(f"{name(v)} {int(c)}" for v, c in zip(values, counts))
        raise ConfigError(f"{source}: {folds}-fold cross-validation (--folds / eval.folds) needs at least {folds} samples "
                          f"of every class, but {which}; counts: {every}; {advice}")
    if n_groups is not None and n_groups < folds:
        raise ConfigError(f"{source}: {folds}-fold cross-validation with groups (--group-by / eval.group_by) needs at "
                          f"least {folds} groups; found {n_groups}; {advice}")
    out = np.empty(len(labels), dtype=int)
    if groups is None:
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
        it = splitter.split(np.zeros(len(labels)), labels)
    else:
        groups = np.asarray(groups)
        splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
        it = splitter.split(np.zeros(len(labels)), labels, groups)
    for k, (_, te) in enumerate(it):
        out[te] = k
    return out


def validation_split(labels: np.ndarray, fraction: float, seed: int,
                     groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(train, val)`` of a stratified hold-out of about ``fraction`` of ``labels``.

    With ``groups``, whole groups go to one side (``StratifiedGroupKFold`` with
    ``round(1 / fraction)`` splits, first split). Classes with a single sample stay in train.

    Raises:
        ValueError: ``fraction`` outside (0, 1).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    from defectscope.data.splits import stratified_split

    labels = np.asarray(labels)
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    if groups is None:
        counts = np.bincount(np.unique(labels, return_inverse=True)[1].ravel())
        if counts.min() >= 2 and len(labels) - max(math.ceil(fraction * len(labels)), len(counts)) >= len(counts):
            return stratified_split(labels, fraction, seed)
        groups = np.arange(len(labels))
    n_splits = max(2, round(1 / fraction))
    n_splits = min(n_splits, len(np.unique(groups)))
    splitter = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)
    tr, va = next(splitter.split(np.zeros(len(labels)), labels, groups))
    return np.sort(tr), np.sort(va)


def groups_from(spec: str | None, ids: list[str], columns: dict[str, list] | None = None) -> np.ndarray | None:
    """Group key per sample from ``--group-by``: a column name of the task's metadata, or a regex on the id.

    A regex's first capture group (or whole match) is the group; a sample whose id does not
    match is its own group.

    Raises:
        ConfigError: the regex does not compile.
    """
    if not spec:
        return None
    if columns and spec in columns:
        return np.asarray([str(v) for v in columns[spec]])
    try:
        rx = re.compile(spec)
    except re.error as exc:
        raise ConfigError(f"--group-by {spec!r}: neither a metadata column ({', '.join(sorted(columns or {})) or 'none'}) "
                          f"nor a valid regular expression ({exc})") from None
    keys = []
    for i, s in enumerate(ids):
        m = rx.search(str(s))
        keys.append((m.group(1) if m.groups() else m.group(0)) if m else f"\0{i}")
    return np.asarray(keys)


def flatten_scalars(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Every int/float of a nested metrics dict, keyed by dotted path (``per_class.crazing.recall``)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)) and v is not None and math.isfinite(float(v)):
            out[key] = float(v)
        elif isinstance(v, dict):
            out.update(flatten_scalars(v, key + "."))
    return out


def mean_std(fold_metrics: list[dict]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and (population, ddof=0) standard deviation of every scalar present in all folds."""
    flat = [flatten_scalars(m) for m in fold_metrics]
    keys = [k for k in flat[0] if all(k in f for f in flat[1:])] if flat else []
    mean = {k: float(np.mean([f[k] for f in flat])) for k in keys}
    std = {k: float(np.std([f[k] for f in flat])) for k in keys}
    return mean, std
