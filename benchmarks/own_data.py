"""Small own-data folders: `defectscope train FOLDER` (no recipe), every candidate side by side.

    python benchmarks/own_data.py --out DIR [--proxies neu_grey ksdd weld_spread] [--nested weld_spread] [--seed 0]
    python benchmarks/own_data.py --out DIR --proxies neu_grey_split ksdd_split    # single splits
    python benchmarks/own_data.py --out DIR --proxies neu6 --per-class 4 8 16     # the older NEU 6-class table

Proxies (issue 25), none of them what the recipes were tuned on; folders are written under ``DIR``,
never into the repository:

- ``neu_grey``: NEU converted to single-channel grey PNG, 4 classes (rolled-in_scale, pitted_surface,
  inclusion, scratches), 10 images per class (the first of a seeded permutation);
- ``neu_grey_split``: the same grey NEU classes at ``--split-per-class`` (75) images per class: enough
  for a single split (a 20 % test part holds >= 10 per class), so the candidates are compared on the
  validation part and the chosen one is measured on the test part;
- ``ksdd``: KolektorSDD as ``good`` / ``defective`` class folders (as ``benchmarks/ksdd_as_classes.py``),
  15 images per class (seeded), symlinks;
- ``ksdd_split``: KolektorSDD as ``good`` / ``defective`` folders at 52 per class (every defective
  image): a single split, candidates compared on the validation part;
- ``weld_spread``: 24 weld runs from ``tests/weld_fixtures.py`` (12 batches of an ``ok`` and a
  ``porosity`` run) written as recordings and imported with ``defectscope signals import``; the photos,
  audio, gas and photodiode carry no class information, the defect is a doubled spread of the arc voltage;
- ``neu6``: class-per-folder NEU, 6 classes, ``--per-class`` images each (the pre-issue-25 table).

For each proxy ``defectscope train FOLDER --out RUN`` runs with the recipe it sizes (plus ``-o
train.precision=32`` on CPUs without native bf16), then ``predict RUN FOLDER`` and ``export RUN``. Printed:
folds, wall seconds, every candidate's pooled out-of-fold accuracy and mean +- std over folds, the chosen
one, and with ``--nested`` the nested (unbiased) figure. Writes ``DIR/own_data.json``.
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

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
NEU = SHARED / "neu-det" / "images"
KSDD = SHARED / "kolektorsdd"


def make_neu(out: Path, per_class: int, seed: int, classes: list[str] | None = None, grey: bool = False) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    classes = classes or sorted({p.stem.rsplit("_", 1)[0] for p in NEU.glob("*.jpg")})
    for c in classes:
        files = sorted(NEU.glob(f"{c}_*.jpg"))
        (out / c).mkdir(parents=True, exist_ok=True)
        for i in rng.permutation(len(files))[:per_class]:
            if grey:
                Image.open(files[i]).convert("L").save(out / c / f"{files[i].stem}.png")
            else:
                shutil.copy(files[i], out / c / files[i].name)
    return out


def make_ksdd(out: Path, per_class: int, seed: int) -> Path:
    import csv

    rows = list(csv.DictReader((KSDD / "manifest.csv").open()))
    rng = np.random.default_rng(seed)
    for cls, flag in (("good", "0"), ("defective", "1")):
        ids = sorted(r["id"] for r in rows if r["defective"] == flag)
        (out / cls).mkdir(parents=True, exist_ok=True)
        for i in rng.permutation(len(ids))[:per_class]:
            os.symlink((KSDD / "images" / f"{ids[i]}.jpg").resolve(), out / cls / f"{ids[i]}.jpg")
    return out


def make_weld(out: Path, seed: int) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from weld_fixtures import write_messy_recordings

    rec = write_messy_recordings(out / "recordings", n_runs=24, seed=seed, defect="spread", n_groups=12)
    _cli(["signals", "import", str(rec.spec_path), "--out", str(out / "welds")])
    return out / "welds"


def _cli(args: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "defectscope.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit(f"defectscope {' '.join(args[:3])} failed")
    return time.perf_counter() - t0, proc.stdout


def run_proxy(name: str, data: Path, run: Path, nested: bool, extra: list[str]) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    wall, _ = _cli(["train", str(data), "--out", str(run), *(["--nested"] if nested else []), *extra])
    _cli(["predict", str(run), str(data), "--out", str(run / "p.csv")])
    _cli(["export", str(run), "--out", str(run / "model.onnx")])
    if not (run / "crossval.json").is_file():  # a single split: candidates compared on the validation part
        m = json.loads((run / "metrics.json").read_text())
        row = {"proxy": name, "split": {k: m["split"][k] for k in ("train", "val", "test")}, "wall_s": round(wall, 1),
               "chosen": m.get("chosen", "model"), "delivered_test_acc": m["test"]["accuracy"],
               "delivered_test_weighted_f1": m["test"]["weighted_f1"],
               "candidates": {n: {"val_acc": c["val"]["accuracy"], "val_weighted_f1": c["val"]["weighted_f1"]}
                              for n, c in m.get("candidates", {}).items()},
               "predict_rows": len((run / "p.csv").read_text().splitlines()) - 1}
        print(json.dumps(row), flush=True)
        return row
    cv = json.loads((run / "crossval.json").read_text())
    row = {"proxy": name, "n": cv["n"], "folds": cv["k"], "group_by": cv["group_by"], "wall_s": round(wall, 1),
           "chosen": cv["chosen"], "delivered_pooled_acc": cv["pooled"]["accuracy"],
           "candidates": {n: {"pooled_acc": c["pooled"]["accuracy"], "acc_mean": c["mean"].get("accuracy"),
                              "acc_std": c["std"].get("accuracy")} for n, c in cv["candidates"].items()},
           "model": cv["model"]["what"], "predict_rows": len((run / "p.csv").read_text().splitlines()) - 1}
    if "nested" in cv:
        row["nested"] = {"pooled_acc": cv["nested"]["pooled"]["accuracy"], "acc_mean": cv["nested"]["mean"].get("accuracy"),
                         "acc_std": cv["nested"]["std"].get("accuracy"), "chosen_per_fold": cv["nested"]["chosen_per_fold"]}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--proxies", nargs="+", default=["neu_grey", "ksdd", "weld_spread"])
    ap.add_argument("--nested", nargs="*", default=[], help="proxies also run with --nested")
    ap.add_argument("--per-class", type=int, nargs="+", default=[4, 8, 16], help="neu6 only")
    ap.add_argument("--split-per-class", type=int, default=75, help="neu_grey_split only: images per class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--override", action="append", default=[], help="passed to every train")
    args = ap.parse_args()
    extra = [a for o in args.override for a in ("-o", o)]
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        extra += ["-o", "train.precision=32"]
    rows = []
    for p in args.proxies:
        if p == "neu6":
            for n in args.per_class:
                data = make_neu(args.out / f"neu6_{n}", n, args.seed)
                rows.append(run_proxy(f"neu6_{n}", data, args.out / f"run_neu6_{n}", p in args.nested, extra))
            continue
        data = {"neu_grey": lambda: make_neu(args.out / "neu_grey", 10, args.seed,
                                             ["rolled-in_scale", "pitted_surface", "inclusion", "scratches"], grey=True),
                "neu_grey_split": lambda: make_neu(args.out / "neu_grey_split", args.split_per_class, args.seed,
                                                   ["rolled-in_scale", "pitted_surface", "inclusion", "scratches"], grey=True),
                "ksdd": lambda: make_ksdd(args.out / "ksdd", 15, args.seed),
                "ksdd_split": lambda: make_ksdd(args.out / "ksdd_split", 52, args.seed),
                "weld_spread": lambda: make_weld(args.out / "weld_spread", args.seed)}[p]()
        rows.append(run_proxy(p, data, args.out / f"run_{p}", p in args.nested, extra))
    meta = {"seed": args.seed, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_average_1min": os.getloadavg()[0]}
    (args.out / "own_data.json").write_text(json.dumps({"rows": rows, **meta}, indent=2))
    print(meta)
    print("| proxy | n | folds | candidate | pooled accuracy | mean +- std over folds | chosen | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "split" in r:
            for n, c in r["candidates"].items():
                print(f"| {r['proxy']} | single split {r['split']} | validation accuracy {c['val_acc']:.3f} | {n} | "
                      + (f"**chosen**, test accuracy {r['delivered_test_acc']:.3f}" if n == r["chosen"] else "") + f" | {r['wall_s']} |")
            continue
        for n, c in r["candidates"].items():
            print(f"| {r['proxy']} | {r['n']} | {r['folds']} | {n} | {c['pooled_acc']:.3f} | "
                  f"{c['acc_mean']:.3f} +- {c['acc_std']:.3f} | {'**yes**' if n == r['chosen'] else ''} | {r['wall_s']} |")
        if "nested" in r:
            nn = r["nested"]
            print(f"| {r['proxy']} | {r['n']} | {r['folds']} | nested selection ({', '.join(nn['chosen_per_fold'])}) | "
                  f"{nn['pooled_acc']:.3f} | {nn['acc_mean']:.3f} +- {nn['acc_std']:.3f} | | |")


if __name__ == "__main__":
    main()
