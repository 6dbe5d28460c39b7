"""Multiscale cross-attention classifier vs its plain backbone: parameters, FLOPs, images/s.

Usage::

    python benchmarks/multiscale_vs_backbone.py [--backbone efficientnet_lite0] [--size 200] [--low-res 128]
        [--train-steps 3]

Prints one table measured in one process (these machines are noisy: compare
only rows of the same run). FLOPs are counted by ``torch.utils.flop_counter``
(multiply-add = 2 FLOPs) for one image. Inference is fp32, eval mode; the
optional training column times forward + backward + AdamW steps at batch 16
with channels_last and the precision ``auto`` picks on this CPU (the training recipe; bf16 only where native).
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from defectscope.models import create_model
from defectscope.machine import autocast


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Total FLOPs of one forward pass of ``x`` (torch's FLOP counter)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def images_per_second(model: torch.nn.Module, batch: int, size: int, min_seconds: float = 3.0) -> float:
    """Inference throughput in images/s at ``batch`` (fp32, no grad, warm-up excluded)."""
    x = torch.rand(batch, 3, size, size)
    with torch.no_grad():
        model(x)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_seconds or n < 2:
            model(x)
            n += 1
    return n * batch / (time.perf_counter() - start)


def train_seconds_per_image(model: torch.nn.Module, size: int, steps: int, batch: int = 16) -> float:
    """Seconds per image of training steps (precision ``auto`` of :mod:`defectscope.machine`, channels_last, AdamW)."""
    model.train().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 6, (batch,))

    def step():
        with autocast("auto"):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    model.eval().to(memory_format=torch.contiguous_format)
    return (time.perf_counter() - start) / (steps * batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=200)
    ap.add_argument("--low-res", type=int, default=128)
    ap.add_argument("--classes", type=int, default=6)
    ap.add_argument("--train-steps", type=int, default=0, help="also time this many training steps per model")
    args = ap.parse_args()
    torch.manual_seed(0)
    models = {
        "plain backbone classifier": create_model("classifier", backbone=args.backbone, num_classes=args.classes),
        "multiscale cross-attention": create_model("multiscale", backbone=args.backbone, num_classes=args.classes,
                                                   image_size=args.size, low_res=args.low_res),
    }
    rows = {}
    for name, m in models.items():
        m.eval()
        rows[name] = {
            "params (M)": sum(p.numel() for p in m.parameters()) / 1e6,
            "GFLOPs / image": count_flops(m, torch.rand(1, 3, args.size, args.size)) / 1e9,
            "img/s batch 1": images_per_second(m, 1, args.size),
            "img/s batch 32": images_per_second(m, 32, args.size),
        }
        if args.train_steps:
            rows[name]["train ms / image"] = 1000 * train_seconds_per_image(m, args.size, args.train_steps)
    base = rows["plain backbone classifier"]
    table = Table(title=f"{args.backbone}, {args.size} px (multiscale keys/values at {args.low_res} px), "
                        f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    table.add_column("model")
    for col in base:
        table.add_column(col, justify="right")
    for name, r in rows.items():
        table.add_row(name, *[f"{v:.2f}" for v in r.values()])
    table.add_row("ratio multiscale / plain", *[f"{rows['multiscale cross-attention'][c] / base[c]:.2f}x" for c in base])
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
