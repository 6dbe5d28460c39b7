"""Cross-validate a segmentation recipe on its train split and compare image-level scoring choices.

Usage::

    python benchmarks/segmentation_cv.py configs/ksdd_unet_resnet18.yaml --out CVDIR [--folds 5] [-o key=value ...]
    python benchmarks/segmentation_cv.py configs/ksdd_unet_resnet18.yaml --out CVDIR --group-size 8   # parts kept whole
    python benchmarks/segmentation_cv.py --table CVDIR_A CVDIR_B ...   # print finished runs side by side

Stratified k-fold on the manifest's train split only (KolektorSDD: 320 images, 42 defective);
the val split, where the issue's goal is read, is never loaded. Each fold writes a run folder
``CVDIR/fold<k>``; the pooled out-of-fold results go to ``CVDIR/crossval.json``. Prints one table:
per (test-time flips, image score) the pooled image AP and AUROC, Dice over defective images and
pixel AUROC. Use it to choose a recipe, then train that recipe once and read its val figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from defectscope.config import load_raw, validate
from defectscope.engine.segmentation import SegmentationRecipe, cross_validate


def print_table(results: dict[str, dict]) -> None:
    """One row per (cv folder, tta, image score) with the pooled out-of-fold figures."""
    table = Table(title="Out-of-fold figures on the train split (pooled over folds)")
    for col in ("run", "flips", "image score", "image AP", "image AUROC", "Dice (defective)", "pixel AUROC"):
        table.add_column(col, justify="right")
    for name, res in results.items():
        for r in res["rows"]:
            table.add_row(name, "yes" if r["tta"] else "no", r["image_score"], f"{r['image_ap']:.4f}",
                          f"{r['image_auroc']:.4f}", f"{r['dice_defective']:.4f}", f"{r['pixel_auroc']:.4f}")
    Console(width=120).print(table)
    for name, res in results.items():
        groups = f", blocks of {res['group_size']}" if res.get("group_size") else ""
        print(f"{name}: {res['folds']} folds{groups}, {res['n']} images ({res['n_defective']} defective)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path, nargs="?")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--group-size", type=int, default=0,
                    help="keep blocks of this many consecutive manifest rows in one fold (KolektorSDD: 8 views per part)")
    ap.add_argument("-o", "--override", action="append", default=[])
    ap.add_argument("--table", type=Path, nargs="+", help="print finished cross-validation folders instead")
    args = ap.parse_args()
    if args.table:
        print_table({p.name: json.loads((p / "crossval.json").read_text()) for p in args.table})
        return
    if args.recipe is None or args.out is None:
        ap.error("RECIPE and --out are needed (or --table)")
    recipe = validate(load_raw(args.recipe, args.override), SegmentationRecipe, str(args.recipe))
    print_table({args.out.name: cross_validate(recipe, args.out, args.folds, args.group_size)})


if __name__ == "__main__":
    main()
