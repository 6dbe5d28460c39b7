"""NEU-DET as anomaly data: one class held as "normal", the other five as defects, in the MVTec AD layout.

    python benchmarks/neu_as_anomaly.py --normal crazing --out /tmp/neu_anomaly
    defectscope train /tmp/neu_anomaly --out RUN                    # PatchCore (the autorecipe)
    defectscope train /tmp/neu_anomaly --out RUN2 -o model.name=padim

``OUT/train/good/``: ``--train`` images of the normal class (seeded draw); ``OUT/test/good/``: the rest of
that class; ``OUT/test/<class>/``: ``--per-class`` images of each other class. No ``ground_truth/``
(NEU has boxes, not masks): image figures only. Symlinks only: no image is copied.
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

NEU = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "neu-det" / "images"
CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder to create (must not exist or be empty)")
    ap.add_argument("--data", type=Path, default=NEU, help="NEU-DET images/ folder (<class>_<n>.jpg)")
    ap.add_argument("--normal", default="crazing", choices=CLASSES)
    ap.add_argument("--train", type=int, default=240, help="normal images to fit on")
    ap.add_argument("--per-class", type=int, default=30, help="test images of each defect class")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.out.exists() and any(a.out.iterdir()):
        raise SystemExit(f"{a.out}: exists and is not empty; choose a new folder")
    rng = random.Random(a.seed)
    counts = {}
    for cls in CLASSES:
        files = sorted(p for p in a.data.glob(f"{cls}_*.jpg"))
        if not files:
            raise SystemExit(f"{a.data}: no {cls}_*.jpg images")
        rng.shuffle(files)
        parts = ({"train/good": files[: a.train], "test/good": files[a.train :]} if cls == a.normal
                 else {f"test/{cls}": files[: a.per_class]})
        for sub, chosen in parts.items():
            (a.out / sub).mkdir(parents=True, exist_ok=True)
            for f in chosen:
                os.symlink(f.resolve(), a.out / sub / f.name)
            counts[sub] = len(chosen)
    print(f"{a.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + " (symlinks)")


if __name__ == "__main__":
    main()
