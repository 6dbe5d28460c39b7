"""Classification metrics (scikit-learn): accuracy, per-class and averaged P/R/F1/AUROC, confusion matrix."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict:
    """All figures of a classification report.

    Args:
        y_true: true class indices ``[N]``.
        probs: predicted probabilities ``[N, K]`` (rows sum to 1); the prediction is the argmax.
        class_names: ``K`` names, in index order.

    Returns:
        dict with ``accuracy``, ``weighted_precision``, ``weighted_recall``,
        ``weighted_f1``, ``macro_precision``, ``macro_recall``, ``macro_f1``,
        ``macro_auroc`` and ``weighted_auroc`` (one-vs-rest; ``None`` if no class has
        both positives and negatives), ``per_class`` (name -> precision, recall, f1,
        auroc, support), ``confusion_matrix`` (rows true, columns predicted),
        ``class_names``, ``n``. A class absent from ``y_true`` has recall 0 by
        convention and AUROC ``None``; it is excluded from the AUROC averages.

    Raises:
        ValueError: shapes disagree.
    """
    y_true = np.asarray(y_true).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(class_names)
    if probs.ndim != 2 or probs.shape != (len(y_true), k):
        raise ValueError(f"probs: expected [{len(y_true)}, {k}], got {list(probs.shape)}")
    y_pred = probs.argmax(1)
    labels = np.arange(k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
        wp, wr, wf, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="weighted", zero_division=0)
        mp, mr, mf, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    aurocs: list[float | None] = []
    for c in range(k):
        pos = y_true == c
        if pos.all() or not pos.any():
            aurocs.append(None)
        else:
            aurocs.append(float(roc_auc_score(pos, probs[:, c])))
    valid = [(a, s[c]) for c, a in enumerate(aurocs) if a is not None]
    macro_auroc = float(np.mean([a for a, _ in valid])) if valid else None
    weighted_auroc = float(sum(a * n for a, n in valid) / sum(n for _, n in valid)) if valid else None
    return {
        "n": int(len(y_true)),
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else 0.0,
        "weighted_precision": float(wp),
        "weighted_recall": float(wr),
        "weighted_f1": float(wf),
        "macro_precision": float(mp),
        "macro_recall": float(mr),
        "macro_f1": float(mf),
        "macro_auroc": macro_auroc,
        "weighted_auroc": weighted_auroc,
        "per_class": {
            name: {"precision": float(p[c]), "recall": float(r[c]), "f1": float(f[c]), "auroc": aurocs[c], "support": int(s[c])}
            for c, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "class_names": list(class_names),
    }
