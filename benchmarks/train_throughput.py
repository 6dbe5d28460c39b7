"""Training throughput: our Lightning trainer against a bare PyTorch loop, same model and data.

    python benchmarks/train_throughput.py --json OUT.json [--images-per-class 32] [--epochs 3]

For each model (the plain ``classifier`` and the ``multiscale`` classifier, EfficientNet-Lite0 with
its ImageNet weights, 200 px, batch 16, AdamW, channels_last, the precision ``--precision`` resolves
to on this CPU (``auto``: bf16 autocast only where bf16 is native, :mod:`defectscope.machine`), random
flips, focal loss) both runners train on the same real NEU images in this one process, one after the other:

- **bare**: a hand-written loop (``for x, y in loader: loss.backward(); opt.step()``);
- **ours**: :class:`ImageClassifierModule` fitted by :func:`defectscope.engine.trainer.fit_lightning`
  (the trainer every task uses: loggers, checkpointing, schedule, progress line).

Printed: ms per training image in the first epoch and in the steady state (mean of the later
epochs), the first-epoch overhead in seconds (first epoch minus a steady epoch) and the ratio
ours / bare of the steady state. ``OUT.json`` holds ``{"rows": [...], "ratio_ours_vs_bare": worst
ratio, "first_epoch_overhead_s": worst overhead of ours}``. Validation is off in both runners, so
only training is compared. Figures depend on machine load: compare rows of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from defectscope.config import ClassifierTrainConfig  # noqa: E402
from defectscope.data.images import discover_labelled_images, load_stack  # noqa: E402
from defectscope.engine.classification import image_loader  # noqa: E402
from defectscope.engine.trainer import fit_lightning  # noqa: E402
from defectscope.machine import autocast, environment, resolve_precision, resolve_threads  # noqa: E402
from defectscope.models import create_model  # noqa: E402
from defectscope.models.classifier.lightning_model import ImageClassifierModule  # noqa: E402
from defectscope.models.training import build_loss, random_flips, to_model_input, warmup_cosine  # noqa: E402

NEU = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "neu-det"


class EpochTimes(L.Callback):
    """Wall time of every training epoch, seconds."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.times.append(time.perf_counter() - self._t0)


def load_data(images_per_class: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    items, names, _ = discover_labelled_images(NEU, "auto")
    labels = np.array([it.label for it in items])
    keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:images_per_class] for c in range(len(names))]))
    return load_stack([items[i].path for i in keep], size), labels[keep]


def make_model(name: str, size: int) -> torch.nn.Module:
    kw = {"backbone": "efficientnet_lite0", "num_classes": 6, "image_size": size, "dropout": 0.1, "pretrained": True}
    if name == "multiscale":
        kw.update(low_res=128, embed_dim=256, num_heads=8, num_layers=1)
    return create_model(name, **kw)


def bare_loop(name: str, x: np.ndarray, y: np.ndarray, epochs: int, batch: int, seed: int,
              precision: str = "auto") -> list[float]:
    torch.manual_seed(seed)
    model = make_model(name, x.shape[-1]).to(memory_format=torch.channels_last).train()
    loss_fn = build_loss("focal", 2.0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-2)
    loader = image_loader(x, y, batch, True)
    sched = warmup_cosine(opt, epochs * len(loader))
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        for xb, yb in loader:
            xb = random_flips(to_model_input(xb, True))
            with autocast(precision):
                loss = loss_fn(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        times.append(time.perf_counter() - t0)
    return times


def ours(name: str, x: np.ndarray, y: np.ndarray, epochs: int, batch: int, seed: int,
         precision: str = "auto") -> list[float]:
    L.seed_everything(seed, verbose=False)
    cfg = ClassifierTrainConfig(epochs=epochs, batch_size=batch, lr=5e-4, precision=precision, channels_last=True,
                                val_fraction=0.0, early_stopping_patience=0, progress=False,
                                num_threads=torch.get_num_threads())
    module = ImageClassifierModule(make_model(name, x.shape[-1]), 6, cfg.lr, cfg.weight_decay, "focal", 2.0)
    timer = EpochTimes()
    import defectscope.engine.trainer as tr

    original = tr.build_trainer

    def with_timer(*a, **k):
        trainer = original(*a, **k)
        trainer.callbacks.append(timer)
        return trainer

    tr.build_trainer = with_timer
    try:
        with tempfile.TemporaryDirectory() as d:
            fit_lightning(module, image_loader(x, y, batch, True), None, cfg, Path(d), None)
    finally:
        tr.build_trainer = original
    return timer.times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--images-per-class", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=200)
    ap.add_argument("--threads", default="auto", help="torch threads (default: the CPUs this process may use)")
    ap.add_argument("--precision", default="auto", help="auto (this CPU decides), 32 or bf16-mixed")
    ap.add_argument("--models", default="classifier,multiscale")
    args = ap.parse_args()
    torch.set_num_threads(resolve_threads(args.threads))
    prec = resolve_precision(args.precision)
    env = environment(prec)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}; precision {prec.value} ({prec.reason}); "
          f"{torch.get_num_threads()} threads", flush=True)
    x, y = load_data(args.images_per_class, args.size)
    n_steps = len(image_loader(x, y, args.batch, True))
    n_img = n_steps * args.batch if len(y) >= 4 * args.batch else len(y)
    rows = []
    for name in args.models.split(","):
        for runner, fn in (("bare", bare_loop), ("ours", ours)):
            times = fn(name, x, y, args.epochs, args.batch, 0, args.precision)
            steady = float(np.mean(times[1:])) if len(times) > 1 else times[0]
            rows.append({"model": name, "runner": runner, "images": n_img, "epochs": len(times),
                         "first_epoch_ms_per_image": round(1000 * times[0] / n_img, 1),
                         "steady_ms_per_image": round(1000 * steady / n_img, 1),
                         "first_epoch_overhead_s": round(times[0] - steady, 1)})
            print(rows[-1], flush=True)
    for r in rows:
        bare = next(b for b in rows if b["model"] == r["model"] and b["runner"] == "bare")
        r["ratio_ours_vs_bare"] = round(r["steady_ms_per_image"] / bare["steady_ms_per_image"], 3)
    out = {"rows": rows, "threads": torch.get_num_threads(), "environment": env, "size": args.size, "batch": args.batch,
           "load_average_1min": os.getloadavg()[0],
           "ratio_ours_vs_bare": max(r["ratio_ours_vs_bare"] for r in rows if r["runner"] == "ours"),
           "first_epoch_overhead_s": max(r["first_epoch_overhead_s"] for r in rows if r["runner"] == "ours")}
    args.json.write_text(json.dumps(out, indent=2))
    cols = ["model", "runner", "images", "first_epoch_ms_per_image", "steady_ms_per_image", "first_epoch_overhead_s",
            "ratio_ours_vs_bare"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    print(f"worst ratio ours/bare {out['ratio_ours_vs_bare']}, worst first-epoch overhead (ours) "
          f"{out['first_epoch_overhead_s']} s, load average {out['load_average_1min']:.1f}")


if __name__ == "__main__":
    main()
