"""Choose a trained FCOS run's NMS IoU threshold on its validation split, then read the test split at it.

Usage::

    python benchmarks/detection_nms.py RUN [--thresholds 0.4 0.5 0.6 0.7]

RUN is a ``defectscope train configs/neudet_fcos.yaml`` run folder (or one fold folder
``RUN/folds/<k>`` of a ``--folds K`` run). Its parts are the files listed in ``RUN/split/``, read
from the data root of the run's ``config.yaml``. Prints one table: COCO mAP@0.5 and
mAP@[.5:.95] of the validation and test images for each threshold; the threshold is chosen on
validation mAP@0.5 only (the test columns are read, not used). Writes nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from defectscope.engine.detection import box_splits_from_run, choose_on_validation, nms_sweep
from defectscope.engine.run import RunError, RunFolder
from defectscope.recipes.detection import DetectionRecipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7])
    args = ap.parse_args()
    cfg_file = args.run / "config.yaml"
    if not cfg_file.is_file():
        raise RunError(f"{cfg_file}: missing; RUN must be a detection run folder")
    recipe = DetectionRecipe(**RunFolder(args.run).read_config())
    model, payload = RunFolder(args.run).load_model()  # the one loader of a run folder
    splits = box_splits_from_run(args.run, payload.get("class_names"))
    rows = nms_sweep(model, splits, args.thresholds, recipe.model.score_threshold)
    best = choose_on_validation(rows)
    table = Table(title=f"NMS IoU threshold of {args.run} (chosen on validation mAP@0.5)")
    for col in ("NMS IoU", "val mAP@0.5", "val mAP", "test mAP@0.5", "test mAP", ""):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r['nms_threshold']:.2f}", f"{r['val_map_50']:.4f}", f"{r['val_map']:.4f}",
                      f"{r['test_map_50']:.4f}", f"{r['test_map']:.4f}", "chosen" if r is best else "")
    Console().print(table)
    print(f"validation split: {len(splits.records['val'])} images; test split: {len(splits.records['test'])} images; "
          f"trained with NMS IoU {payload['model_kwargs'].get('nms_thresh', 0.6)}")


if __name__ == "__main__":
    main()
