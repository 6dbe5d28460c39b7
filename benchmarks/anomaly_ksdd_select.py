"""Choose between KolektorSDD anomaly runs on images the cross-validation never sees.

The 5-fold cross-validation of docs/anomaly.md runs on the manifest's ``train`` split (320 images). Its
``val`` split (79 images, 10 defective) is left out of it, so a choice between recipes made on the ``val``
images alone is not a choice made on the images the cross-validation reports. This script scores each
given run (a single-split ``defectscope train`` of a KolektorSDD recipe: fitted on good ``train`` images)
on the ``val`` images with the run's own predictor and prints their image AUROC, plus the AUROC on the whole
single-split test set (``val`` + the defective ``train`` images; overlaps the cross-validation) for reference.

    PYTHONPATH=src python benchmarks/anomaly_ksdd_select.py RUN_A RUN_B ... [--root ../shared/datasets/kolektorsdd]

Prints one table row per run: val image AUROC (10 defective / 69 good), its bootstrap standard error
(1000 resamples of the val images, seed 0), and the single-split test AUROC.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from defectscope.api import load
from defectscope.data.images import load_stack
from defectscope.data.kolektor import anomaly_protocol, read_kolektor_manifest


def bootstrap_se(y: np.ndarray, s: np.ndarray, n: int = 1000, seed: int = 0) -> float:
    """Standard error of the AUROC over ``n`` resamples of the images (with replacement, both classes kept)."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    vals = []
    for _ in range(n):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        vals.append(roc_auc_score(y[idx], s[idx]))
    return float(np.std(vals))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--root", default="../shared/datasets/kolektorsdd")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    print("cpu capability", torch.backends.cpu.get_cpu_capability(), "threads", torch.get_num_threads())
    items = anomaly_protocol(read_kolektor_manifest(a.root))["test"]
    is_val = np.array([it.split == "val" for it in items])
    y = np.array([int(it.defective) for it in items])
    print(f"val: {int(is_val.sum())} images ({int(y[is_val].sum())} defective); "
          f"single-split test: {len(items)} ({int(y.sum())} defective)")
    print("| run | val image AUROC | bootstrap s.e. | single-split test AUROC | s/image |")
    print("|---|---|---|---|---|")
    for run in a.runs:
        p = load(run, threads=a.threads)
        size = tuple(p.info.input_size)
        x = load_stack([it.image for it in items], size)
        t0 = time.perf_counter()
        s = np.concatenate([np.asarray(p.run({"image": x[i : i + 4].astype(np.float32) / np.float32(255.0)})["pred_score"],
                                       np.float64).reshape(-1) for i in range(0, len(x), 4)])
        dt = (time.perf_counter() - t0) / len(items)
        auc_val = roc_auc_score(y[is_val], s[is_val])
        print(f"| {run} | {auc_val:.3f} | {bootstrap_se(y[is_val], s[is_val]):.3f} | {roc_auc_score(y, s):.3f} | {dt:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
