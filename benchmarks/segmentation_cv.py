"""Cross-validate a segmentation recipe on its train split and compare image-level scoring choices.

Usage::

    python benchmarks/segmentation_cv.py configs/ksdd_unet_resnet18.yaml --out CVDIR [--folds 5] [-o key=value ...]
    python benchmarks/segmentation_cv.py configs/ksdd_unet_resnet18.yaml --out CVDIR --group-by block8   # parts kept whole
    python benchmarks/segmentation_cv.py --table CVDIR_A CVDIR_B ...   # print finished runs side by side

The folds are the pipeline's (``defectscope train RECIPE --out CVDIR --folds K [--group-by X]``):
stratified k-fold on the manifest's train split only (KolektorSDD: 320 images, 42 defective); the
val split, where the issue's goal is read, is never decoded. Each fold is a run folder
``CVDIR/folds/<k>``; the pipeline writes ``CVDIR/crossval.json`` (per-fold, mean +- std and pooled
figures of the recipe's own rule) and ``CVDIR/oof_predictions.csv``. This script then reads every
fold's model once more on its own out-of-fold images, with and without test-time flips, pools the
probabilities and scores them with each image-score rule; the table goes to
``CVDIR/score_rules.json`` and is printed: per (flips, image score) the pooled image AP and AUROC,
Dice over defective images and pixel AUROC. Use it to choose a recipe, then train that recipe once
and read its val figures.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from defectscope.config import load_raw, validate
from defectscope.engine.pipeline import train
from defectscope.engine.run import RunFolder
from defectscope.engine.segmentation import SegmentationRecipe, SegmentationTask
from defectscope.models.unet.inference import UNetInference, predict_unet
from defectscope.evaluation.segmentation import IMAGE_SCORE_METHODS, segmentation_metrics
from defectscope.utils.io import write_json


def score_rules(recipe: SegmentationRecipe, cv_dir: Path) -> dict:
    """Pooled out-of-fold figures of every (test-time flips, image-score rule) of a finished CV folder.

    Reads ``cv_dir/oof_predictions.csv`` (which image is in which fold) and each fold's
    ``model.ckpt``; every image is predicted only by the fold model that never trained on it.

    Returns:
        ``{"folds", "group_by", "n", "n_defective", "rows", "per_image"}``: ``rows`` holds, per
        (``tta``, ``image_score``), pooled ``image_ap``, ``image_auroc``, ``dice_defective``,
        ``pixel_auroc``; ``per_image`` the file, label and fold of every image and its score per row.

    Raises:
        RunError: a fold's model is missing; KeyError: an out-of-fold file is not a sample of ``recipe``.
    """
    cv_dir = Path(cv_dir)
    crossval = json.loads((cv_dir / "crossval.json").read_text())
    rows_csv = list(csv.DictReader((cv_dir / "oof_predictions.csv").open(newline="")))
    samples = SegmentationTask().load_samples(recipe)
    pos = {f: i for i, f in enumerate(samples.ids)}
    probs: dict[bool, list] = {False: [], True: []}
    order, fold_of = [], []
    for k in sorted({int(r["fold"]) for r in rows_csv}):
        idx = np.array([pos[r["file"]] for r in rows_csv if int(r["fold"]) == k])
        model, _ = RunFolder(cv_dir / "folds" / str(k)).load_model()
        x, _ = samples.data.get(idx)
        for tta in (False, True):
            probs[tta].append(predict_unet(UNetInference(model, tta, "max", tuple(x.shape[2:])), x)[0])
        order += idx.tolist()
        fold_of += [k] * len(idx)
    _, y = samples.data.get(order)
    rows, per_image = [], {"file": [samples.ids[i] for i in order],
                           "defective": [bool(samples.labels[i]) for i in order], "fold": fold_of}
    for tta in (False, True):
        pooled = np.concatenate(probs[tta])
        for method in IMAGE_SCORE_METHODS:
            met = segmentation_metrics(pooled, y, recipe.model.threshold, seed=recipe.seed, score_method=method)
            rows.append({"tta": tta, "image_score": method,
                         **{k: met[k] for k in ("image_ap", "image_auroc", "dice_defective", "pixel_auroc")}})
            per_image[f"{method}{'+tta' if tta else ''}"] = met["image_scores"]
    labels = np.array(per_image["defective"])
    return {"folds": crossval["k"], "group_by": crossval.get("group_by"), "n": len(order),
            "n_defective": int(labels.sum()), "rows": rows, "per_image": per_image}


def print_table(results: dict[str, dict]) -> None:
    """One row per (cv folder, tta, image score) with the pooled out-of-fold figures."""
    table = Table(title="Out-of-fold figures on the train split (pooled over folds)")
    for col in ("run", "flips", "image score", "image AP", "image AUROC", "Dice (defective)", "pixel AUROC"):
        table.add_column(col, justify="right")

    def fmt(v):
        return "-" if v is None else f"{v:.4f}"

    for name, res in results.items():
        for r in res["rows"]:
            table.add_row(name, "yes" if r["tta"] else "no", r["image_score"], fmt(r["image_ap"]),
                          fmt(r["image_auroc"]), fmt(r["dice_defective"]), fmt(r["pixel_auroc"]))
    Console(width=120).print(table)
    for name, res in results.items():
        groups = f", grouped by {res['group_by']}" if res.get("group_by") else ""
        print(f"{name}: {res['folds']} folds{groups}, {res['n']} images ({res['n_defective']} defective)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path, nargs="?")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--group-by", default=None,
                    help="manifest column or regex whose matches share a fold; block8: blocks of 8 consecutive "
                         "manifest rows (KolektorSDD: 8 views per part)")
    ap.add_argument("--group-size", type=int, default=0, help="old spelling: --group-size 8 is --group-by block8")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing CVDIR")
    ap.add_argument("-o", "--override", action="append", default=[])
    ap.add_argument("--table", type=Path, nargs="+", help="print finished cross-validation folders instead")
    args = ap.parse_args()
    if args.table:
        print_table({p.name: json.loads((p / "score_rules.json").read_text()) for p in args.table})
        return
    if args.recipe is None or args.out is None:
        ap.error("RECIPE and --out are needed (or --table)")
    group_by = args.group_by
    if args.group_size:
        if args.group_size != 8 or group_by:
            ap.error("--group-size: only 8 is kept (as --group-by block8); use --group-by with a column or regex")
        group_by = "block8"
    recipe = validate(load_raw(args.recipe, args.override), SegmentationRecipe, str(args.recipe))
    train(recipe, args.out, folds=args.folds, group_by=group_by, overwrite=args.overwrite)
    res = score_rules(recipe, args.out)
    write_json(args.out / "score_rules.json", res)
    print_table({args.out.name: res})


if __name__ == "__main__":
    main()
