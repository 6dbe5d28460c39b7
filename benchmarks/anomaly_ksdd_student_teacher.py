"""One-split study of the student-teacher model (exploration only, not the reported protocol).

Fit (train the student) on the good images of the manifest's train split (278), the map quantiles on the first
40 of them, score the protocol's 121 test images (every val image + the defective train images, 52 defective);
image AUROC with the image score = the largest map cell, without (b0) and inside a border of 2 cells (b2).
Each argument after the size is one setting, ``key=value`` pairs joined by commas (``checks`` = the number of
steps; ``layers`` as ``2+4``):

    PYTHONPATH=src python benchmarks/anomaly_ksdd_student_teacher.py 384x160 "checks=150,score_border=0" \
        "checks=150,hard_quantile=0.0,score_border=0" "checks=150,layers=2,score_border=0"
"""
import sys, time
import numpy as np, torch
from sklearn.metrics import roc_auc_score
from defectscope.data.images import load_stack
from defectscope.data.kolektor import anomaly_protocol, read_kolektor_manifest
from defectscope.models.anomaly import anomaly_model_class, inner_max

print("cpu capability", torch.backends.cpu.get_cpu_capability(), "threads", torch.get_num_threads(), flush=True)
items = read_kolektor_manifest("../shared/datasets/kolektorsdd")
parts = anomaly_protocol(items, 0.0, 0)
size = tuple(int(v) for v in sys.argv[1].split("x"))
xf = load_stack([it.image for it in parts["fit"]], size)
xt = load_stack([it.image for it in parts["test"]], size)
y = np.array([int(it.defective) for it in parts["test"]])
for spec in sys.argv[2:]:
    kw = dict(kv.split("=") for kv in spec.split(","))
    checks = [int(v) for v in kw.pop("checks").split("/")]
    kw = {k: ([int(c) for c in v.split("+")] if k == "layers" else float(v) if "." in v or "e" in v else int(v)) for k, v in kw.items()}
    for c in checks:
        m = anomaly_model_class("student_teacher")(steps=c, **kw)
        t0 = time.perf_counter()
        m.fit(xf, xf[:40], batch_size=8)
        with torch.no_grad():
            d = torch.cat([m._distance(torch.from_numpy(xt[i:i+8]).float() / 255) for i in range(0, len(xt), 8)])
        res = {b: roc_auc_score(y, inner_max(d, b).numpy()) for b in (0, 2)}
        print(f"RESULT {size} {spec} steps {c}: image AUROC b0 {res[0]:.3f} b2 {res[2]:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
