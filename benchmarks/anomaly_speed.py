"""CPU seconds per image of each anomaly model's forward (the graph predict / serve / export run), at a given size.

    PYTHONPATH=src python benchmarks/anomaly_speed.py --size 1248 512 --threads 1 2 --bank-rows 4000
    PYTHONPATH=src python benchmarks/anomaly_speed.py --models configs/ksdd_ensemble3.yaml   # any recipe file

Each model is built with the recipe's settings (``configs/ksdd_<model>.yaml``'s ``model`` block), fitted on
``--fit`` KolektorSDD good images at ``--size`` (PatchCore: its bank grown to ``--bank-rows`` rows, the size
of the real runs' banks, since the search cost grows with it), then ``--images`` other images are scored one
at a time (batch 1) after one warm-up (the student-teacher's student trained for 5 steps only: its cost per
image does not depend on its weights; an ensemble as its recipe says, members fitted on the ``--fit`` images); the median wall time per image is printed with the thread count and
``torch.backends.cpu.get_cpu_capability()``. Grad-MobileNet's network is not trained here (its cost per image,
a forward and a backward pass, does not depend on the weights); its one-class SVM is fitted on its features.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import statistics
import time

import numpy as np
import torch
import yaml

from defectscope.data.images import load_stack
from defectscope.data.kolektor import anomaly_protocol, read_kolektor_manifest
from defectscope.models.anomaly import anomaly_model_class


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="../shared/datasets/kolektorsdd")
    ap.add_argument("--size", nargs=2, type=int, default=[1248, 512])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--models", nargs="+", default=["patchcore", "padim", "grad_mobilenet"])
    ap.add_argument("--fit", type=int, default=12)
    ap.add_argument("--images", type=int, default=5)
    ap.add_argument("--bank-rows", type=int, default=4000)
    a = ap.parse_args()
    items = read_kolektor_manifest(a.root)
    good = anomaly_protocol(items, 0.0, 0)["fit"]
    size = tuple(a.size)
    x = load_stack([it.image for it in good[: a.fit + a.images]], size)
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, size {size[0]} x {size[1]}")
    for spec in a.models:
        from_file = spec.endswith((".yaml", ".yml"))  # a recipe file: its model block
        if from_file:
            path = Path(spec)
        else:
            path = Path(f"configs/ksdd_{spec}.yaml")
            path = path if path.exists() else Path(f"configs/ksdd_{spec.replace('_', '')}.yaml")
        cfg = yaml.safe_load(path.read_text())["model"]
        name = str(cfg["name"])
        if name == "ensemble":  # a student-teacher member: 5 steps, as below
            cfg = {**cfg, "members": [{**m, "steps": 5} if m.get("name") == "student_teacher" else m
                                      for m in cfg["members"]]}
        args = anomaly_model_class(name).Args(**cfg).module_args()
        if name == "student_teacher":  # the cost per image does not depend on how long the student trained
            args.update(steps=5)
        if name == "patchcore":  # a bank of --bank-rows rows
            args.update(coreset_ratio=1.0, bank_mib=a.bank_rows * 4 * 2048 / 2**20,  # the cap never binds: rows = the pool
                        patches_per_image=a.bank_rows // a.fit + 1)
        model = anomaly_model_class(name)(**args)
        torch.set_num_threads(2)
        model.fit(x[: a.fit], x[: a.fit], batch_size=2, train=lambda net, xf: {})
        model.eval()
        for t in a.threads:
            torch.set_num_threads(t)
            times = []
            with torch.no_grad():
                for i in range(a.fit - 1, a.fit + a.images):  # the first one warms up
                    xb = torch.from_numpy(x[i : i + 1]).float() / 255
                    t0 = time.perf_counter()
                    model(xb)
                    times.append(time.perf_counter() - t0)
            print(f"  {path.stem if from_file else name:15s} {t} thread(s): {statistics.median(times[1:]):.2f} s per image "
                  f"(median of {len(times) - 1})", flush=True)


if __name__ == "__main__":
    main()
