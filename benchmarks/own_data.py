"""Small own-data folders: `defectscope train FOLDER` (no recipe) against its linear-probe reference.

    python benchmarks/own_data.py --out DIR [--per-class 4 8 16] [--seed 0]

For each size, a class-per-folder set of N real NEU images per class (6 classes; the first N of a
seeded permutation of each class, copied) is trained with the recipe ``train`` sizes to it (k-fold
cross-validation when a split would hold fewer than 10 test images of a class). Printed per size:
folds, wall seconds of the whole command, pooled out-of-fold accuracy and mean +- std over folds of
the fine-tuned model and of the linear probe (logistic regression on the frozen EfficientNet-Lite0
ImageNet features, same folds). Writes ``DIR/own_data.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

NEU = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "neu-det" / "images"


def make_folder(out: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    classes = sorted({p.stem.rsplit("_", 1)[0] for p in NEU.glob("*.jpg")})
    for c in classes:
        files = sorted(NEU.glob(f"{c}_*.jpg"))
        (out / c).mkdir(parents=True, exist_ok=True)
        for i in rng.permutation(len(files))[:per_class]:
            shutil.copy(files[i], out / c / files[i].name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--per-class", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = []
    for n in args.per_class:
        data = make_folder(args.out / f"neu_{n}", n, args.seed)
        run = args.out / f"run_{n}"
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "defectscope.cli", "train", str(data), "--out", str(run)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            raise SystemExit(f"train failed for {n} per class")
        cv_path = run / "crossval.json"
        if cv_path.is_file():
            cv = json.loads(cv_path.read_text())
            row = {"per_class": n, "images": 6 * n, "folds": cv["k"], "wall_s": round(wall, 1),
                   "model_pooled_acc": cv["pooled"]["accuracy"],
                   "model_acc_mean": cv["mean"]["accuracy"], "model_acc_std": cv["std"]["accuracy"],
                   "probe_pooled_acc": cv["pooled"]["reference"]["linear_probe"]["accuracy"],
                   "probe_acc_mean": cv["mean"]["reference.linear_probe.accuracy"],
                   "probe_acc_std": cv["std"]["reference.linear_probe.accuracy"]}
        else:
            m = json.loads((run / "metrics.json").read_text())
            row = {"per_class": n, "images": 6 * n, "folds": 1, "wall_s": round(wall, 1),
                   "model_pooled_acc": m["test"]["accuracy"], "model_acc_mean": m["test"]["accuracy"], "model_acc_std": 0.0,
                   "probe_pooled_acc": m["test"]["reference"]["linear_probe"]["accuracy"],
                   "probe_acc_mean": m["test"]["reference"]["linear_probe"]["accuracy"], "probe_acc_std": 0.0}
        rows.append(row)
        print(row, flush=True)
    (args.out / "own_data.json").write_text(json.dumps({"rows": rows, "seed": args.seed,
                                                         "load_average_1min": os.getloadavg()[0]}, indent=2))
    print("| images per class | images | folds | wall s | model pooled acc | model mean +- std | probe pooled acc | probe mean +- std |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['per_class']} | {r['images']} | {r['folds']} | {r['wall_s']} | {r['model_pooled_acc']:.3f} | "
              f"{r['model_acc_mean']:.3f} +- {r['model_acc_std']:.3f} | {r['probe_pooled_acc']:.3f} | "
              f"{r['probe_acc_mean']:.3f} +- {r['probe_acc_std']:.3f} |")


if __name__ == "__main__":
    main()
