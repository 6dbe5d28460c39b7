"""KolektorSDD as an image-classification folder: ``OUT/good/`` and ``OUT/defective/`` (symlinks).

    python benchmarks/ksdd_as_classes.py --out /tmp/ksdd_cls
    defectscope train /tmp/ksdd_cls --out RUN -o train.val_fraction=0.25

Labels come from the data set's ``manifest.csv`` column ``defective`` (1 = the image's mask has a
defect polygon), for all 399 images of both manifest splits (the classification pipeline makes its
own stratified split). ``good`` is found as the OK class by name, so the run reports operating
points (escape / false-call rates), and temperature scaling with ECE before/after. Symlinks only:
no image is copied.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

KSDD = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "kolektorsdd"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder to create (must not exist or be empty)")
    ap.add_argument("--data", type=Path, default=KSDD, help="KolektorSDD root (images/, manifest.csv)")
    args = ap.parse_args()
    manifest = args.data / "manifest.csv"
    if not manifest.is_file():
        raise SystemExit(f"{manifest}: not found; pass --data KOLEKTORSDD_ROOT")
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out}: exists and is not empty; choose a new folder")
    counts = {"good": 0, "defective": 0}
    with manifest.open(newline="") as fh:
        for line, row in enumerate(csv.DictReader(fh), 2):
            if row.get("defective") not in ("0", "1"):
                raise SystemExit(f"{manifest}:{line}: column 'defective' is {row.get('defective')!r}, expected 0 or 1")
            cls = "defective" if row["defective"] == "1" else "good"
            src = (args.data / "images" / f"{row['id']}.jpg").resolve()
            if not src.is_file():
                raise SystemExit(f"{manifest}:{line}: image {src} not found")
            (args.out / cls).mkdir(parents=True, exist_ok=True)
            os.symlink(src, args.out / cls / src.name)
            counts[cls] += 1
    print(f"{args.out}: good {counts['good']}, defective {counts['defective']} (symlinks)")


if __name__ == "__main__":
    main()
