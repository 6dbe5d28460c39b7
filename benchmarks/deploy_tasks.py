"""Latency and throughput of every deployable task at its recipe's deployment size, on this CPU.

Usage::

    python benchmarks/deploy_tasks.py [--threads 2] [--images 16] [--tasks segmentation detection ...]
                                      [--out /tmp/deploy_tasks]

For each task a run folder is written with the architecture and input size of its recipe
(``configs/ksdd_unet_resnet18.yaml``: U-Net ResNet18 at 512 x 192; ``configs/neudet_fcos.yaml``:
FCOS at 256 px; ``configs/neudet_cnn_hungarian.yaml``: 9 attention slots at 200 px;
``configs/ksdd_patchcore.yaml``'s PatchCore (EfficientNet-Lite0 stages 2 + 4) at 384 x 160 with
a 2200-row memory bank, about 1 % of the KolektorSDD fitting patches; ``configs/neu_multicnn.yaml``:
three EfficientNet-Lite members fused at 200 px) and **untrained heads** (ImageNet backbones where the
recipe has them, random weights elsewhere): speed does not depend on the weights, so the quality
columns of these tables mean nothing; the parity columns (max |difference|, agreement) do. The
held-out "split" is ``--images`` real images (KolektorSDD or NEU). Then
:func:`defectscope.deploy.benchmark.benchmark` measures every runtime (PyTorch eager fp32, eager
channels_last + bf16, ONNX Runtime fp32 and int8, OpenVINO fp32) one after the other in one process
(``torch.compile`` left out for time) and one summary table is printed.

The machines are shared: the load average at the start and the end is printed with the table;
compare rows of one run only.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DEFECTSCOPE_SHARED", REPO.parent / "shared"))
NEU = SHARED / "datasets" / "neu-det" / "images"
KSDD = SHARED / "datasets" / "kolektorsdd"
NEU_CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]


def _neu_lists(run, n: int) -> None:
    files = [NEU / f"{c}_{i}.jpg" for i in range(1, 100) for c in NEU_CLASSES]
    run.split_dir.mkdir(parents=True, exist_ok=True)
    (run.split_dir / "test.txt").write_text("".join(f"{f},{f.stem.rsplit('_', 1)[0]}\n" for f in files[:n]))
    (run.split_dir / "train.txt").write_text("".join(f"{f},{f.stem.rsplit('_', 1)[0]}\n" for f in files[n : 2 * n]))


def _ksdd_lists(run, n: int, names=("test", "train")) -> None:
    from defectscope.data.masks import read_manifest

    items = read_manifest(KSDD)
    bad = [it for it in items if it.defective][: n // 2]
    good = [it for it in items if not it.defective]
    run.split_dir.mkdir(parents=True, exist_ok=True)
    test = bad + good[: n - len(bad)]
    (run.split_dir / f"{names[0]}.txt").write_text(
        "".join(f"{it.image},{'defective' if it.defective else 'good'}\n" for it in test))
    (run.split_dir / f"{names[1]}.txt").write_text("".join(f"{it.image},good\n" for it in good[n : 2 * n]))


def make_runs(root: Path, n: int, tasks: list[str]) -> dict[str, Path]:
    """Run folders at the recipes' sizes (see the module docstring); returns ``{label: run folder}``."""
    from defectscope.engine.run import RunFolder
    from defectscope.models import create_model

    torch.manual_seed(0)
    runs: dict[str, Path] = {}

    def new(label: str, task: str):
        run = RunFolder(root / label).create()
        run.write_config({"task": task})
        runs[label] = run.path
        return run

    if "segmentation" in tasks:
        kw = {"encoder": "resnet18", "num_classes": 1, "decoder_channels": [128, 64, 32, 16, 16]}
        run = new("segmentation_unet", "segmentation")
        run.save_model("segmentation", "unet", kw, create_model("unet", **kw).state_dict(), class_names=["defect"],
                       input_size=[512, 192], threshold=0.5, tta=False, image_score="max")
        _ksdd_lists(run, n)
    if "detection" in tasks:
        kw = {"num_classes": 6, "image_size": 256, "fpn_channels": 96, "head_convs": 3, "nms_thresh": 0.6}
        run = new("detection_fcos", "detection")
        run.save_model("detection", "fcos_lite", kw, create_model("fcos_lite", **kw, pretrained=True).state_dict(),
                       class_names=NEU_CLASSES, image_size=256, score_threshold=0.3)
        _neu_lists(run, n)
        kw = {"backbone": "efficientnet_lite0", "num_classes": 6, "num_slots": 9, "mode": "slots", "head": "attention",
              "hidden_dim": 256, "num_heads": 8, "encoder_layers": 1, "decoder_layers": 2, "dropout": 0.1,
              "image_size": 200, "extra_level": True}
        run = new("detection_slots", "detection")
        run.save_model("detection", "slot_detector", kw, create_model("slot_detector", **kw, pretrained=True).state_dict(),
                       class_names=NEU_CLASSES, image_size=200, score_threshold=0.3)
        _neu_lists(run, n)
    if "anomaly" in tasks:
        from defectscope.engine.anomaly import AnomalyRun, checkpoint_of

        pc = create_model("patchcore", backbone="efficientnet_lite0", layers=[2, 4], score_border=2, pretrained=True)
        pc.memory_bank = torch.randn(2200, pc.features.dim).abs()
        run = new("anomaly_patchcore", "anomaly")
        run.save_model("anomaly", **checkpoint_of(AnomalyRun(pc, 10.0, (384, 160))))
        _ksdd_lists(run, n, ("test", "fit"))
    if "multicnn" in tasks:
        members = [{"name": f"lite{i}", "backbone": f"efficientnet_lite{i}", "image_size": 200} for i in range(3)]
        kw = {"members": members, "num_classes": 6, "dropout": 0.5, "image_size": 200}
        run = new("multicnn_fusion", "multicnn")
        run.save_model("multicnn", "multicnn_fusion", kw, create_model("multicnn_fusion", **kw).state_dict(),
                       class_names=NEU_CLASSES, image_size=200)
        _neu_lists(run, n)
    if "classification" in tasks:
        kw = {"backbone": "efficientnet_lite0", "num_classes": 6, "image_size": 200, "low_res": 128, "embed_dim": 128,
              "num_heads": 8, "num_layers": 1, "dropout": 0.1}
        run = new("classification_multiscale", "classification")
        run.save_model("classification", "multiscale", kw, create_model("multiscale", pretrained=True, **kw).state_dict(),
                       class_names=NEU_CLASSES, image_size=200)
        _neu_lists(run, n)
    return runs


def run_one(run: Path, threads: int, images: int) -> None:
    """Benchmark one run folder (in this process); writes ``RUN/deploy/benchmark.json``."""
    from defectscope.deploy.benchmark import benchmark

    console = Console()
    benchmark(run, run / "deploy", threads=threads, iters=20, budget_s=3.0, batch=32, test_limit=images,
              calib_images=min(16, images), compile_=False, log=lambda m: console.print(f"[dim]{run.name}: {m}[/]"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=16, help="held-out images per task (throughput, parity)")
    ap.add_argument("--tasks", nargs="+", default=["classification", "segmentation", "detection", "anomaly", "multicnn"])
    ap.add_argument("--out", type=Path, default=Path("/tmp/defectscope_deploy_tasks"))
    ap.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # internal: benchmark one run folder
    args = ap.parse_args()
    if args.one:
        run_one(args.one, args.threads, args.images)
        return
    import json
    import subprocess
    import sys

    console = Console()
    load0 = os.getloadavg()
    runs = make_runs(args.out, args.images, args.tasks)
    table = Table(title=f"deploy_tasks.py: {args.threads} threads; load average at start {load0[0]:.1f} "
                        f"(1 min) on {os.cpu_count()} CPUs")
    for c in ("task / model", "input", "runtime", "b1 p50 ms", "b1 p95 ms", f"b{min(32, args.images)} img/s",
              "max |Δ| vs eager", "agreement"):
        table.add_column(c, justify="left" if c in ("task / model", "runtime") else "right")
    for label, run in runs.items():
        # one process per model: runtimes' thread pools (OpenVINO's TBB workers, ONNX Runtime's spinning
        # threads) outlive a model in a process and slowed the next model's PyTorch rows several-fold
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--one", str(run), "--threads", str(args.threads),
                        "--images", str(args.images)], check=True)
        res = json.loads((run / "deploy" / "benchmark.json").read_text())
        size = " x ".join(str(v) for v in res["input_size"])
        for r in res["rows"]:
            if r["error"]:
                table.add_row(label, size, r["runtime"], *["-"] * 4, f"failed: {r['error'][:60]}")
                continue
            agree = "-" if r["agreement"] is None else f"{r['agreement']:.3f} ({res['agreement_name']})"
            table.add_row(label, size, r["runtime"], f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}", f"{r['images_per_s']:.1f}",
                          f"{r['max_abs_diff']:.1e}", agree)
        console.print(f"[dim]{label}: {time.perf_counter() - t0:.0f} s[/]")
    table.caption = f"load average at end {os.getloadavg()[0]:.1f}; untrained heads: quality columns omitted"
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
